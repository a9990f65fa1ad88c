"""Supervised pre-meta-training: the first meta.pretrain_steps outer updates score labelled batches
of the meta-train classes against every class name, then the episodic steps take over."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn import functional as F

from metapeft_ray.core.config import Config, ConfigError, load_config
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from tests.tiny import (
    flat_meta_params,
    make_tiny_backbone,
    make_tiny_dataset,
    tiny_overrides,
    two_rank_meta_step,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


def _config(tiny: tuple[str, str], *extra: str) -> Config:
    return load_config(
        None,
        [
            *tiny_overrides(*tiny),
            "head.label_names=true",
            'head.learn=["scale"]',
            "meta.first_order=true",
            "meta.pretrain_steps=2",
            "meta.pretrain_batch=7",
            *extra,
        ],
    )


def test_a_labelled_batch_is_an_all_way_zero_shot_episode_drawn_from_its_seed(tiny: tuple[str, str]) -> None:
    sampler = prepare_sampler(_config(tiny))
    batch = sampler.labelled_batch("train", 7, seed=0, step=3)
    assert batch.class_names == sampler.splits.train and not batch.support_texts
    assert len(batch.query_texts) == 7 and len(set(batch.query_texts)) == 7  # without replacement
    by_class = sampler.data.by_class()
    for text, label in zip(batch.query_texts, batch.query_labels, strict=True):
        assert text in {sampler.data.texts[i] for i in by_class[batch.class_names[label]]}
    assert batch == sampler.labelled_batch("train", 7, seed=0, step=3)
    assert batch.query_texts != sampler.labelled_batch("train", 7, seed=0, step=4).query_texts
    everything = sampler.labelled_batch("train", 10_000, seed=0, step=0)
    assert Counter(everything.query_labels) == Counter(
        {k: len(by_class[c]) for k, c in enumerate(sampler.splits.train)}
    )


def test_the_first_steps_are_supervised_and_two_ranks_take_the_same_step(tiny: tuple[str, str]) -> None:
    cfg = _config(tiny)
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    episodes: list[int] = []
    learner.episode_observers.append(lambda spec, result, seconds: episodes.append(spec.step))
    # by hand: unit-norm embeddings, so the name-prior head's logits are 2 s cos(text, name) + const
    batch = learner.sampler.labelled_batch("train", 7, seed=cfg.run.seed, step=0)
    with torch.no_grad():
        texts, names = (
            learner.encoder.embed(learner.params, learner.encoder.tokenize(t))
            for t in (batch.query_texts, batch.name_texts)
        )
    logits = 2 * cfg.head.scale * texts @ names.T
    labels = torch.tensor(batch.query_labels)
    before = flat_meta_params(learner)
    first = learner.meta_step()
    assert first["meta_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert first["query_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert not episodes and not torch.equal(
        before, flat_meta_params(learner)
    )  # the adapter and the scale moved
    # rank 1's share summed into rank 0's gives the single process's update
    two_ranks = two_rank_meta_step(lambda: MetaLearner.from_config(cfg, prepare_sampler(cfg)))
    torch.testing.assert_close(two_ranks, flat_meta_params(learner), rtol=1e-4, atol=1e-6)
    # after meta.pretrain_steps the meta-batches of episodes take over
    learner.meta_step()
    assert not episodes
    learner.meta_step()
    assert episodes == [2] * cfg.meta.meta_batch_size


def test_pretraining_needs_the_names_and_counts_within_the_meta_steps(tiny: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="set head.label_names=true or meta.pretrain_steps=0"):
        _config(tiny, "head.label_names=false", "head.learn=[]")
    with pytest.raises(ConfigError, match="raise meta.meta_steps to 5"):
        _config(tiny, "meta.pretrain_steps=5")
