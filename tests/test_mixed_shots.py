"""Mixed-shot meta-training: episode.train_shots deals the shots of the training episodes in turn
over the meta-batches; meta-validation stays at episode.k_shot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from metapeft_ray.core.config import Config, ConfigError, load_config
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from tests.tiny import tiny_overrides


@pytest.fixture
def tiny(tiny_backbone: str, tiny_dataset: str) -> tuple[str, str]:
    return tiny_backbone, tiny_dataset


def _config(tiny: tuple[str, str], *extra: str) -> Config:
    return load_config(
        None,
        [
            *tiny_overrides(*tiny),
            "meta.first_order=true",
            "meta.meta_batch_size=3",
            "episode.train_shots=[1,2]",
            *extra,
        ],
    )


def _flat(learner: MetaLearner) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in learner.meta_params.values()])


def test_training_episodes_take_the_shots_in_turn_and_validation_keeps_k_shot(tiny: tuple[str, str]) -> None:
    cfg = _config(tiny)
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    assert [s.k_shot for s in learner.train_specs(0)] == [1, 2, 1]
    assert [s.k_shot for s in learner.train_specs(1)] == [2, 1, 2]  # an odd batch still alternates
    assert {s.k_shot for s in learner.val_specs()} == {cfg.episode.k_shot}
    # the episodes hold those shots, on the classes and texts the spec's seed draws at any k
    plain = MetaLearner.from_config(_config(tiny, "episode.train_shots=[]"), learner.sampler)
    for mixed, fixed in zip(learner.train_specs(0), plain.train_specs(0), strict=True):
        episode, other = learner.sampler.build(mixed), learner.sampler.build(fixed)
        assert len(episode.support_texts) == mixed.k_shot * cfg.episode.n_way
        assert episode.class_names == other.class_names
    seen: list[int] = []
    learner.episode_observers.append(lambda spec, result, seconds: seen.append(spec.k_shot))
    before = _flat(learner)
    learner.meta_step()
    assert seen == [1, 2, 1] and not torch.equal(before, _flat(learner))
    # two ranks share one mixed meta-batch and take the single process's step
    single = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    single.meta_step()
    ranks = [MetaLearner.from_config(cfg, prepare_sampler(cfg)) for _ in range(2)]
    shares: list[Tensor] = []
    ranks[1].meta_step(rank=1, world=2, reduce=lambda t: shares.append(t.clone()) or t)
    ranks[0].meta_step(rank=0, world=2, reduce=lambda t: t + shares[0])
    torch.testing.assert_close(_flat(ranks[0]), _flat(single), rtol=1e-4, atol=1e-6)


def test_shots_that_cannot_be_drawn_are_refused_before_training(tiny: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="episode.train_shots"):
        _config(tiny, "episode.train_shots=[1,0]")
    with pytest.raises(ConfigError, match="train split: k_shot \\+ q_query = 53"):
        prepare_sampler(_config(tiny, "episode.train_shots=[1,50]"))
