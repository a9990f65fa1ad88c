"""Job submission without a cluster: entrypoint quoting, runtime env, secrets, local config
validation, token lookup, and one-line errors for an unreachable address, a missing or rejected
token and an unknown job id.

The auth and unknown-job cases talk to a small HTTP server in this process that answers the job
API's routes the way Ray's dashboard does (the real dashboard is exercised in
``tests/test_cluster_e2e.py``). Cases with ``RAY_AUTH_MODE=token`` run the CLI in a subprocess:
Ray caches the auth mode per process on first use, and a cached "token" would leak into every
later ``ray.init`` of this test session.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray

from metapeft_ray import cli
from metapeft_ray.core.config import ConfigError
from metapeft_ray.on_ray import jobs

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cr3t-token"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "metapeft_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**base, **(env or {})},
    )


def one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# -- entrypoint and runtime env -----------------------------------------------------------------


def test_entrypoint_quotes_every_word() -> None:
    overrides = ["run.name=a b", "data.dataset=/d/it's.jsonl", "eval.shots=[1, 5]", "x.y=$(rm -rf ~)"]
    entry = jobs.build_entrypoint("train", ["--config", "quickstart"], overrides)
    assert entry.startswith("metapeft train --config quickstart ")
    assert shlex.split(entry) == ["metapeft", "train", "--config", "quickstart", *overrides]
    module = jobs.build_entrypoint("tune", ["--config", "c.yaml"], module=True)
    assert shlex.split(module) == ["python", "-m", "metapeft_ray.cli", "tune", "--config", "c.yaml"]
    with pytest.raises(jobs.JobsError, match="unknown command 'adapt'"):
        jobs.build_entrypoint("adapt", [])


def test_env_vars_are_only_what_the_user_names() -> None:
    environ = {
        "AWS_ENDPOINT_URL_S3": "http://s3:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "HF_TOKEN": "hf",
    }
    assert jobs.build_env_vars([], environ=environ) == {}
    assert jobs.build_env_vars([], s3_endpoint=True, environ=environ) == {
        "AWS_ENDPOINT_URL_S3": "http://s3:9000",
        "AWS_REGION": "eu-west-1",
    }
    explicit = jobs.build_env_vars(["A=1", "B=x=y", "C=", "AWS_ACCESS_KEY_ID"], environ=environ)
    assert explicit == {"A": "1", "B": "x=y", "C": "", "AWS_ACCESS_KEY_ID": "AKIA"}
    with pytest.raises(jobs.JobsError, match="NOPE is not set in this shell"):
        jobs.build_env_vars(["NOPE"], environ=environ)
    with pytest.raises(jobs.JobsError, match="expected KEY=VALUE"):
        jobs.build_env_vars(["1BAD=x"], environ=environ)


def test_runtime_env(tmp_path: Path) -> None:
    assert jobs.build_runtime_env() == {}
    env = jobs.build_runtime_env(working_dir=tmp_path, env_vars={"A": "1"}, pip=["optuna>=3.6"])
    assert env["working_dir"] == str(tmp_path.resolve())
    assert {".git", "runs", "venv"} <= set(env["excludes"])
    assert env["env_vars"] == {"A": "1"} and env["pip"] == ["optuna>=3.6"]
    with pytest.raises(jobs.JobsError, match="not a directory"):
        jobs.build_runtime_env(working_dir=tmp_path / "missing")


def test_prepare_submission_validates_and_names_the_config(tmp_path: Path) -> None:
    sub = jobs.prepare_submission("train", config="quickstart", overrides=["run.name=r7"])
    assert shlex.split(sub.entrypoint) == ["metapeft", "train", "--config", "quickstart", "run.name=r7"]
    assert sub.runtime_env == {}
    assert sub.metadata == {"metapeft_command": "train", "run": "r7", "output_dir": "runs"}

    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "mine.yaml"
    cfg.write_text("meta:\n  inner_steps: 2\n")
    uploaded = jobs.prepare_submission("train", config=str(cfg), working_dir=tmp_path)
    assert shlex.split(uploaded.entrypoint)[:6] == [
        "python",
        "-m",
        "metapeft_ray.cli",
        "train",
        "--config",
        "configs/mine.yaml",
    ]
    elsewhere = jobs.prepare_submission("tune", config=str(cfg))
    assert shlex.split(elsewhere.entrypoint)[-4:] == ["--config", str(cfg.resolve()), "--space", "default"]
    with pytest.raises(jobs.JobsError, match="--space is only for --command tune"):
        jobs.prepare_submission("train", config="quickstart", space="default")

    with pytest.raises(ConfigError, match="meta.inner_step: unknown key"):
        jobs.prepare_submission("train", config="quickstart", overrides=["meta.inner_step=3"])
    with pytest.raises(ConfigError, match="not found"):
        jobs.prepare_submission("train", config=str(tmp_path / "nope.yaml"))


def test_prepare_evaluate_submission() -> None:
    sub = jobs.prepare_submission(
        "evaluate", adapter="s3://b/runs/r/adapter", overrides=["eval.episodes=600"]
    )
    assert shlex.split(sub.entrypoint) == [
        "metapeft",
        "evaluate",
        "--adapter",
        "s3://b/runs/r/adapter",
        "eval.episodes=600",
    ]
    with pytest.raises(jobs.JobsError, match="needs --adapter"):
        jobs.prepare_submission("evaluate")
    with pytest.raises(ConfigError, match="eval.episodes"):
        jobs.prepare_submission("evaluate", adapter="a", overrides=["eval.episodes=0"])
    with pytest.raises(jobs.JobsError, match="only for --command evaluate"):
        jobs.prepare_submission("train", adapter="a")


def test_normalize_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.normalize_address("http://head:8265/") == "http://head:8265"
    assert jobs.normalize_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert jobs.normalize_address(None) == "https://ray.example.com"
    with pytest.raises(jobs.JobsError, match="not the GCS"):
        jobs.normalize_address("ray://head:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(jobs.JobsError, match="pass --address http://HEAD:8265"):
        jobs.normalize_address(None)


# -- tokens -------------------------------------------------------------------------------------


def test_auth_headers_follow_rays_lookup_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    file = tmp_path / "token"
    file.write_text(" from-file\n")
    base = {"HOME": str(home), "RAY_AUTH_MODE": "token"}
    assert jobs.auth_headers({"HOME": str(home), "RAY_AUTH_TOKEN": "x"}) == {}  # mode not token
    assert jobs.auth_headers({**base, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == {}
    both = {**base, "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(file)}
    assert jobs.auth_headers(both) == {"Authorization": "Bearer from-env"}
    assert jobs.auth_headers({**base, "RAY_AUTH_TOKEN_PATH": str(file)}) == {
        "Authorization": "Bearer from-file"
    }
    with pytest.raises(jobs.AuthTokenError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        jobs.auth_headers({**base, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    with pytest.raises(jobs.AuthTokenError, match="no token was found; set RAY_AUTH_TOKEN"):
        jobs.auth_headers(base)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_headers(base) == {"Authorization": "Bearer from-home"}


# -- errors against a job API -------------------------------------------------------------------


class _JobAPI(BaseHTTPRequestHandler):
    """Answers like Ray's dashboard: token middleware (401 without a token, 403 for a wrong one),
    /api/version, an empty job list, and 404 for any job id."""

    token: str | None = None
    seen_auth: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        auth = self.headers.get("Authorization")
        self.seen_auth.append(auth)
        if self.token is not None and not auth:
            return self._send(401, "Unauthorized: Missing authentication token", "text/plain")
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._send(403, "Forbidden: Invalid authentication token", "text/plain")
        if self.path == "/api/version":
            return self._send(
                200,
                json.dumps(
                    {"version": "4", "ray_version": ray.__version__, "ray_commit": "x", "session_name": "s"}
                ),
            )
        if self.path == "/api/jobs/":
            return self._send(200, "[]")
        if self.path.startswith("/api/jobs/"):
            job = self.path.split("/")[3]
            return self._send(404, f"Job {job} does not exist", "text/plain")
        return self._send(404, "not found", "text/plain")

    do_POST = do_GET  # noqa: N815 - stop is a POST

    def _send(self, status: int, body: str, kind: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _serve(token: str | None) -> Iterator[tuple[str, type[_JobAPI]]]:
    handler = type("Handler", (_JobAPI,), {"token": token, "seen_auth": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def open_api() -> Iterator[tuple[str, type[_JobAPI]]]:
    yield from _serve(None)


@pytest.fixture
def token_api() -> Iterator[tuple[str, type[_JobAPI]]]:
    yield from _serve(TOKEN)


@pytest.fixture
def no_auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "argv",
    [["jobs", "list"], ["jobs", "status", "raysubmit_x"], ["submit", "run.name=x"]],
    ids=["list", "status", "submit"],
)
def test_unreachable_address_is_one_line_and_quick(argv, capsys, no_auth_env) -> None:  # noqa: ANN001
    address = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    assert cli.main([*argv, "--address", address]) == 2
    assert time.monotonic() - t0 < 10
    line = one_line_error(capsys.readouterr().err)
    assert f"cannot reach the Ray job API at {address} (Connection refused)" in line
    assert line.startswith(f"metapeft {argv[0]}: error: ")


def test_bad_config_never_reaches_the_cluster(open_api, capsys, no_auth_env) -> None:  # noqa: ANN001
    address, handler = open_api
    assert cli.main(["submit", "--address", address, "meta.inner_steps=-1"]) == 2
    assert "meta.inner_steps" in capsys.readouterr().err
    assert handler.seen_auth == []  # not a single request


def test_unknown_job_id(open_api, capsys, no_auth_env) -> None:  # noqa: ANN001
    address, handler = open_api
    assert cli.main(["jobs", "list", "--address", address]) == 0
    for action in ("status", "logs", "stop"):
        assert cli.main(["jobs", action, "raysubmit_nope", "--address", address]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert "no job 'raysubmit_nope' on the Ray cluster at" in line and "jobs list" in line
    assert set(handler.seen_auth) == {None}  # no token sent without RAY_AUTH_MODE=token


@pytest.mark.slow  # four CLI subprocesses, each importing Ray's job client
def test_token_errors_are_one_line(token_api, tmp_path: Path) -> None:  # noqa: ANN001
    address, handler = token_api
    home = {"HOME": str(tmp_path)}
    argv = ["jobs", "list", "--address", address]

    no_mode = run_cli(argv, {**home, "RAY_AUTH_TOKEN": TOKEN})
    assert no_mode.returncode == 2
    assert "requires a token (HTTP 401); set RAY_AUTH_MODE=token" in one_line_error(no_mode.stderr)

    missing = run_cli(argv, {**home, "RAY_AUTH_MODE": "token"})
    assert missing.returncode == 2
    assert "RAY_AUTH_MODE=token but no token was found" in one_line_error(missing.stderr)

    wrong = run_cli(argv, {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"})
    assert wrong.returncode == 2
    assert "rejected the token (HTTP 403)" in one_line_error(wrong.stderr)

    token_file = tmp_path / "tok"
    token_file.write_text(TOKEN + "\n")
    ok = run_cli(argv, {**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert ok.returncode == 0, ok.stderr
    assert f"Bearer {TOKEN}" in handler.seen_auth and "Bearer wrong" in handler.seen_auth
    assert TOKEN not in ok.stdout + ok.stderr + wrong.stderr + no_mode.stderr
