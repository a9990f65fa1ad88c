"""Adaptation as a service on Ray Serve: post a support set, get a task; post texts, get labels.

Two deployments. `AdaptationServer` (FastAPI ingress, any number of replicas) serves named
exported inits (local directories or ``s3://`` prefixes, as `export.load_adapter` reads them,
each with optional overrides of its config, e.g. its query refinement):
a replica loads an init (its backbone and adapter) on first use and keeps at most
``max_inits_per_replica`` of them (`serve.multiplexed`). `TaskStore` (one replica, no CPU) holds
each task's `TaskSpec` (the init's name, the support set, the inner steps: texts, no tensors)
under ``task_id``, a hash of the three, in a bounded LRU cache with a TTL (`TaskCache`): a task
exists while the store holds it. Each server replica keeps the tasks it adapted in a cache of
the same bounds; one that has not adapted a task (another replica made it, or it was evicted
here) adapts it again from the store, deterministically, so every replica answers alike; one that
holds the task classifies while the store confirms that the task still exists.
Classification requests are batched per replica (`serve.batch`, ``max_batch_size`` requests
waiting at most ``batch_wait_s``) and a batch is computed per task: the texts of all its
requests for one task go through the encoder together. The maths is `adapt.adapt_to_support`
and `adapt.classify`, the inner loop training and ``metapeft adapt`` run; latencies and cache
hits go to `metrics` (``ray_metapeft_serve_*``).

Routes (JSON):

- ``GET /health`` -> ``{"status": "ok", "inits", "tasks", "adaptations", "threads"}`` (never
  needs the token; ``tasks``: adapted tasks in this replica, ``adaptations``: inner loops it ran)
- ``GET /inits`` -> ``{"inits": [{"name", "backbone", "method", "rank", ...}]}``
- ``POST /tasks`` ``{"init", "texts", "labels", "steps"?}`` -> ``{"task_id", "classes", ...}``
- ``POST /tasks/{task_id}/classify`` ``{"texts", "top_k"?}`` -> ``{"predictions": [...], "batch"}``
- ``POST /classify`` ``{"init", "texts", "labels", "steps"?, "queries", "top_k"?}``: one shot,
  nothing cached.

A prediction is ``{"label", "probability", "top_k": [{"label", "probability"}, ...]}``; ``batch``
is how many requests for the task were classified together with this one. A bad request gets a
4xx and ``{"detail": "<one line>"}``.
"""

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from metapeft_ray.core.adapt import AdaptedTask, adapt_to_support, classify
from metapeft_ray.core.config import parse_override
from metapeft_ray.core.data import LabelledTexts
from metapeft_ray.core.export import adapter_config, load_adapter, load_inner_lrs, local_adapter
from metapeft_ray.core.meta import InnerLoop
from metapeft_ray.core.metrics import record_serve_seconds, record_task_cache
from metapeft_ray.core.model import Encoder

APP_NAME = "metapeft"
MAX_ONGOING_REQUESTS = 32


@dataclass(frozen=True)
class ServeSettings:
    """Limits and options of one deployment. The token is read in each replica from the
    environment variable ``token_env`` or the file ``token_file``: only their names travel
    through Ray (a value passed here would be stored by the cluster and shown on its dashboard).
    A replica classifies up to ``max_batch_size`` requests together (1: no batching), waiting at
    most ``batch_wait_s`` after the first for the others."""

    cache_size: int = 64
    ttl_s: float = 3600.0
    max_inits_per_replica: int = 3
    max_texts: int = 256
    max_text_chars: int = 2000
    max_classes: int = 64
    max_steps: int = 50
    max_body_bytes: int = 2 << 20
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    token_env: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)} must be positive"
            for k in ("cache_size", "ttl_s")
            if getattr(self, k) <= 0
        ]
        if not 1 <= self.max_batch_size <= MAX_ONGOING_REQUESTS:
            problems.append(
                f"max_batch_size={self.max_batch_size}: give 1 (no batching) to "
                f"{MAX_ONGOING_REQUESTS} (the requests a replica takes at once)"
            )
        if self.batch_wait_s < 0:
            problems.append(f"batch_wait_s={self.batch_wait_s:g} must be 0 or more")
        if problems:
            raise ValueError("; ".join(problems))


# -- Ray-free parts ------------------------------------------------------------------------------


def task_id(init: str, support: LabelledTexts, steps: int) -> str:
    """The id of the task an init adapted to ``support`` with ``steps`` inner steps gives: a hash
    of all three, so the same support set (same texts, labels and order) gives the same id."""
    key = json.dumps([init, list(support.texts), list(support.labels), steps], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is made of: an init's name, a support set and the inner steps. Texts, no
    tensors: the `TaskStore` keeps it, and any replica adapts the same task from it."""

    init: str
    support: LabelledTexts
    steps: int

    @property
    def id(self) -> str:
        return task_id(self.init, self.support, self.steps)


V = TypeVar("V")


class TaskCache(Generic[V]):
    """At most ``size`` values, least recently used evicted first; a value older than ``ttl_s``
    (since it was put) is gone."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1 or ttl_s <= 0:
            raise ValueError(f"task cache: size={size} and ttl_s={ttl_s} must be positive")
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._values: OrderedDict[str, tuple[V, float]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if self.clock() - entry[1] > self.ttl_s:
            del self._values[key]
            return None
        self._values.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V) -> None:
        self._values[key] = (value, self.clock())
        self._values.move_to_end(key)
        while len(self._values) > self.size:
            self._values.popitem(last=False)

    def __len__(self) -> int:
        return len(self._values)


def read_token(token_env: str | None, token_file: str | None) -> str | None:
    """The bearer token, or None (no guard). The error names where it looked, never the value."""
    if token_env and token_file:
        raise ValueError("give the token by --token-env or by --token-file, not both")
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"--token-env {token_env}: the variable is unset or empty")
        return token
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise ValueError(f"--token-file {token_file}: {err.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {token_file}: the file is empty")
        return token
    return None


def describe_init(name: str, uri: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``GET /inits`` says of an exported init (read from its metadata; no weights loaded),
    served with ``overrides`` of its config. Raises FileNotFoundError / ValueError for a path that
    holds no exported init, or an override its config refuses (`config.ConfigError`)."""
    cfg, metadata = adapter_config(local_adapter(uri), dict(overrides or {}))
    return {
        "name": name,
        "uri": uri,
        "overrides": dict(overrides or {}),
        "backbone": cfg.model.backbone,
        "method": cfg.peft.method,
        "rank": cfg.peft.rank,
        "placement": cfg.peft.placement,
        "inner_steps": cfg.meta.inner_steps,
        "inner_lr": cfg.meta.inner_lr,
        "dataset": cfg.data.dataset,
        "meta_step": metadata.get("meta_step"),
        "meta_val_accuracy": metadata.get("metrics", {}).get("meta_val_accuracy"),
    }


# -- HTTP requests -------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SupportRequest(_Request):
    init: str
    texts: list[str]
    labels: list[str]
    steps: int | None = Field(None, ge=0)


class ClassifyRequest(_Request):
    texts: list[str]
    top_k: int = Field(3, ge=1)


class OneShotRequest(SupportRequest):
    queries: list[str]
    top_k: int = Field(3, ge=1)


R = TypeVar("R", bound=_Request)


def _reject(status: int, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail=reason)


@dataclass
class LoadedInit:
    encoder: Encoder
    params: dict[str, torch.Tensor]
    inner: InnerLoop
    param_lrs: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class _Query:
    """One request's texts to classify with an adapted task; a batch is computed per ``key``."""

    key: str
    init: str
    task: AdaptedTask
    texts: tuple[str, ...]
    top_k: int


def computed_together(queries: Sequence[_Query]) -> list[list[int]]:
    """The indices of a batch's queries whose texts one `classify` call takes together: those of
    the same task, each on its own for a task that refines its head on the texts it is given
    (``head.query_refine``)."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.key, []).append(i)
    alone = [[[i] for i in g] if queries[g[0]].task.refine else [g] for g in groups.values()]
    return [part for parts in alone for part in parts]


def _classify_all(encoder: Encoder, task: AdaptedTask, texts: list[str], top_k: int) -> list[dict[str, Any]]:
    return list(classify(encoder, task, texts, top_k=top_k))


def _prediction(pred: dict[str, Any], top_k: int) -> dict[str, Any]:
    return {"label": pred["label"], "probability": pred["confidence"], "top_k": pred["top"][:top_k]}


@serve.deployment(
    name="TaskStore", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
)
class TaskStore:
    """The app's tasks, shared by all `AdaptationServer` replicas: ``task_id -> TaskSpec``
    within the cache's bounds. One replica: it is the only copy (async methods: the replica's
    event loop runs one at a time)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.tasks: TaskCache[TaskSpec] = TaskCache(size, ttl_s)

    async def put(self, key: str, spec: TaskSpec) -> None:
        self.tasks.put(key, spec)

    async def get(self, key: str) -> TaskSpec | None:
        return self.tasks.get(key)


# No /docs, /redoc or /openapi.json: the token guards every route but /health, and those would
# be open (the routes are in this module's docstring and the README).
app = FastAPI(title="metapeft adaptation service", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="AdaptationServer", max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class AdaptationServer:
    """Adapts named inits to posted support sets and classifies texts with the adapted tasks."""

    def __init__(
        self,
        adapters: Mapping[str, str],
        settings: ServeSettings,
        store: DeploymentHandle,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        from metapeft_ray.core.model import quiet_transformers

        quiet_transformers()
        self.adapters, self.settings, self.store = dict(adapters), settings, store
        self.overrides = {name: dict((overrides or {}).get(name, {})) for name in self.adapters}
        self.infos = {
            name: describe_init(name, uri, self.overrides[name]) for name, uri in self.adapters.items()
        }
        self.token = read_token(settings.token_env, settings.token_file)
        # task id -> (the init's name, the task adapted from it)
        self.tasks: TaskCache[tuple[str, AdaptedTask]] = TaskCache(settings.cache_size, settings.ttl_s)
        # torch.func.functional_call swaps the module's tensors while it runs, so two threads
        # must not run one encoder at once: one computation at a time per replica, always on the
        # same thread (it uses all of torch's intra-op threads anyway, and a second thread would
        # start a second OpenMP team competing for the same cores).
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="metapeft-compute")
        self._adapting: dict[str, asyncio.Future[AdaptedTask]] = {}
        self.adaptations = 0  # inner loops run by this replica, for /health

        # Functions, not methods: serve.multiplexed and serve.batch keep state on them, and
        # these take their bounds from the settings.
        async def init(name: str) -> LoadedInit:
            return await self._load_init(name)

        async def classify_batch(queries: list[_Query]) -> list[tuple[list, int]]:
            return await self._classify_batch(queries)

        self._init = serve.multiplexed(max_num_models_per_replica=settings.max_inits_per_replica)(init)
        self._classify_batched = serve.batch(
            max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.batch_wait_s
        )(classify_batch)

    async def _load_init(self, name: str) -> LoadedInit:
        def load() -> LoadedInit:
            from metapeft_ray.core.train import inner_loop

            uri = self.adapters[name]
            encoder, _, cfg, _ = load_adapter(uri, self.overrides[name])
            params = {k: v.detach() for k, v in encoder.adapter_params().items()}
            return LoadedInit(encoder, params, inner_loop(cfg), load_inner_lrs(uri, encoder.device))

        return await self._run(load)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    # -- request checks: each raises a 4xx with a one-line reason ---------------------------------

    async def _read(self, request: Request, model: type[R]) -> R:
        self._authorize(request)
        size = request.headers.get("content-length")
        limit = self.settings.max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            raise _reject(413, f"request body of {size} bytes is over the limit of {limit}")
        body = await request.body()
        if len(body) > limit:
            raise _reject(413, f"request body of {len(body)} bytes is over the limit of {limit}")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _reject(400, f"malformed JSON: {err}") from None
        try:
            return model.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise _reject(422, f"{where}: {first['msg']}{more}") from None

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def _texts(self, texts: list[str], field: str) -> tuple[str, ...]:
        s = self.settings
        if not texts:
            raise _reject(422, f"{field}: no texts")
        if len(texts) > s.max_texts:
            raise _reject(413, f"{field}: {len(texts)} texts, over the limit of {s.max_texts} per request")
        for i, text in enumerate(texts):
            if not text.strip():
                raise _reject(422, f"{field}[{i}]: empty text")
            if len(text) > s.max_text_chars:
                raise _reject(
                    422, f"{field}[{i}]: {len(text)} characters, over the limit of {s.max_text_chars}"
                )
        return tuple(texts)

    def _spec(self, req: SupportRequest) -> TaskSpec:
        if req.init not in self.infos:
            raise _reject(404, f"unknown init {req.init!r}; this service has {sorted(self.infos)}")
        texts = self._texts(req.texts, "texts")
        if len(req.labels) != len(texts):
            raise _reject(422, f"labels: {len(req.labels)} labels for {len(texts)} texts")
        classes = set(req.labels)
        if len(classes) < 2:
            raise _reject(
                422, f"labels: the support set has {len(classes)} class; adaptation needs at least 2"
            )
        if len(classes) > self.settings.max_classes:
            raise _reject(
                422, f"labels: {len(classes)} classes, over the limit of {self.settings.max_classes}"
            )
        if any(not label.strip() for label in req.labels):
            raise _reject(422, "labels: empty label")
        steps = self.infos[req.init]["inner_steps"] if req.steps is None else req.steps
        if steps > self.settings.max_steps:
            raise _reject(422, f"steps: {steps} inner steps, over the limit of {self.settings.max_steps}")
        return TaskSpec(req.init, LabelledTexts("request", texts, tuple(req.labels)), steps)

    # -- computations (under the replica's lock, off the event loop) ------------------------------

    async def _adapt(self, spec: TaskSpec) -> AdaptedTask:
        init = await self._init(spec.init)
        inner = replace(init.inner, steps=spec.steps)
        start = time.perf_counter()
        task = await self._run(
            lambda: adapt_to_support(init.encoder, init.params, spec.support, inner, param_lrs=init.param_lrs)
        )
        record_serve_seconds("adaptation", time.perf_counter() - start, init=spec.init)
        self.adaptations += 1
        return task

    async def _adapted(self, key: str, spec: TaskSpec) -> tuple[AdaptedTask, bool]:
        """The task this replica adapted before (True), or adapts now and keeps (False). Requests
        that miss the same task meanwhile wait for that one adaptation (shielded: a client that
        goes away does not cancel it for the others)."""
        held = self.tasks.get(key)
        record_task_cache(held is not None, init=spec.init)
        if held is not None:
            return held[1], True
        pending = self._adapting.get(key)
        if pending is None:
            pending = self._adapting[key] = asyncio.ensure_future(self._adapt(spec))
            pending.add_done_callback(lambda _: self._adapting.pop(key, None))
        task = await asyncio.shield(pending)
        self.tasks.put(key, (spec.init, task))
        return task, False

    async def _classify(self, query: _Query) -> tuple[list, int]:
        """The query's predictions, and how many requests its batch computed together."""
        start = time.perf_counter()
        out = await self._classify_batched(query)
        record_serve_seconds("classify", time.perf_counter() - start, init=query.init)
        return out

    async def _classify_batch(self, queries: list[_Query]) -> list[tuple[list, int]]:
        """`serve.batch`'s handler: one encoder pass per task over the texts of all its requests,
        then each request gets its own texts' predictions back. A text's embedding does not
        depend on the texts beside it (attention masks) except through padding, at float
        rounding (~1e-7 measured on MiniLM, under the 4 decimals the probabilities are given in).
        A task with ``head.query_refine`` refines its head on the texts classified together, so
        each of its requests is computed on its own: one request's texts never move another's."""
        out: list[tuple[list, int]] = [([], 0)] * len(queries)
        for together in computed_together(queries):
            first = queries[together[0]]
            init = await self._init(first.init)
            texts = [t for i in together for t in queries[i].texts]
            top_k = max(queries[i].top_k for i in together)
            preds = iter(await self._run(partial(_classify_all, init.encoder, first.task, texts, top_k)))
            for i in together:
                q = queries[i]
                out[i] = ([_prediction(next(preds), q.top_k) for _ in q.texts], len(together))
        return out

    # -- routes -----------------------------------------------------------------------------------

    @app.get("/health")
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "inits": len(self.infos),
            "tasks": len(self.tasks),
            "adaptations": self.adaptations,
            "threads": torch.get_num_threads(),
        }

    @app.get("/inits")
    def inits(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"inits": list(self.infos.values())}

    @app.post("/tasks")
    async def create_task(self, request: Request) -> dict[str, Any]:
        req = await self._read(request, SupportRequest)
        spec = self._spec(req)
        key = spec.id
        start = time.perf_counter()
        task, cached = await self._adapted(key, spec)
        await self.store.put.remote(key, spec)  # (again: posting a task renews its TTL)
        return {
            "task_id": key,
            "init": spec.init,
            "classes": list(task.classes),
            "steps": spec.steps,
            "support_loss": [round(x, 6) for x in task.adapted.support_losses],
            "cached": cached,
            "seconds": round(time.perf_counter() - start, 4),
        }

    @app.post("/tasks/{key}/classify")
    async def classify_texts(self, key: str, request: Request) -> dict[str, Any]:
        req = await self._read(request, ClassifyRequest)
        texts = self._texts(req.texts, "texts")
        start = time.perf_counter()
        # The store says whether the task exists. A task this replica holds is classified while
        # the store answers; its predictions go out only if the store still has the task.
        stored = self.store.get.remote(key)
        held = self.tasks.get(key)
        early = (
            None
            if held is None
            else asyncio.ensure_future(self._classify(_Query(key, *held, texts, req.top_k)))
        )
        spec = await stored
        if spec is None:
            if early is not None:
                early.cancel()
            raise _reject(
                404,
                f"unknown task {key!r}: never created or evicted (cache of "
                f"{self.settings.cache_size}, TTL {self.settings.ttl_s:g} s); POST /tasks again",
            )
        task, cached = await self._adapted(key, spec)
        predictions, batch = await (early or self._classify(_Query(key, spec.init, task, texts, req.top_k)))
        return {
            "task_id": key,
            "predictions": predictions,
            "cached": cached,
            "batch": batch,
            "seconds": round(time.perf_counter() - start, 4),
        }

    @app.post("/classify")
    async def one_shot(self, request: Request) -> dict[str, Any]:
        req = await self._read(request, OneShotRequest)
        spec = self._spec(req)
        queries = self._texts(req.queries, "queries")
        start = time.perf_counter()
        task = await self._adapt(spec)
        predictions, batch = await self._classify(_Query(spec.id, spec.init, task, queries, req.top_k))
        return {
            "init": spec.init,
            "classes": list(task.classes),
            "steps": spec.steps,
            "predictions": predictions,
            "batch": batch,
            "seconds": round(time.perf_counter() - start, 4),
        }


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{name: path}``; names are unique and URL-safe."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH (a directory or s3:// prefix)")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"--adapter {spec!r}: the name may hold letters, digits, '-', '_' and '.'")
        if name in adapters:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = uri
    if not adapters:
        raise ValueError("give at least one --adapter NAME=PATH")
    return adapters


def parse_overrides(specs: list[str], adapters: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``["NAME:section.key=value", ...]`` -> ``{name: {dotted key: value}}``: an init served with
    its config overridden (e.g. ``head.query_refine=3``); NAME is one of ``adapters``."""
    overrides: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, item = spec.partition(":")
        if not sep or name not in adapters:
            known = ", ".join(adapters)
            raise ValueError(f"--set {spec!r}: expected NAME:section.key=value with NAME one of {known}")
        key, value = parse_override(item)
        overrides.setdefault(name, {})[key] = value
    return overrides


def build_app(
    adapters: Mapping[str, str],
    settings: ServeSettings,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1,
) -> serve.Application:
    """The Serve application (``serve.run`` it); each init (with its ``overrides``) is checked here
    first, so a wrong path or override fails before any replica starts."""
    overrides = {name: dict(o) for name, o in (overrides or {}).items()}
    if unknown := sorted(set(overrides) - set(adapters)):
        raise ValueError(f"overrides for {unknown}, which are not served; served: {sorted(adapters)}")
    for name, uri in adapters.items():
        try:
            describe_init(name, uri, overrides.get(name))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"--adapter {name}={uri}: {err}") from None
    deployment = AdaptationServer.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    store = TaskStore.bind(settings.cache_size, settings.ttl_s)
    return deployment.bind(dict(adapters), settings, store, overrides)


def start(
    app: serve.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    name: str = APP_NAME,
) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (on the Ray this process is connected to) and
    run ``app`` as ``name``; returns its URL once every replica is up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def builder_args(
    args: Mapping[str, Any],
) -> tuple[dict[str, str], ServeSettings, dict[str, dict[str, Any]]]:
    """Check `app_builder`'s ``args`` offline (no init is read): ``{"adapters": {NAME: PATH},
    "overrides"?: {NAME: {section.key: value}}, <a ServeSettings field>: value, ...}``; every
    problem is in one ValueError. Returns the adapters, the settings and the overrides."""
    rest = dict(args)
    adapters = rest.pop("adapters", None)
    overrides = rest.pop("overrides", None) or {}
    problems = []
    if not isinstance(adapters, dict) or not adapters:
        problems.append("adapters: a mapping NAME: PATH (directory or s3:// prefix) of at least one init")
        adapters = {}
    else:
        try:
            parse_adapters([f"{k}={v}" for k, v in adapters.items()])
        except ValueError as err:
            problems.append(f"adapters: {err}")
    if not isinstance(overrides, dict) or not all(
        name in adapters and isinstance(o, dict) for name, o in overrides.items()
    ):
        problems.append(
            f"overrides: {overrides!r} is not a mapping NAME: {{section.key: value}} of served inits"
        )
    defaults = ServeSettings()
    for key, value in rest.items():
        if key not in {f.name for f in fields(ServeSettings)}:
            allowed = ", ".join(["adapters", *(f.name for f in fields(ServeSettings))])
            problems.append(f"{key}: unknown key; allowed: {allowed}")
            continue
        want = type(getattr(defaults, key))  # int, float, or str for the optional token fields
        if want is float:  # the ranges: ServeSettings checks them
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str if want is type(None) else want) and not isinstance(value, bool)
        if not ok:
            kind = {int: "an integer", float: "a number"}.get(want, "a string")
            problems.append(f"{key}: {value!r} is not {kind}")
    if not problems:
        try:
            floats = {f.name for f in fields(ServeSettings) if isinstance(getattr(defaults, f.name), float)}
            settings = ServeSettings(**{k: float(v) if k in floats else v for k, v in rest.items()})
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("metapeft serve args: " + "; ".join(problems))
    return adapters, settings, overrides


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path: metapeft_ray.on_ray.serve:app_builder`` with ``args`` as in `builder_args`, for
    ``serve run`` / ``serve deploy`` config files and KubeRay's RayService
    (``deploy/kuberay/rayservice.yaml``). Replicas and resources come from the config's
    ``deployments`` section (deployment name ``AdaptationServer``)."""
    adapters, settings, overrides = builder_args(args)
    return build_app(adapters, settings, overrides=overrides)
