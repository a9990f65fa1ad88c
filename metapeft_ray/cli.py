"""`metapeft` command line: thin wrappers over the recipes. Errors print one clear line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from metapeft_ray.core.config import ConfigError, load_config, parse_override

CONFIG_HELP = "config YAML path or shipped name (quickstart, banking77, fewshot, cross_clinc150)"
OVERRIDES_HELP = "dotted overrides, e.g. meta.inner_steps=3 peft.rank=4"


def _quiet_unless_verbose(args: argparse.Namespace) -> None:
    """A command that loads the backbone prints no loading bars or library deprecation warnings
    unless ``--verbose`` (`model.quiet_transformers`)."""
    if not args.verbose:
        from metapeft_ray.core.model import quiet_transformers

        quiet_transformers()


def _cmd_train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.metrics_port is not None:
        if not args.local:
            raise ValueError(
                "--metrics-port serves a --local run's metrics; on Ray every node exports them on "
                "its --metrics-export-port (see docs/cluster.md)"
            )
        from metapeft_ray.core.metrics import serve_local

        port = serve_local(args.metrics_port, args.metrics_host)
        print(f"metapeft: metrics on http://{args.metrics_host}:{port}/metrics", file=sys.stderr)
    _quiet_unless_verbose(args)
    if args.local:
        from metapeft_ray.core.recipes import train_local

        report = train_local(cfg, progress=not args.quiet)
    else:
        from metapeft_ray.on_ray.distributed import train_ray

        report = train_ray(
            cfg, address=args.address, workers=args.workers, progress=not args.quiet, verbose=args.verbose
        )
    _print_report(report)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from metapeft_ray.core.recipes import evaluate_adapter

    overrides = dict(parse_override(o) for o in args.overrides)
    _quiet_unless_verbose(args)
    _print_report(evaluate_adapter(args.adapter, overrides, args.out, progress=not args.quiet))


def _cmd_adapt(args: argparse.Namespace) -> None:
    from metapeft_ray.core.adapt import adapt_and_predict
    from metapeft_ray.core.data import load_dataset
    from metapeft_ray.core.export import load_adapter, load_inner_lrs
    from metapeft_ray.core.train import inner_loop

    _quiet_unless_verbose(args)
    encoder, _, cfg, _ = load_adapter(args.adapter, dict(parse_override(o) for o in args.overrides))
    inner = inner_loop(cfg, args.steps, args.lr)
    support = load_dataset(args.support, args.text_column, args.label_column)
    if args.query and args.query.endswith((".jsonl", ".csv", ".tsv")):
        queries = iter(load_dataset(args.query, args.text_column, args.label_column).texts)
    else:
        queries = _lines(
            Path(args.query).read_text(encoding="utf-8").splitlines() if args.query else sys.stdin
        )
    for pred in adapt_and_predict(
        encoder,
        encoder.adapter_params(),
        support,
        queries,
        inner,
        # Meta-SGD's learned per-tensor rates, unless --lr asks for one scalar rate
        param_lrs=None if args.lr else load_inner_lrs(args.adapter, encoder.device),
    ):
        print(json.dumps(pred), flush=True)


def _cmd_tune(args: argparse.Namespace) -> int:
    from metapeft_ray.on_ray.tune import SearchInterrupted, run_search

    cfg = load_config(args.config, args.overrides)
    try:
        report = run_search(
            cfg, args.space, address=args.address, resume=args.resume, progress=not args.quiet
        )
    except SearchInterrupted as err:
        print(f"metapeft tune: {err}", file=sys.stderr)
        return 130
    if "best" in report:
        best = report["best"]
        print(f"best trial {best['trial']}: meta-val accuracy {best['meta_val_accuracy']:.3f}")
        _print_report({"results": best["meta_test"], "splits": {"dataset": cfg.data.dataset}})
    return 0


def _cmd_check(args: argparse.Namespace) -> None:
    """Validate a config, its data, its output location and its adapter placement without
    training, loading weights or touching the network (each part's errors at once)."""
    from metapeft_ray.core import storage
    from metapeft_ray.core.model import check_adapter
    from metapeft_ray.core.train import prepare_sampler

    cfg = load_config(args.config, args.overrides)
    storage.check_uri(cfg.run.output_dir, "run.output_dir")  # its shape only: no credentials
    s = prepare_sampler(cfg).splits
    adapter, note = check_adapter(cfg)
    if s.source:
        where = f"splits from {s.source}"
    else:
        where = f"fold {s.fold}/{s.folds}" if cfg.eval.dataset is None else "all classes (no fold held out)"
    line = f"ok: {cfg.data.dataset} {where}: {len(s.train)} train, {len(s.val)} val"
    if cfg.eval.dataset is None:
        line += f", {len(s.test)} test classes; {len(s.excluded)} excluded"
    else:
        line += f" classes; {len(s.excluded)} excluded; test classes from eval.dataset={cfg.eval.dataset}"
    print(line)
    if adapter:
        print(adapter)
    if note:
        print(f"metapeft check: note: {note}", file=sys.stderr)


def _cmd_submit(args: argparse.Namespace) -> int:
    from metapeft_ray.on_ray import jobs

    submission = jobs.prepare_submission(
        args.run_command,
        config=args.config,
        overrides=args.overrides,
        adapter=args.adapter,
        working_dir=args.working_dir,
        env_vars=jobs.build_env_vars(args.env, s3_endpoint=args.s3_endpoint_env),
        pip=args.pip,
        space=args.space,
    )
    client = jobs.JobsClient(args.address)
    job_id = client.submit(submission, submission_id=args.job_id)
    print(job_id, flush=True)
    if not args.follow:
        print(
            f"metapeft: submitted {submission.entrypoint!r}; follow it with "
            f"`metapeft jobs logs {job_id} --follow --address {client.address}`",
            file=sys.stderr,
        )
        return 0
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:  # noqa: ANN001 - a jobs.JobsClient
    try:
        status = client.follow(job_id)
    except KeyboardInterrupt:
        print(f"\nmetapeft: stopped following; job {job_id} keeps running", file=sys.stderr)
        return 130
    print(f"metapeft: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    from metapeft_ray.on_ray import jobs

    client = jobs.JobsClient(args.address)
    if args.action == "list":
        for job in sorted(client.list(), key=lambda j: j.start_time or 0):
            print(jobs.describe(job))
    elif args.action == "status":
        info = client.info(args.job_id)
        print(f"{args.job_id}\t{info.status}\t{info.message or ''}".rstrip())
    elif args.action == "logs":
        if args.follow:
            return _follow(client, args.job_id)
        print(client.logs(args.job_id), end="")
    elif args.action == "stop":
        stopped = client.stop(args.job_id)
        print(f"{args.job_id}\t{'stopping' if stopped else 'not running: ' + client.status(args.job_id)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    import ray
    from ray import serve as ray_serve

    from metapeft_ray.on_ray import serve
    from metapeft_ray.on_ray.distributed import connect

    settings = serve.ServeSettings(
        cache_size=args.cache_size,
        ttl_s=args.ttl,
        max_inits_per_replica=args.max_inits,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        token_env=args.token_env,
        token_file=args.token_file,
    )
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # the embedded Ray's replicas read this process's environment and files
        serve.read_token(settings.token_env, settings.token_file)
    adapters = serve.parse_adapters(args.adapter)
    overrides = serve.parse_overrides(args.set, adapters)
    app = serve.build_app(
        adapters, settings, overrides=overrides, num_replicas=args.replicas, num_cpus=args.num_cpus
    )
    cfg = load_config(None, ["distributed.workers=1"])  # only its distributed.local_* size a local Ray
    started = connect(cfg, address, quiet=not args.verbose)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
    try:
        url = serve.start(app, host=args.host, port=args.port)
        print(f"metapeft: serving {', '.join(adapters)} on {url} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("metapeft: stopping", file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray_serve.delete(serve.APP_NAME)
            if started:
                ray.shutdown()
    return 0


def _lines(lines: Iterable[str]) -> Iterator[str]:
    return (line.rstrip("\n") for line in lines if line.strip())


def _print_report(report: dict) -> None:
    from metapeft_ray.core.evaluate import markdown_table

    print(markdown_table(report["results"], f"meta-test on {report['splits']['dataset']}"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metapeft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train an adapter init, export it, meta-test it")
    t.add_argument("--config", default="quickstart", help=CONFIG_HELP)
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--local", action="store_true", help="single process, no Ray (for debugging)")
    t.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    t.add_argument("--workers", type=int, default=None, help="Ray workers (default: distributed.workers)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or validation lines")
    t.add_argument(
        "--verbose",
        action="store_true",
        help="also Ray's and transformers' own info and warnings (default: only their errors)",
    )
    t.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="with --local: serve Prometheus metrics (ray_metapeft_*) on this port (0: a free one)",
    )
    t.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    t.set_defaults(func=_cmd_train)

    _add_submit_parser(sub)
    _add_jobs_parser(sub)

    e = sub.add_parser("evaluate", help="meta-test an exported init against the baselines")
    e.add_argument("--adapter", required=True, help="exported adapter dir or s3:// prefix")
    e.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.episodes=600")
    e.add_argument(
        "--out", default=None, help="where to write report.{json,md} (default: beside the adapter)"
    )
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--verbose", action="store_true", help="transformers' own info and warnings too")
    e.set_defaults(func=_cmd_evaluate)

    a = sub.add_parser("adapt", help="adapt an init to a support file and classify queries")
    a.add_argument("--adapter", required=True)
    a.add_argument("--support", required=True, help=".jsonl/.csv/.tsv with text and label columns")
    a.add_argument("--query", default=None, help="text file (one per line) or table; default: stdin")
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--text-column", default="text")
    a.add_argument("--label-column", default="label")
    a.add_argument("--verbose", action="store_true", help="transformers' own info and warnings too")
    a.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the init's config, e.g. head.query_refine=3 head.refine_prior=true",
    )
    a.set_defaults(func=_cmd_adapt)

    u = sub.add_parser("tune", help="Ray Tune search of the PEFT config, scored on meta-val episodes")
    u.add_argument("--config", default="quickstart", help=CONFIG_HELP)
    u.add_argument("--space", default="default", help="search-space YAML (default: the shipped one)")
    u.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    u.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    u.add_argument(
        "--resume", action="store_true", help="continue an interrupted search of the same run.name"
    )
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=_cmd_tune)

    _add_serve_parser(sub)

    c = sub.add_parser("check", help="validate a config and its data, take no resources")
    c.add_argument("--config", default="quickstart", help=CONFIG_HELP)
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.set_defaults(func=_cmd_check)
    return p


ADDRESS_HELP = "the Ray job API, http://HEAD:8265 (default: RAY_ADDRESS)"


def _add_submit_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "submit",
        help="run train, evaluate or tune on a Ray cluster as a Ray job; prints the job id",
        description=(
            "Submit `metapeft COMMAND --config CONFIG OVERRIDES` as a Ray job. The config is "
            "validated here first. With RAY_AUTH_MODE=token the token comes from RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Nothing from this shell's environment is "
            "copied to the job unless named with --env or --s3-endpoint-env: the job's runtime "
            "env is stored by the cluster and shown on its dashboard, so prefer credentials "
            "that live on the nodes (instance role, Kubernetes Secret)."
        ),
    )
    s.add_argument("--config", default="quickstart", help=CONFIG_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument("--command", dest="run_command", choices=("train", "evaluate", "tune"), default="train")
    s.add_argument("--adapter", default=None, help="with --command evaluate: the exported adapter")
    s.add_argument(
        "--space", default=None, help="with --command tune: the search-space YAML (default: shipped)"
    )
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.add_argument(
        "--working-dir",
        default=None,
        help="upload this directory and run the job in it (default: none, the cluster runs its "
        "installed metapeft_ray, e.g. the project image)",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="a job environment variable; KEY alone copies this shell's value. Secrets are only "
        "sent when named here, and are then visible on the dashboard",
    )
    s.add_argument(
        "--s3-endpoint-env",
        action="store_true",
        help="forward AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION "
        "(not credentials) from this shell",
    )
    s.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job")
    s.add_argument("--job-id", default=None, help="submission id to use (default: generated)")
    s.add_argument("--follow", action="store_true", help="stream the logs; exit 1 unless SUCCEEDED")
    s.set_defaults(func=_cmd_submit)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "serve",
        help="adaptation as a service on Ray Serve: post a support set, get a task; post texts, get labels",
        description="Serve exported inits over HTTP (see README, 'Serving adapted tasks') until "
        "interrupted, then delete the application (and stop the embedded Ray, if one was started).",
    )
    v.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="NAME=PATH",
        help="an exported init (directory or s3:// prefix) served as NAME; repeat for several",
    )
    v.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="serve init NAME with its config overridden, e.g. b77:head.query_refine=3 (one init may be "
        "served under two names, each with its own settings); repeat for several",
    )
    v.add_argument("--host", default="127.0.0.1", help="HTTP address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    v.add_argument(
        "--token-env",
        default=None,
        metavar="VAR",
        help="require `Authorization: Bearer "
        "$VAR` on every route but /health; VAR is read on the replicas' nodes",
    )
    v.add_argument("--token-file", default=None, help="the same, the token read from this file")
    v.add_argument("--cache-size", type=int, default=64, help="tasks kept (LRU), in the app and per replica")
    v.add_argument("--ttl", type=float, default=3600.0, help="seconds a task is kept after it was posted")
    v.add_argument("--max-inits", type=int, default=3, help="inits loaded at once per replica")
    v.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="classify requests a replica computes together (per task; 1: no batching)",
    )
    v.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill after its first one"
    )
    v.add_argument("--replicas", type=int, default=1)
    v.add_argument(
        "--num-cpus", type=float, default=1, help="CPUs per replica (Ray gives it as many torch threads)"
    )
    v.add_argument("--verbose", action="store_true", help="Ray's own info logs too")
    v.set_defaults(func=_cmd_serve)


def _add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    actions = j.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help=ADDRESS_HELP)
    actions.add_parser("list", parents=[common], help="all jobs of the cluster")
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("job_id", metavar="JOB")
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
    j.set_defaults(func=_cmd_jobs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"metapeft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
