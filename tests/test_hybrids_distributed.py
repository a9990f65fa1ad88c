"""A non-LoRA hybrid on a real local Ray: 2 workers == the single-process MetaLearner.

The bottleneck adapter (our own module, not peft's) with Meta-SGD (extra meta-parameters, the
log learning rates, that travel through the same flat all-reduce and are checkpointed beside the
adapter): the distributed run's final adapter init and learned rates equal the single-process
ones for the same seed and meta-batch, and the exported adapter loads with `load_bottleneck`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metapeft_ray.core import runstore, storage
from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.runstore import run_uri
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from metapeft_ray.on_ray import distributed
from tests.tiny import tiny_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 3


def hybrid_cfg(backbone: str, dataset: str, output_dir: str) -> Config:
    overrides = {
        "run.name": "hybrid-bottleneck-metasgd",
        "run.output_dir": output_dir,
        "run.seed": 5,
        "peft.method": "bottleneck",
        "peft.placement": "attn_ffn_out",
        "peft.bottleneck_dim": 4,
        "meta.algorithm": "metasgd",
        "meta.first_order": True,
        "meta.inner_steps": 1,
        "meta.metasgd_outer_lr": 0.1,
        "meta.outer_lr": 0.01,
        "meta.meta_steps": STEPS,
        "meta.meta_batch_size": 4,
        "meta.val_every": STEPS,
        "meta.checkpoint_every": STEPS,
        "eval.episodes": 2,
        "distributed.workers": 2,
        "distributed.max_failures": 0,
    }
    return load_config(None, tiny_overrides(backbone, dataset, **overrides))


def test_bottleneck_metasgd_two_workers_equal_single_process(  # noqa: ANN001
    ray_cluster, tiny_backbone, tiny_dataset, tmp_path
) -> None:
    cfg = hybrid_cfg(tiny_backbone, tiny_dataset, str(tmp_path / "runs"))
    single = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    for _ in single.iterate(STEPS, val_every=cfg.meta.val_every):
        pass

    report = distributed.train_ray(cfg, progress=False)
    assert report["meta_step"] == STEPS
    uri = run_uri(cfg)
    record = runstore.read_record(uri)
    state = runstore.load_state(storage.join(uri, record["checkpoint"]))
    got = {**state["adapter"], **state["extra_meta_params"]}
    want = {k: v.detach().cpu() for k, v in single.meta_params.items()}
    assert got.keys() == want.keys() and any(k.startswith("log_lr/") for k in got)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), (k, (got[k] - want[k]).abs().max())
    # the rates were really learned (moved off meta.inner_lr), and exported beside the adapter
    assert any(
        not torch.allclose(v.exp(), torch.tensor(cfg.meta.inner_lr))
        for k, v in got.items()
        if k.startswith("log_lr/")
    )
    adapter = Path(uri) / "adapter"
    assert {"bottleneck_adapter.safetensors", "bottleneck_config.json", "metasgd_lrs.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }
