"""Mixed-shot meta-training: episode.train_shots deals the shots of the training episodes in turn
over the meta-batches; meta-validation stays at episode.k_shot."""

from __future__ import annotations

import pytest
import torch

from metapeft_ray.core.config import Config, ConfigError, load_config
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from tests.tiny import flat_meta_params, tiny_overrides, two_rank_meta_step


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
    before = flat_meta_params(learner)
    learner.meta_step()
    assert seen == [1, 2, 1] and not torch.equal(before, flat_meta_params(learner))
    # two ranks share one mixed meta-batch and take the single process's step
    single = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    single.meta_step()
    two_ranks = two_rank_meta_step(lambda: MetaLearner.from_config(cfg, prepare_sampler(cfg)))
    torch.testing.assert_close(two_ranks, flat_meta_params(single), rtol=1e-4, atol=1e-6)


def test_shots_that_cannot_be_drawn_are_refused_before_training(tiny: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="episode.train_shots"):
        _config(tiny, "episode.train_shots=[1,0]")
    with pytest.raises(ConfigError, match="train split: k_shot \\+ q_query = 53"):
        prepare_sampler(_config(tiny, "episode.train_shots=[1,50]"))
