"""`metapeft` command line: thin wrappers over the recipes. Errors print one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from metapeft_ray.config import ConfigError, load_config, parse_override

CONFIG_HELP = "config YAML path or shipped name (quickstart, banking77_5w1s, ...)"
OVERRIDES_HELP = "dotted overrides, e.g. meta.inner_steps=3 peft.rank=4"


def _cmd_train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.local:
        from metapeft_ray.recipes import train_local

        report = train_local(cfg, progress=not args.quiet)
    else:
        from metapeft_ray.distributed import train_ray

        report = train_ray(cfg, address=args.address, workers=args.workers, progress=not args.quiet)
    _print_report(report)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from metapeft_ray.recipes import evaluate_adapter

    overrides = dict(parse_override(o) for o in args.overrides)
    _print_report(evaluate_adapter(args.adapter, overrides, args.out, progress=not args.quiet))


def _cmd_adapt(args: argparse.Namespace) -> None:
    from metapeft_ray.adapt import adapt_and_predict
    from metapeft_ray.data import load_dataset
    from metapeft_ray.export import load_adapter

    encoder, _, cfg, _ = load_adapter(args.adapter)
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
        steps=cfg.meta.inner_steps if args.steps is None else args.steps,
        lr=args.lr or cfg.meta.inner_lr,
        scale=cfg.model.head_scale,
    ):
        print(json.dumps(pred), flush=True)


def _cmd_check(args: argparse.Namespace) -> None:
    """Validate a config and its data without training (all errors at once)."""
    from metapeft_ray.train import prepare_sampler

    cfg = load_config(args.config, args.overrides)
    s = prepare_sampler(cfg).splits
    print(
        f"ok: {cfg.data.dataset} fold {s.fold}/{s.folds}: {len(s.train)} train, {len(s.val)} val, "
        f"{len(s.test)} test classes"
    )


def _lines(lines: Iterable[str]) -> Iterator[str]:
    return (line.rstrip("\n") for line in lines if line.strip())


def _print_report(report: dict) -> None:
    from metapeft_ray.evaluate import markdown_table

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
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="meta-test an exported init against the baselines")
    e.add_argument("--adapter", required=True, help="exported adapter dir or s3:// prefix")
    e.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.episodes=600")
    e.add_argument(
        "--out", default=None, help="where to write report.{json,md} (default: beside the adapter)"
    )
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    a = sub.add_parser("adapt", help="adapt an init to a support file and classify queries")
    a.add_argument("--adapter", required=True)
    a.add_argument("--support", required=True, help=".jsonl/.csv/.tsv with text and label columns")
    a.add_argument("--query", default=None, help="text file (one per line) or table; default: stdin")
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--text-column", default="text")
    a.add_argument("--label-column", default="label")
    a.set_defaults(func=_cmd_adapt)

    c = sub.add_parser("check", help="validate a config and its data, take no resources")
    c.add_argument("--config", default="quickstart", help=CONFIG_HELP)
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.set_defaults(func=_cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"metapeft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
