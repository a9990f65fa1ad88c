"""Adaptation as a service: a real Serve application on the session's local Ray, over HTTP.

One application per module (Serve starts once): two tiny inits, a task cache of one, a bearer
token from a file, small request limits so that every bad-request kind is cheap to send, and a
batch wait long enough that concurrent requests surely meet. One test adds a second, 2-replica
application beside it for as long as it runs."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from metapeft_ray.core.adapt import AdaptedTask, adapt_and_predict
from metapeft_ray.core.config import load_config
from metapeft_ray.core.data import LabelledTexts
from metapeft_ray.core.export import export_adapter, load_adapter
from metapeft_ray.core.meta import Adapted
from metapeft_ray.core.model import encoder_from_config
from metapeft_ray.core.train import inner_loop
from metapeft_ray.on_ray.serve import (
    ServeSettings,
    TaskCache,
    _Query,
    builder_args,
    computed_together,
    parse_adapters,
    parse_overrides,
    read_token,
    task_id,
)
from tests.tiny import tiny_overrides

TOKEN = "s3cret-test-token"
SUPPORT = {
    "texts": [
        "card lost today",
        "lost my card again",
        "refund this item",
        "item refund please",
        "exchange rate today",
        "what exchange rate",
    ],
    "labels": ["card", "card", "refund", "refund", "exchange", "exchange"],
}
QUERIES = ["i lost my card", "refund for an item please", "the exchange rate quickly"]
REFINED = {"a_refined": {"head.query_refine": 2}}  # init a served again, refining its texts together


# -- Ray-free -----------------------------------------------------------------------------------


def _task(name: str) -> AdaptedTask:
    return AdaptedTask((name,), Adapted({}, torch.zeros(1), torch.zeros(1)), 1.0)


def test_task_cache_evicts_least_recently_used_and_expires_after_ttl() -> None:
    now = [0.0]
    cache = TaskCache(2, ttl_s=10.0, clock=lambda: now[0])
    cache.put("a", _task("a"))
    cache.put("b", _task("b"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", _task("c"))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    now[0] = 10.5
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0
    with pytest.raises(ValueError, match="size=0"):
        TaskCache(0, 1.0)


def test_a_batch_shares_passes_per_task_but_a_refining_tasks_requests_stay_apart() -> None:
    refining = replace(_task("r"), refine=3)
    tasks = {"t": _task("t"), "r": refining, "u": _task("u")}
    queries = [_Query(key, "a", tasks[key], ("x",), 1) for key in "trtru"]
    # the texts of a refining task's requests would move each other's predictions (head.query_refine)
    assert computed_together(queries) == [[0, 2], [1], [3], [4]]


def test_task_id_hashes_init_support_and_steps() -> None:
    s = LabelledTexts("x", ("a b", "c d"), ("p", "q"))
    assert task_id("i", s, 2) == task_id("i", LabelledTexts("y", s.texts, s.labels), 2)
    others = {
        task_id("j", s, 2),
        task_id("i", s, 3),
        task_id("i", LabelledTexts("x", s.texts, ("q", "p")), 2),
    }
    assert task_id("i", s, 2) not in others and len(others) == 3


def test_adapter_specs_and_token_sources_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_adapters(["a=/x", "b.v2=s3://b/p"]) == {"a": "/x", "b.v2": "s3://b/p"}
    for bad, why in (("a", "NAME=PATH"), ("a b=/x", "letters"), ("=/x", "NAME=PATH")):
        with pytest.raises(ValueError, match=why):
            parse_adapters([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_adapters(["a=/x", "a=/y"])
    monkeypatch.setenv("METAPEFT_TEST_TOKEN", " tok ")
    assert read_token("METAPEFT_TEST_TOKEN", None) == "tok" and read_token(None, None) is None
    monkeypatch.setenv("METAPEFT_TEST_TOKEN", "")
    with pytest.raises(ValueError, match="METAPEFT_TEST_TOKEN: the variable is unset or empty"):
        read_token("METAPEFT_TEST_TOKEN", None)
    (tmp_path / "t").write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        read_token(None, str(tmp_path / "t"))


def test_overrides_of_served_inits_are_checked_before_anything_starts() -> None:
    adapters = {"a": "/x", "b": "/y"}
    assert parse_overrides(
        ["a:head.query_refine=3", "a:head.refine_prior=true", "b:meta.inner_lr=0.1"], adapters
    ) == {
        "a": {"head.query_refine": 3, "head.refine_prior": True},
        "b": {"meta.inner_lr": 0.1},
    }
    for bad in ("head.query_refine=3", "c:head.query_refine=3"):
        with pytest.raises(ValueError, match=r"expected NAME:section.key=value with NAME one of a, b"):
            parse_overrides([bad], adapters)
    with pytest.raises(ValueError, match="not of the form section.key=value"):
        parse_overrides(["a:query_refine"], adapters)
    *_, overrides = builder_args({"adapters": adapters, "overrides": {"a": {"head.query_refine": 3}}})
    assert overrides == {"a": {"head.query_refine": 3}}
    with pytest.raises(ValueError, match="overrides: .* of served inits"):
        builder_args({"adapters": adapters, "overrides": {"c": {"head.query_refine": 3}}})


def test_batch_settings_are_checked_from_the_cli_and_the_builder_args() -> None:
    assert ServeSettings(max_batch_size=1, batch_wait_s=0).max_batch_size == 1  # batching off
    for kw, reason in (
        ({"max_batch_size": 0}, "max_batch_size=0: give 1 (no batching) to 32"),
        ({"max_batch_size": 33}, "max_batch_size=33"),
        ({"batch_wait_s": -0.1}, "batch_wait_s=-0.1 must be 0 or more"),
        ({"ttl_s": 0.0}, "ttl_s=0.0 must be positive"),
    ):
        with pytest.raises(ValueError, match=re.escape(reason)):
            ServeSettings(**kw)
        with pytest.raises(ValueError, match=re.escape(reason)):
            builder_args({"adapters": {"a": "/x"}, **kw})
    _, settings, _ = builder_args({"adapters": {"a": "/x"}, "max_batch_size": 16, "batch_wait_s": 0})
    assert (settings.max_batch_size, settings.batch_wait_s) == (16, 0.0)
    with pytest.raises(ValueError, match="batch_wait_s: 'x' is not a number"):
        builder_args({"adapters": {"a": "/x"}, "batch_wait_s": "x"})


def test_serve_cli_refuses_bad_adapters_and_a_missing_token_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from metapeft_ray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("METAPEFT_TEST_TOKEN", raising=False)
    for argv, reason in (
        (["--adapter", "a"], "expected NAME=PATH"),
        (["--adapter", f"a={tmp_path}"], f"--adapter a={tmp_path}: {tmp_path}: no metapeft.json"),
        (["--adapter", f"a={tmp_path}", "--token-env", "METAPEFT_TEST_TOKEN"], "the variable is unset"),
        (["--adapter", f"a={tmp_path}", "--max-batch-size", "0"], "max_batch_size=0: give 1"),
        (["--adapter", f"a={tmp_path}", "--set", "b:head.query_refine=3"], "with NAME one of a"),
    ):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("metapeft serve: error: ") and reason in err and err.count("\n") == 1


# -- a real Serve application -------------------------------------------------------------------


def _export_init(path: Path, backbone: str, dataset: str, seed: int, rank: int) -> str:
    """An untrained init in the exported format: serving needs no training to be tested."""
    cfg = load_config(None, tiny_overrides(backbone, dataset, **{"run.seed": seed, "peft.rank": rank}))
    torch.manual_seed(seed)
    export_adapter(encoder_from_config(cfg), path, {"config": cfg.to_dict(), "meta_step": 0, "metrics": {}})
    return str(path)


@pytest.fixture(scope="module")
def inits(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str, tiny_dataset: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inits")
    return {
        "a": _export_init(root / "a", tiny_backbone, tiny_dataset, seed=0, rank=4),
        "b": _export_init(root / "b", tiny_backbone, tiny_dataset, seed=1, rank=2),
    }


def test_an_override_the_init_refuses_fails_before_any_replica(inits: dict[str, str]) -> None:
    from metapeft_ray.on_ray.serve import build_app

    with pytest.raises(ValueError, match=r"(?s)--adapter a=.*head.query_refine: Input should be greater"):
        build_app({"a": inits["a"]}, ServeSettings(), overrides={"a": {"head.query_refine": -1}})
    with pytest.raises(ValueError, match=r"overrides for \['c'\], which are not served"):
        build_app({"a": inits["a"]}, ServeSettings(), overrides={"c": {"head.query_refine": 1}})


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(
        self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> ServeSettings:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    return ServeSettings(
        cache_size=1,
        max_texts=12,
        max_text_chars=200,
        max_steps=5,
        max_body_bytes=20_000,
        max_batch_size=8,
        batch_wait_s=0.25,
        token_file=str(token_file),
    )


@pytest.fixture(scope="module")
def client(ray_cluster: dict[str, str], inits: dict[str, str], settings: ServeSettings) -> Iterator[Client]:
    from ray import serve

    from metapeft_ray.on_ray.serve import build_app, start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        # init a once more, served with its refinement turned on by an override of its config
        app = build_app({**inits, "a_refined": inits["a"]}, settings, overrides=REFINED, num_cpus=0.5)
        yield Client(start(app, port=port))
    finally:
        serve.shutdown()


def _local_predictions(uri: str, steps: int, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The same adaptation in this process, the way `metapeft adapt` runs it."""
    encoder, _, cfg, _ = load_adapter(uri, overrides)
    support = LabelledTexts("s", tuple(SUPPORT["texts"]), tuple(SUPPORT["labels"]))
    return list(
        adapt_and_predict(encoder, encoder.adapter_params(), support, QUERIES, inner_loop(cfg, steps))
    )


@pytest.mark.ray
@pytest.mark.slow
def test_create_a_task_then_classify_equals_one_shot_and_metapeft_adapt(client: Client, inits) -> None:  # noqa: ANN001
    status, health = client("GET", "/health", token=None)
    assert (status, health["status"], health["inits"], health["tasks"]) == (200, "ok", 3, 0)
    status, created = client("POST", "/tasks", {"init": "a", **SUPPORT})
    assert status == 200, created
    assert created["classes"] == ["card", "exchange", "refund"] and created["steps"] == 2
    assert len(created["support_loss"]) == 2 and created["cached"] is False
    status, again = client("POST", "/tasks", {"init": "a", **SUPPORT, "steps": 2})
    assert status == 200 and again["task_id"] == created["task_id"] and again["cached"] is True

    status, out = client("POST", f"/tasks/{created['task_id']}/classify", {"texts": QUERIES, "top_k": 2})
    assert status == 200, out
    preds = out["predictions"]
    assert len(preds) == 3
    for p in preds:
        assert p["label"] == p["top_k"][0]["label"] and p["probability"] == p["top_k"][0]["probability"]
        assert len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
    status, one = client("POST", "/classify", {"init": "a", **SUPPORT, "queries": QUERIES, "top_k": 5})
    assert status == 200, one
    assert [p["label"] for p in one["predictions"]] == [p["label"] for p in preds]
    assert len(one["predictions"][0]["top_k"]) == 3  # top_k is cut at the number of classes
    want = _local_predictions(inits["a"], 2)
    assert [p["label"] for p in preds] == [p["label"] for p in want]
    assert [p["probability"] for p in preds] == pytest.approx([p["confidence"] for p in want], abs=1e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_inits_are_listed_and_adapt_differently_as_their_overrides_say(client: Client, inits) -> None:  # noqa: ANN001
    status, listed = client("GET", "/inits")
    assert status == 200
    assert [(i["name"], i["rank"], i["method"], i["overrides"]) for i in listed["inits"]] == [
        ("a", 4, "lora", {}),
        ("b", 2, "lora", {}),
        ("a_refined", 4, "lora", REFINED["a_refined"]),
    ]
    ids, probs = [], []
    for name in ("a", "b", "a_refined"):
        status, one = client("POST", "/classify", {"init": name, **SUPPORT, "queries": QUERIES})
        assert status == 200, one
        probs.append([p["probability"] for p in one["predictions"]])
        ids.append(client("POST", "/tasks", {"init": name, **SUPPORT})[1]["task_id"])
    assert probs[0] != probs[1] and probs[0] != probs[2] and len(set(ids)) == 3
    # init a under the override adapts as `metapeft adapt` with the same override does
    want = _local_predictions(inits["a"], 2, REFINED["a_refined"])
    assert probs[2] == pytest.approx([p["confidence"] for p in want], abs=1e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_a_cache_of_one_evicts_the_older_task(client: Client) -> None:
    first = client("POST", "/tasks", {"init": "a", **SUPPORT, "steps": 1})[1]["task_id"]
    second = client("POST", "/tasks", {"init": "a", **SUPPORT, "steps": 0})[1]["task_id"]
    assert client("POST", f"/tasks/{second}/classify", {"texts": QUERIES})[0] == 200
    status, out = client("POST", f"/tasks/{first}/classify", {"texts": QUERIES})
    assert status == 404 and "evicted (cache of 1" in out["detail"]
    status, again = client("POST", "/tasks", {"init": "a", **SUPPORT, "steps": 1})
    assert (again["task_id"], again["cached"]) == (first, False)


@pytest.mark.ray
@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_one_line_and_the_replica_keeps_serving(client: Client) -> None:
    one_class = {"texts": ["a b", "c d"], "labels": ["x", "x"]}
    cases = [
        (
            "/tasks",
            {"init": "nope", **SUPPORT},
            404,
            "unknown init 'nope'; this service has ['a', 'a_refined', 'b']",
        ),
        ("/tasks/0123/classify", {"texts": ["x"]}, 404, "unknown task '0123'"),
        ("/tasks", {"init": "a", **one_class}, 422, "the support set has 1 class"),
        (
            "/tasks",
            {"init": "a", **SUPPORT, "texts": ["", *SUPPORT["texts"][1:]]},
            422,
            "texts[0]: empty text",
        ),
        ("/tasks", {"init": "a", **SUPPORT, "labels": SUPPORT["labels"][:-1]}, 422, "5 labels for 6 texts"),
        ("/tasks", {"init": "a", **SUPPORT, "steps": 6}, 422, "steps: 6 inner steps, over the limit of 5"),
        ("/tasks", {"init": "a", **SUPPORT, "steps": -1}, 422, "steps: Input should be greater than"),
        (
            "/tasks",
            {"init": "a", "texts": "a b", "labels": ["x"]},
            422,
            "texts: Input should be a valid list",
        ),
        ("/tasks", {"init": "a", **SUPPORT, "extra": 1}, 422, "extra: Extra inputs are not permitted"),
        ("/classify", {"init": "a", **SUPPORT, "queries": ["x " * 101]}, 422, "queries[0]: 202 characters"),
        ("/classify", {"init": "a", **SUPPORT, "queries": ["x"] * 13}, 413, "13 texts, over the limit of 12"),
        ("/classify", {"init": "a", **SUPPORT, "queries": ["x" * 150] * 150}, 413, "over the limit of 20000"),
    ]
    for path, body, status, reason in cases:
        got, out = client("POST", path, body)
        assert (got, reason in out["detail"]) == (status, True), (path, out)
        assert "\n" not in out["detail"]
    status, out = client("POST", "/tasks", raw=b'{"init": "a", "texts": [')
    assert status == 400 and out["detail"].startswith("malformed JSON: ")
    assert client("GET", "/health", token=None)[0] == 200
    assert client("POST", "/classify", {"init": "a", **SUPPORT, "queries": QUERIES})[0] == 200


@pytest.mark.ray
@pytest.mark.slow
def test_the_token_guards_every_route_but_health(client: Client) -> None:
    for token in (None, "wrong", TOKEN + "x"):
        for method, path, body in (
            ("GET", "/inits", None),
            ("POST", "/tasks", {"init": "a", **SUPPORT}),
            ("POST", "/tasks/0123/classify", {"texts": ["x"]}),
            ("POST", "/classify", {"init": "a", **SUPPORT, "queries": ["x"]}),
        ):
            status, out = client(method, path, body, token=token)
            assert (status, out) == (401, {"detail": "missing or wrong bearer token"}), (path, token)
    assert client("GET", "/health", token=None)[0] == 200
    for path in ("/docs", "/openapi.json", "/redoc"):  # FastAPI's own pages would be unguarded
        assert client("GET", path, token=None)[0] == 404


@pytest.mark.ray
@pytest.mark.slow
def test_latency_of_task_creation_and_classify(client: Client) -> None:
    """Not a benchmark (the tiny backbone, a shared machine): it prints what a run saw, and
    pins that a cached task answers without adapting again."""
    texts = [f"{t} {i}" for i in range(2) for t in SUPPORT["texts"]][:12]
    labels = [lab for _ in range(2) for lab in SUPPORT["labels"]][:12]
    timings: dict[str, list[float]] = {"create": [], "create (cached)": [], "classify 12": []}
    for steps in range(4):
        start = time.perf_counter()
        key = client("POST", "/tasks", {"init": "b", "texts": texts, "labels": labels, "steps": steps})[1]
        timings["create"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert client("POST", "/tasks", {"init": "b", "texts": texts, "labels": labels, "steps": steps})[1][
            "cached"
        ]
        timings["create (cached)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert client("POST", f"/tasks/{key['task_id']}/classify", {"texts": texts})[0] == 200
        timings["classify 12"].append(time.perf_counter() - start)
    print({k: f"median {sorted(v)[len(v) // 2] * 1000:.0f} ms" for k, v in timings.items()})


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_classify_requests_of_a_task_are_batched_and_answered_as_alone(client: Client) -> None:
    """Requests of different lengths, texts and top_k: in one batch their texts share encoder
    passes (padded to the longest), and each still gets what it gets alone."""
    key = client("POST", "/tasks", {"init": "a", **SUPPORT})[1]["task_id"]
    long = "why is my card still not here it has been two weeks since i ordered it"
    bodies = [{"texts": [*QUERIES[i % 3 :], long][: 1 + i % 4], "top_k": 1 + i % 3} for i in range(6)]
    alone = []
    for body in bodies:
        status, out = client("POST", f"/tasks/{key}/classify", body)
        assert (status, out["batch"]) == (200, 1), out
        alone.append(out["predictions"])
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: client("POST", f"/tasks/{key}/classify", b), bodies))
    assert [status for status, _ in together] == [200] * len(bodies)
    assert max(out["batch"] for _, out in together) > 1, [out["batch"] for _, out in together]
    assert [out["predictions"] for _, out in together] == alone


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_posts_of_one_new_task_share_one_adaptation(client: Client) -> None:
    body = {"init": "a", **SUPPORT, "steps": 3}
    before = client("GET", "/health", token=None)[1]["adaptations"]
    with ThreadPoolExecutor(4) as pool:
        posts = list(pool.map(lambda _: client("POST", "/tasks", body), range(4)))
    assert [status for status, _ in posts] == [200] * 4
    assert len({out["task_id"] for _, out in posts}) == 1
    assert len({tuple(out["support_loss"]) for _, out in posts}) == 1
    assert client("GET", "/health", token=None)[1]["adaptations"] == before + 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_task_created_through_one_replica_is_classified_through_another(
    client: Client, inits: dict[str, str], settings: ServeSettings
) -> None:
    """A second application with 2 replicas: classify the task until both the replica that
    created it (``cached``) and the other one (it adapts the task from the app's store) have
    answered; the answers are identical. Once the store has evicted the task, no replica answers
    it, not even one that still holds it adapted."""
    from ray import serve

    from metapeft_ray.on_ray.serve import build_app, start

    port = int(client.url.rsplit(":", 1)[1])
    app = build_app({"a": inits["a"]}, replace(settings, cache_size=4), num_replicas=2, num_cpus=0.25)
    two = Client(start(app, port=port, route_prefix="/two", name="two"))
    try:
        status, created = two("POST", "/tasks", {"init": "a", **SUPPORT})
        assert status == 200, created
        answers: dict[bool, list] = {True: [], False: []}
        for _ in range(40):
            status, out = two("POST", f"/tasks/{created['task_id']}/classify", {"texts": QUERIES})
            assert status == 200, out
            answers[out["cached"]].append(out["predictions"])
            if answers[True] and answers[False]:
                break
        assert answers[True] and answers[False], "40 requests all reached one replica"
        assert all(p == answers[True][0] for p in answers[True] + answers[False])
        # Four newer tasks evict it from the store (4 tasks); at least one replica still holds it
        # (each replica's cache holds 4 too), yet neither answers it any more.
        for steps in (0, 3, 4, 5):  # (the init's own is 2)
            status, out = two("POST", "/tasks", {"init": "a", **SUPPORT, "steps": steps})
            assert status == 200 and out["task_id"] != created["task_id"], out
        for _ in range(10):
            status, out = two("POST", f"/tasks/{created['task_id']}/classify", {"texts": QUERIES})
            assert status == 404 and "unknown task" in out["detail"], out
    finally:
        serve.delete("two")


def _serve_samples(ray_cluster: dict[str, str]) -> dict[str, float]:
    """``{"name{init}": value}`` of the ray_metapeft_serve_* samples on the node's metrics port
    (summed over the replicas that recorded them)."""
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict[str, float] = {}
    for m in re.finditer(r"^(ray_metapeft_serve_\w+)\{([^}]*)\} (\S+)$", text, flags=re.M):
        init = re.search(r'init="([^"]*)"', m.group(2))
        le = re.search(r'le="([^"]*)"', m.group(2))
        if le is None and init is not None:
            name = f"{m.group(1)}{{{init.group(1)}}}"
            samples[name] = samples.get(name, 0.0) + float(m.group(3))
    return samples


@pytest.mark.ray
@pytest.mark.slow
def test_serve_metrics_reach_the_nodes_metrics_endpoint(client: Client, ray_cluster: dict[str, str]) -> None:
    """Both latencies and both cache outcomes of init b, on Ray's metrics export port (Ray
    pushes them every 10 s); then one more cached classify raises the hit count."""
    from metapeft_ray.core.metrics import SERVE_METRICS, sample_names

    def wait_for(ok: Callable[[dict[str, float]], bool]) -> dict[str, float]:
        deadline = time.monotonic() + 60
        samples = _serve_samples(ray_cluster)
        while not ok(samples) and time.monotonic() < deadline:
            time.sleep(1)
            samples = _serve_samples(ray_cluster)
        return samples

    x, y = ({"init": "b", **SUPPORT, "steps": steps} for steps in (0, 1))
    for body in (x, y, x, x):  # the cache holds one task: y evicts x, the third post adapts x again
        key = client("POST", "/tasks", body)[1]["task_id"]
    assert client("POST", f"/tasks/{key}/classify", {"texts": QUERIES})[1]["cached"] is True
    want = {f"{name}{{b}}" for name in sample_names(SERVE_METRICS) if not name.endswith("_bucket")}
    samples = wait_for(lambda s: want <= set(s))
    assert want <= set(samples), sorted(want - set(samples))
    hits = "ray_metapeft_serve_task_cache_hits_total{b}"
    assert client("POST", f"/tasks/{key}/classify", {"texts": QUERIES})[1]["cached"] is True
    assert wait_for(lambda s: s[hits] > samples[hits])[hits] > samples[hits]
