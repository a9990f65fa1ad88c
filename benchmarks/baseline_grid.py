"""Choose the fine-tuning baselines' learning rates on meta-validation classes, never on test ones.

    python benchmarks/baseline_grid.py --dataset banking77 --episodes 40

Scores the adapter fine-tune (the PEFT method from peft's default init) and the full fine-tune
with Adam at each learning rate of a small grid, next to logistic regression on the frozen
backbone, on the same 5-way 1- and 5-shot episodes of fold 0's meta-val classes. The defaults of
``eval.finetune`` and ``eval.full_finetune`` are the best learning rates found here.
"""

from __future__ import annotations

import argparse

import torch

from metapeft_ray.core import baselines
from metapeft_ray.core.config import load_config
from metapeft_ray.core.evaluate import markdown_table, meta_test
from metapeft_ray.core.meta import InnerLoop
from metapeft_ray.core.model import encoder_from_config
from metapeft_ray.core.train import prepare_sampler

from common import set_threads, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="banking77")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--adapter-steps", type=int, default=20)
    p.add_argument("--full-steps", type=int, default=10)
    p.add_argument("--adapter-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--full-lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    cfg = load_config(
        None,
        [f"data.dataset={args.dataset}", "data.folds=3", "data.fold=0", "eval.n_way=5", "eval.shots=[1,5]"]
        + ["meta.first_order=true"],  # sdpa attention, as the fine-tuning baselines run at meta-test
    )
    sampler = prepare_sampler(cfg)
    torch.manual_seed(cfg.run.seed)
    encoder = encoder_from_config(cfg)
    default = {k: v.detach().clone() for k, v in encoder.adapter_params().items()}
    scale = cfg.head.scale
    scorers: dict[str, baselines.Scorer] = {
        "logreg": baselines.logreg_scorer(baselines.EmbeddingCache(encoder))
    }
    for lr in args.adapter_lrs:
        scorers[f"adapter fine-tune, {args.adapter_steps} Adam steps, lr {lr:g}"] = baselines.adapted_scorer(
            encoder, default, InnerLoop.finetune(args.adapter_steps, lr, scale)
        )
    for lr in args.full_lrs:
        scorers[f"full fine-tune, {args.full_steps} Adam steps, lr {lr:g}"] = baselines.full_finetune_scorer(
            encoder, InnerLoop.finetune(args.full_steps, lr, scale)
        )
    results = meta_test(
        scorers,
        sampler,
        cells=cfg.eval.cells,
        q_query=cfg.eval.q_query,
        episodes=args.episodes,
        costly_episodes=args.episodes,
        seed=cfg.run.seed,
        split="val",
        progress=True,
    )
    title = f"Baseline learning rates on {args.dataset} fold 0 meta-val classes ({len(sampler.splits.val)})"
    write_result(
        "baseline_grid",
        {"results": results, "args": vars(args)},
        f"# {title}\n\n{markdown_table(results, title)}",
    )


if __name__ == "__main__":
    main()
