"""Ray job submission: `metapeft submit` and `metapeft jobs list|status|logs|stop`.

A submission is a shell command (the *entrypoint*) that the cluster's job server runs on the
head node, plus a runtime environment (files, environment variables, pip packages). We build
the entrypoint from the same words a user types locally (``metapeft train --config X a.b=1``),
validate the config here first so that a bad one never reaches the cluster, and talk to the
job server through Ray's ``JobSubmissionClient`` (HTTP, the dashboard's port, 8265 by default).

Token authentication (Ray >= 2.52): with ``RAY_AUTH_MODE=token`` in the client's environment,
the token is taken, in Ray's own order, from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, and sent as ``Authorization: Bearer ...``.
We read it here and pass the header explicitly rather than through Ray's process-wide token
loader (a cached singleton), so a missing token is reported before any request and the header
always matches the environment of this call. Without ``RAY_AUTH_MODE=token`` nothing is sent,
as with ``ray job submit``.

Every failure a user can cause (unreachable address, missing or rejected token, unknown job id,
a bad config) is a `JobsError` (a ``ValueError``) with a one-line message; the CLI prints it and
exits with status 2.

Secrets: the runtime environment is stored by the cluster and shown on the dashboard, so nothing
is copied into it implicitly. ``--env KEY=VALUE`` and ``--env KEY`` (value from this shell) add
exactly what the user names; ``--s3-endpoint-env`` forwards only the non-secret endpoint and
region variables. Credentials belong on the nodes (instance role, Kubernetes Secret).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from metapeft_ray.core.config import (
    PACKAGED_CONFIGS,
    Config,
    apply_overrides,
    load_config,
    parse_override,
    resolve_config_path,
    validate_config,
)
from metapeft_ray.core.space import load_space

__all__ = [
    "COMMANDS",
    "AuthTokenError",
    "ClusterUnreachableError",
    "JobNotFoundError",
    "JobsClient",
    "JobsError",
    "Submission",
    "auth_headers",
    "build_entrypoint",
    "build_env_vars",
    "build_runtime_env",
    "normalize_address",
    "prepare_submission",
]

COMMANDS = ("train", "evaluate", "tune")
DEFAULT_JOB_PORT = 8265
PROBE_TIMEOUT_S = 3.0
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
"""Forwarded by ``--s3-endpoint-env``: where the bucket is, never who may read it."""
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "outputs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.pt",
    "*.safetensors",
    "*.egg-info",
]
"""Never uploaded with ``--working-dir`` (Ray also honours the directory's .gitignore)."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a file holding it, or write it to "
    "~/.ray/auth_token (`ray get-auth-token` on the head node prints the cluster's token)"
)


class JobsError(ValueError):
    """A job-submission problem the user can fix; the message is one line."""


class ClusterUnreachableError(JobsError):
    """Nothing answers at the job server address."""


class AuthTokenError(JobsError):
    """The token is missing locally, or the cluster refused or rejected it (HTTP 401/403)."""


class JobNotFoundError(JobsError):
    """The cluster has no job with that id."""


# -- building a submission ------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def build_entrypoint(
    command: str,
    args: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    module: bool = False,
) -> str:
    """``metapeft <command> <args> <overrides>``, every word shell-quoted (the job server runs the
    entrypoint through a shell). With ``module``: ``python -m metapeft_ray.cli ...``, which runs
    the copy uploaded with ``--working-dir`` (the job's cwd) rather than an installed one."""
    if command not in COMMANDS:
        raise JobsError(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}")
    head = ["python", "-m", "metapeft_ray.cli"] if module else ["metapeft"]
    return shlex.join([*head, command, *args, *overrides])


def build_env_vars(
    items: Sequence[str], *, s3_endpoint: bool = False, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The job's environment variables: each ``KEY=VALUE`` as given, each bare ``KEY`` copied from
    this shell (an error if unset), and with ``s3_endpoint`` the endpoint/region variables of
    :data:`S3_ENDPOINT_ENV` that are set here. Nothing else, in particular no credential, is
    copied implicitly."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if s3_endpoint:
        env.update({k: environ[k] for k in S3_ENDPOINT_ENV if environ.get(k)})
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise JobsError(f"--env {item!r}: expected KEY=VALUE or KEY (a variable of this shell)")
        if not sep:
            if key not in environ:
                raise JobsError(f"--env {key}: {key} is not set in this shell; pass --env {key}=VALUE")
            value = environ[key]
        env[key] = value
    return env


def build_runtime_env(
    *,
    working_dir: str | Path | None = None,
    env_vars: Mapping[str, str] | None = None,
    pip: Sequence[str] = (),
) -> dict[str, Any]:
    """Ray's runtime_env: no working_dir by default (the cluster runs its installed metapeft_ray,
    e.g. the project image); ``working_dir`` uploads that directory (minus
    :data:`WORKING_DIR_EXCLUDES`) and runs the job in it."""
    env: dict[str, Any] = {}
    if working_dir is not None:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise JobsError(f"--working-dir {working_dir}: not a directory")
        env["working_dir"] = str(path)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    if pip:
        env["pip"] = list(pip)
    return env


def _config_argument(config: str, working_dir: str | Path | None) -> str:
    """How the job names the config: a shipped name as is (every installation has it); a file
    under ``working_dir`` by its path relative to it (the job runs there); any other file by its
    absolute path, which must then exist on the head node too (it is not uploaded)."""
    path = resolve_config_path(config).resolve()
    if path.parent == PACKAGED_CONFIGS.resolve() and not Path(config).is_file():
        return config
    return _file_argument(path, working_dir)


def _file_argument(path: Path, working_dir: str | Path | None) -> str:
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return str(path)


def prepare_submission(
    command: str,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    adapter: str | None = None,
    working_dir: str | Path | None = None,
    env_vars: Mapping[str, str] | None = None,
    pip: Sequence[str] = (),
    space: str | None = None,
) -> Submission:
    """Validate locally, then build the entrypoint, runtime env and metadata.

    ``train`` / ``tune`` take ``config`` + dotted ``overrides`` (the whole tree is validated with
    `load_config`); ``evaluate`` takes ``adapter`` + ``eval.*`` overrides (checked against the
    config schema; the stored config they apply to is only on the cluster's storage).
    """
    meta: dict[str, str] = {"metapeft_command": command}
    if command == "evaluate":
        if not adapter:
            raise JobsError("submit --command evaluate needs --adapter (an exported dir or s3:// prefix)")
        parsed = dict(parse_override(o) for o in overrides)
        validate_config(apply_overrides(Config().to_dict(), parsed), overridden=parsed)
        args = ["--adapter", adapter]
        meta["adapter"] = adapter
    else:
        if adapter:
            raise JobsError(f"--adapter is only for --command evaluate, not {command}")
        cfg = load_config(config, overrides)
        args = ["--config", _config_argument(config or "quickstart", working_dir)]
        if command == "tune":
            load_space(space or "default", cfg)
            shipped = space is None or not Path(space).is_file()  # a shipped space's name
            args += [
                "--space",
                (space or "default") if shipped else _file_argument(Path(space).resolve(), working_dir),
            ]
        elif space:
            raise JobsError(f"--space is only for --command tune, not {command}")
        meta.update(run=cfg.run.name, output_dir=cfg.run.output_dir)
    return Submission(
        entrypoint=build_entrypoint(command, args, overrides, module=working_dir is not None),
        runtime_env=build_runtime_env(working_dir=working_dir, env_vars=env_vars, pip=pip),
        metadata=meta,
    )


# -- talking to the cluster -----------------------------------------------------------------------


def normalize_address(address: str | None) -> str:
    """``http(s)://HOST:PORT`` of the job server, from ``--address`` or ``RAY_ADDRESS``; a bare
    ``HOST[:PORT]`` means ``http://`` and port 8265."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise JobsError(
            "no cluster address: pass --address http://HEAD:8265 (the dashboard / job API), "
            "or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobsError(
            f"--address {address!r}: the job API is the dashboard's http://HEAD:8265 "
            "(not the GCS host:6379 or ray://host:10001)"
        )
    return address


def _probe(address: str) -> None:
    """A TCP connect with a short timeout: ``requests`` (under the Ray SDK) has none, so an
    unreachable host would otherwise hang instead of failing."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise ClusterUnreachableError(
            f"cannot reach the Ray job API at {address} ({err.strerror or err}); check --address "
            "(the head's dashboard, http://HEAD:8265), that the cluster is running with "
            "ray[default], and that the port is open to you"
        ) from None


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when ``RAY_AUTH_MODE=token``, else ``{}``."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise AuthTokenError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror or err}); {_TOKEN_HELP}"
            ) from None
        if not token:
            raise AuthTokenError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {_TOKEN_HELP}")
    if not token:
        default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    if not token:
        raise AuthTokenError(f"RAY_AUTH_MODE=token but no token was found; {_TOKEN_HELP}")
    return {"Authorization": f"Bearer {token}"}


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class JobsClient:
    """Ray's ``JobSubmissionClient`` with errors turned into one-line `JobsError` messages."""

    def __init__(self, address: str | None = None) -> None:
        self.address = normalize_address(address)
        headers = auth_headers()  # a missing token fails here, before any request
        self._sent_token = bool(headers)
        _probe(self.address)
        from ray.job_submission import JobSubmissionClient

        with self._errors():
            self._client = JobSubmissionClient(self.address, headers=headers or None)

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            raise self._auth_error(str(err)) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as err:
            raise ClusterUnreachableError(
                f"lost the connection to the Ray job API at {self.address}: {_first_line(str(err))}"
            ) from None
        except RuntimeError as err:
            msg = str(err)
            if job_id is not None and "status code 404" in msg:
                raise JobNotFoundError(
                    f"no job {job_id!r} on the Ray cluster at {self.address}; "
                    "`metapeft jobs list` shows the job ids"
                ) from None
            raise JobsError(f"the Ray job API at {self.address}: {_first_line(msg)}") from None

    def _auth_error(self, message: str) -> AuthTokenError:
        if message.startswith("Authentication failed"):  # HTTP 403: a token, but the wrong one
            return AuthTokenError(
                f"the Ray cluster at {self.address} rejected the token (HTTP 403); use the token "
                f"the cluster was started with: {_TOKEN_HELP}"
            )
        hint = (
            "set RAY_AUTH_MODE=token in this shell (the token is only sent then) and "
            if not self._sent_token
            else ""
        )
        return AuthTokenError(
            f"the Ray cluster at {self.address} requires a token (HTTP 401); {hint}{_TOKEN_HELP}"
        )

    # -- the operations ---------------------------------------------------------------------

    def submit(self, submission: Submission, submission_id: str | None = None) -> str:
        with self._errors():
            return self._client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env or None,
                metadata=submission.metadata or None,
                submission_id=submission_id,
            )

    def list(self) -> list[Any]:
        with self._errors():
            return list(self._client.list_jobs())

    def info(self, job_id: str) -> Any:
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self._errors(job_id):
            return bool(self._client.stop_job(job_id))

    def follow(self, job_id: str, out: Any = None) -> str:
        """Stream the job's logs to ``out`` (stdout) until it ends; returns the final status."""
        out = out or sys.stdout
        self.info(job_id)  # an unknown id fails here with a clear message

        async def drain() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        # Ray's SDK logs an INFO line when the stream closes normally; the status line says it.
        sdk_logger = logging.getLogger("ray.dashboard.modules.job.sdk")
        level = sdk_logger.level
        sdk_logger.setLevel(logging.WARNING)
        with self._errors(job_id):
            try:
                asyncio.run(drain())
            except OSError as err:  # aiohttp's connection errors
                raise ClusterUnreachableError(
                    f"lost the log stream of {job_id} at {self.address}: {_first_line(str(err))}"
                ) from None
            finally:
                sdk_logger.setLevel(level)
        return self.status(job_id)


def describe(job: Any) -> str:
    """One line per job for ``jobs list``: id, status, run or adapter, entrypoint."""
    meta = job.metadata or {}
    what = meta.get("run") or meta.get("adapter") or "-"
    job_id = job.submission_id or job.job_id or "-"
    return f"{job_id}\t{job.status}\t{what}\t{job.entrypoint}"
