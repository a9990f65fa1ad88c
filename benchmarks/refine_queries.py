"""The transductive refinement (`head.query_refine`) on balanced and unbalanced query batches.

    python benchmarks/refine_queries.py --name refine_queries_hwu64 runs/refine/hwu64_f0_trained/adapter

On the exported init's meta-test episodes of every ``--alphas`` value (0: q_query queries of each
class; > 0: the queries split by Dirichlet(alpha) class shares, ``eval.query_alpha``), the
prototype head with class names is refined on the queries by each ``--variants`` setting
(iterations; ``pB`` for the estimated class shares of ``head.refine_prior`` with B pseudo-queries of
every class, ``head.refine_prior_counts``, ``p`` alone for B = 0) and paired with
the same head unrefined, on the meta-learned encoder (its init unadapted, from a cache) and on the
frozen backbone. No inner loop: a quick look at which refinement survives unbalanced batches, on
one embedding pass (minutes at one thread); the recipe's own meta-test (`metapeft evaluate ...
eval.query_alpha=A head.query_refine=N head.refine_prior=true head.refine_prior_counts=B`) is the
check.
"""

from __future__ import annotations

import argparse

from metapeft_ray.core import baselines
from metapeft_ray.core.evaluate import cell_name, episode_texts, mean_ci95, meta_test_specs, paired
from metapeft_ray.core.export import load_adapter
from metapeft_ray.core.train import prepare_sampler, prepare_test_sampler

from common import write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--name", required=True, help="results/<name>.{md,json}")
    ap.add_argument("--alphas", default="0,2,0.5", help="query_alpha values (0 = balanced)")
    ap.add_argument(
        "--variants", default="10,3,3p,3p1,3p3", help="iterations; pB: class shares, B pseudo-queries"
    )
    ap.add_argument("--cells", default="5,20", help="ways, at 1 shot")
    ap.add_argument("--episodes", type=int, default=200)
    args = ap.parse_args()
    encoder, _, cfg, _ = load_adapter(args.adapter)
    init = {k: v.detach().clone() for k, v in encoder.adapter_params().items()}
    test = prepare_test_sampler(cfg, prepare_sampler(cfg))
    alphas = [float(a) for a in args.alphas.split(",")]
    cells = [(int(n), 1) for n in args.cells.split(",")]
    specs = {
        a: meta_test_specs(
            test,
            cells=cells,
            q_query=cfg.eval.q_query,
            episodes=args.episodes,
            seed=cfg.run.seed,
            query_alpha=a,
        )
        for a in alphas
    }
    texts = episode_texts(test, {f"{a} {c}": s for a in alphas for c, s in specs[a].items()})
    encoders = {
        "meta-learned init": (
            baselines.EmbeddingCache(encoder, init, texts=texts),
            float(cfg.head.name_weight),
        ),
        "frozen backbone": (baselines.EmbeddingCache(encoder, texts=texts), 1.0),
    }
    variants = {v: _variant(v) for v in args.variants.split(",")}
    scale = float(cfg.head.scale)
    rows = []
    for a in alphas:
        for n, k in cells:
            episodes = [test.build(s) for s in specs[a][cell_name(n, k)]]
            for enc_name, (cache, name_weight) in encoders.items():
                scored = {
                    v: [
                        baselines.prototype_scorer(
                            cache, label_names=True, name_weight=name_weight, scale=scale, **kw
                        )(e)
                        for e in episodes
                    ]
                    for v, kw in {"0": {}, **variants}.items()
                }
                for v, values in scored.items():
                    row = {"query_alpha": a, "cell": cell_name(n, k), "encoder": enc_name, "refine": v}
                    row |= {"accuracy": mean_ci95(values)}
                    if v != "0":
                        row["vs_unrefined"] = paired(values, scored["0"])
                    rows.append(row)
    out = [
        "# The refinement on balanced and unbalanced query batches",
        "",
        f"`{args.adapter}`, {args.episodes} episodes a cell, the prototype head with class names at "
        f"scale {scale:.2f}; refine `N` = N soft k-means iterations, `NpB` with the estimated class "
        "shares (`head.refine_prior`), B pseudo-queries of every class (`head.refine_prior_counts`, "
        "none if no B); Δ = against the same head unrefined, paired (points ± 95 % CI).",
        "",
        "| queries | cell | encoder | " + " | ".join(["unrefined", *variants]) + " |",
        "|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    for (a, cell, enc_name), group in _groups(rows).items():
        shares = "balanced" if a == 0 else f"Dirichlet({a:g})"
        cols = [f"{100 * group['0']['accuracy']['mean']:.1f}"]
        for v in variants:
            d = group[v]["vs_unrefined"]
            cols.append(
                f"{100 * group[v]['accuracy']['mean']:.1f} ({100 * d['diff']:+.1f} ± {100 * d['ci95']:.1f})"
            )
        out.append(f"| {shares} | {cell} | {enc_name} | " + " | ".join(cols) + " |")
    write_result(args.name, {"adapter": args.adapter, "rows": rows}, "\n".join(out))
    return 0


def _variant(name: str) -> dict:
    """``"3"`` -> 3 plain iterations; ``"3p1"`` -> 3 with the class shares, 1 pseudo-query a class."""
    iterations, p, counts = name.partition("p")
    return {"refine": int(iterations), "refine_prior": float(counts or 0) if p else None}


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["query_alpha"], r["cell"], r["encoder"]), {})[r["refine"]] = r
    return groups


if __name__ == "__main__":
    raise SystemExit(main())
