"""Storage: one code path for local directories and ``s3://bucket/prefix`` URIs (Ray-free).

Every call goes through a ``pyarrow.fs`` filesystem: ``LocalFileSystem`` for paths and
``file://`` URIs, ``S3FileSystem`` for ``s3://``. Why pyarrow rather than boto3 + pathlib:

* it is what Ray Train itself uses for ``RunConfig(storage_path=..., storage_filesystem=...)``,
  so a URI that works here works for checkpoints, with the same credentials and endpoint
  (:func:`pyarrow_filesystem` hands Ray the very filesystem object we use);
* the same ``open_input_stream`` / ``open_output_stream`` / ``get_file_info`` calls serve both
  backends, so callers and tests never branch on the storage kind;
* it ran byte-identical against a real S3 server process (SeaweedFS) in our tests, multipart
  uploads included.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``~/.aws`` profiles, instance metadata); nothing here reads, stores or logs
a secret. A custom endpoint (MinIO, SeaweedFS, Ceph...) is taken from ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, the same variables boto3 honours. pyarrow 26 also reads
``AWS_ENDPOINT_URL_S3`` by itself in ``FileSystem.from_uri``, but older releases do not, so we
pass ``endpoint_override`` explicitly. The region comes from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, else (real AWS only) is resolved from the bucket.

Every S3 filesystem gets a short connect timeout, so an unreachable endpoint fails in seconds
instead of hanging a job; :func:`check_writable` is meant to run *before* any cluster resources
are taken and turns the usual mistakes into one-line :class:`StorageError` messages.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "check_writable",
    "check_uri",
    "download_dir",
    "exists",
    "fetch_to_local",
    "is_remote",
    "join",
    "pyarrow_filesystem",
    "read_bytes",
    "read_text",
    "upload_dir",
    "write_bytes",
    "write_text",
]

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
_CHECK_CONNECT_TIMEOUT_S = 3.0
_CHECK_REQUEST_TIMEOUT_S = 8.0
_CHUNK = 8 << 20
# S3 bucket naming rules (lowercase letters, digits, dots, hyphens; 3-63 characters).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class _Readable(Protocol):
    def read(self, nbytes: int = ..., /) -> bytes: ...


class StorageError(ValueError):
    """A storage location is unusable (bad URI, missing bucket, credentials, unreachable)."""


# -- URIs ---------------------------------------------------------------------------------------


def _scheme(uri: str) -> str | None:
    """Lower-case scheme of ``uri`` (``s3``, ``file``), or ``None`` for a plain path."""
    m = _SCHEME_RE.match(uri)
    if m is None or len(m.group(1)) == 1:  # "C:" is a drive letter, not a scheme
        return None
    return m.group(1).lower()


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; :class:`StorageError` if malformed."""
    if not uri[:5].lower() == "s3://":
        raise StorageError(f"malformed S3 URI {uri!r}: expected s3://bucket/prefix")
    bucket, _, key = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(
            f"malformed S3 URI {uri!r}: bucket name {bucket!r} is not valid "
            "(3-63 lowercase letters, digits, '.' or '-'); expected s3://bucket/prefix"
        )
    return bucket, key.strip("/")


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; False for local paths and ``file://`` URIs."""
    return _scheme(str(uri)) == "s3"


def _local_path(uri: str) -> str:
    """Absolute local path of a plain path or ``file://`` URI."""
    scheme = _scheme(uri)
    if scheme == "file":
        uri = uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :]
    elif scheme is not None:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def check_uri(uri: str | os.PathLike[str], setting: str) -> None:
    """Check only the shape of a storage location (a local path, ``file://`` or
    ``s3://bucket/prefix``): no network, no credentials, nothing created. Raises
    :class:`StorageError` naming ``setting`` (e.g. ``run.output_dir``), the value and the fix;
    :func:`check_writable` is the full check before a run writes."""
    uri = str(uri)
    scheme = _scheme(uri)
    if scheme == "s3":
        try:
            _split_s3(uri)
        except StorageError:
            bucket = uri[5:].partition("/")[0] if uri[:5].lower() == "s3://" else ""
            why = (
                f"the bucket name {bucket!r} is not valid (3-63 lowercase letters, digits, '.' or '-')"
                if bucket
                else "the URI names no bucket"
            )
            raise StorageError(f"{setting}={uri!r}: {why}; use s3://BUCKET/prefix") from None
    elif scheme not in (None, "file"):
        raise StorageError(
            f"{setting}={uri!r}: unsupported storage scheme {scheme + '://'!r}; use a local path, "
            "file:// or s3://BUCKET/prefix"
        )


def join(uri: str, *parts: str) -> str:
    """Append path components with ``/``; keeps the URI form (``s3://`` stays ``s3://``)."""
    parts_ = [p.strip("/") for p in parts if p.strip("/")]
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *parts_])
    return os.path.join(uri, *parts_)


# -- filesystems --------------------------------------------------------------------------------


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem(
    bucket: str, *, connect_timeout: float, request_timeout: float, max_attempts: int
) -> pafs.S3FileSystem:
    endpoint = _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and endpoint is None:
        try:  # what FileSystem.from_uri does for real AWS: ask the bucket where it lives
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None  # let the SDK default apply; a real error surfaces on first use
    return pafs.S3FileSystem(
        region=region or None,
        endpoint_override=endpoint,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    )


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for ``uri``, ready for ``RunConfig(storage_filesystem=fs,
    storage_path=path)`` and for every other function here.

    ``path`` is ``bucket/prefix`` for S3 and an absolute path locally (pyarrow paths carry no
    scheme). The S3 filesystem honours ``AWS_ENDPOINT_URL_S3`` and has connect/request timeouts.
    """
    uri = str(uri)
    if is_remote(uri):
        bucket, key = _split_s3(uri)
        fs = _s3_filesystem(
            bucket,
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
            max_attempts=3,
        )
        return fs, f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), _local_path(uri)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _write_stream(fs: pafs.FileSystem, path: str, src: _Readable) -> None:
    """Copy ``src`` to ``path``. Local writes go through a temp file + rename, so concurrent
    readers (other workers, a second fetch into the same cache) never see a half-written file;
    an S3 PUT is atomic already."""
    if _is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open_output_stream(path) as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)


def _copy_file(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    with src_fs.open_input_stream(src) as inp:
        _write_stream(dst_fs, dst, inp)


def _copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> int:
    """Copy every file under ``src`` to the same relative path under ``dst``; returns the count.

    Empty directories are not copied (S3 has none). Files already under ``dst`` that are not in
    ``src`` are left alone."""
    src = src.rstrip("/")
    n = 0
    for info in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(src) :].lstrip("/")
        _copy_file(src_fs, info.path, dst_fs, f"{dst.rstrip('/')}/{rel}")
        n += 1
    return n


# -- public API ---------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    """True if ``uri`` is an existing file or directory (an S3 prefix with objects under it)."""
    fs, path = pyarrow_filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = pyarrow_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri}")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` (parent directories are created locally; S3 needs none)."""
    fs, path = pyarrow_filesystem(uri)
    _write_stream(fs, path, io.BytesIO(data))


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def list_dirs(uri: str) -> list[str]:
    """The names of the directories (S3: the prefixes) directly under ``uri``; none if it is missing."""
    fs, path = pyarrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_dir(uri: str) -> None:
    """Delete the directory (S3: every object under the prefix) ``uri`` and what it holds."""
    fs, path = pyarrow_filesystem(uri)
    fs.delete_dir(path)


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (S3 prefix or local directory)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"not a directory: {local_dir}")
    dst_fs, dst = pyarrow_filesystem(uri)
    _copy_tree(pafs.LocalFileSystem(), str(local_dir.absolute()), dst_fs, dst)


def download_dir(uri: str, local_dir: Path) -> Path:
    """Copy every file under ``uri`` into ``local_dir`` and return ``local_dir``."""
    src_fs, src = pyarrow_filesystem(uri)
    if src_fs.get_file_info(src).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such directory or prefix: {uri}")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    _copy_tree(src_fs, src, pafs.LocalFileSystem(), str(local_dir.absolute()))
    return local_dir


def fetch_to_local(uri: str, cache_dir: Path) -> Path:
    """Local path for ``uri``: local paths come back unchanged; ``s3://b/key`` (a file or a
    prefix) is downloaded to ``cache_dir/b/key``, overwriting what is there, so a stale copy is
    never served when the object changed."""
    uri = str(uri)
    if not is_remote(uri):
        return Path(_local_path(uri)) if _scheme(uri) == "file" else Path(uri)
    fs, path = pyarrow_filesystem(uri)
    dest = Path(cache_dir) / path
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        _copy_file(fs, path, pafs.LocalFileSystem(), str(dest.absolute()))
        return dest
    if kind == pafs.FileType.Directory:
        return download_dir(uri, dest)
    raise FileNotFoundError(f"no such S3 object or prefix: {uri}")


# -- preflight check ----------------------------------------------------------------------------

_CREDENTIAL_CODES = (
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "ACCESS_DENIED",
    "AccessDenied",
    "EXPIRED_TOKEN",
    "ExpiredToken",
    "InvalidToken",
    "MISSING_AUTHENTICATION_TOKEN",
    "HTTP response code 403",
)
_NETWORK_CODES = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "Connection refused",
    "Couldn't resolve",
    "Could not resolve",
    "timed out",
    "Timeout",
    "REQUEST_TIMEOUT",
)


def _explain(uri: str, bucket: str, err: OSError) -> StorageError:
    """Map a pyarrow/AWS SDK error to a one-line message that names the URI and the fix."""
    msg = " ".join(str(err).split())
    endpoint = _endpoint() or "AWS S3 (no AWS_ENDPOINT_URL_S3 set)"
    if "NO_SUCH_BUCKET" in msg or "NoSuchBucket" in msg:
        return _missing_bucket(uri, bucket)
    if any(code in msg for code in _CREDENTIAL_CODES):
        unset = "" if os.environ.get("AWS_ACCESS_KEY_ID") else " (AWS_ACCESS_KEY_ID is not set)"
        return StorageError(
            f"cannot write to {uri}: credentials missing, rejected or not allowed to write to "
            f"bucket {bucket!r} at {endpoint}{unset}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the instance role) and the bucket policy "
            f"[{_first_line(msg)}]"
        )
    if any(code in msg for code in _NETWORK_CODES):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} for {uri}; check AWS_ENDPOINT_URL_S3, "
            f"the network and that the server is running [{_first_line(msg)}]"
        )
    return StorageError(f"cannot write to {uri} at {endpoint}: {_first_line(msg)}")


def _missing_bucket(uri: str, bucket: str) -> StorageError:
    return StorageError(
        f"S3 bucket {bucket!r} does not exist (for {uri} at "
        f"{_endpoint() or 'AWS S3'}); create it first or fix the bucket name"
    )


def _first_line(msg: str, limit: int = 300) -> str:
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def check_writable(uri: str) -> None:
    """Fail fast, before any cluster resources are taken, if ``uri`` cannot be written.

    S3: the URI must be well formed, the endpoint reachable (short timeouts, one attempt, so it
    never hangs), the bucket must exist and the credentials must be able to write: a small
    marker object is written under the prefix and deleted (pyarrow then keeps an empty
    ``prefix/`` directory marker, as ``mkdir`` would; the run writes there anyway). Local: the
    directory is created and a marker file written and removed. Raises :class:`StorageError`
    with a one-line message.
    """
    uri = str(uri)
    if not is_remote(uri):
        path = Path(_local_path(uri))
        try:
            path.mkdir(parents=True, exist_ok=True)
            marker = path / f".metapeft-write-check-{uuid.uuid4().hex}"
            marker.write_bytes(b"ok")
            marker.unlink()
        except OSError as e:
            raise StorageError(
                f"local storage path {path} is not writable ({e.strerror or e}); "
                "choose another directory or fix its permissions"
            ) from None
        return

    bucket, key = _split_s3(uri)
    fs = _s3_filesystem(
        bucket,
        connect_timeout=_CHECK_CONNECT_TIMEOUT_S,
        request_timeout=_CHECK_REQUEST_TIMEOUT_S,
        max_attempts=1,
    )
    marker = "/".join(p for p in (bucket, key, f".metapeft-write-check-{uuid.uuid4().hex}") if p)
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:  # HeadBucket
            raise _missing_bucket(uri, bucket)
        with fs.open_output_stream(marker) as out:
            out.write(b"ok")
        fs.delete_file(marker)
    except StorageError:
        raise
    except OSError as e:
        raise _explain(uri, bucket, e) from None
