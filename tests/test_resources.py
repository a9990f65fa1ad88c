"""What a run asks the cluster for, decided from a described cluster (no Ray): GPU workers when
the cluster has GPUs or can scale to nodes that have them, the resources of one Tune trial, and
whether the workers can ever be placed (nodes as ``ray.nodes()`` gives them, plus the node types
an autoscaler may add)."""

from __future__ import annotations

import pytest

from metapeft_ray.core.config import ConfigError, load_config
from metapeft_ray.core.space import TuneSettings, load_space
from metapeft_ray.on_ray.distributed import (
    ClusterCapacityError,
    ClusterView,
    check_capacity,
    worker_resources,
)
from metapeft_ray.on_ray.tune import DRIVER_MEMORY, trial_resources

CPU_LAPTOP = ClusterView({"CPU": 2.0, "memory": 8e9})
GPU_NODE = ClusterView({"CPU": 16.0, "GPU": 1.0})
# deploy/kuberay/raycluster.yaml at its start: the head (num-cpus 0) alone, a GPU group at 0
# replicas (max 4) that the autoscaler publishes as a node type.
KUBERAY_AT_ZERO = ClusterView(
    {"memory": 4e9}, node_types=(({"memory": 4e9}, 1), ({"CPU": 8.0, "GPU": 1.0, "memory": 3e10}, 4))
)
# A GPU type the autoscaler may not start (max_count 0) brings no GPU.
GPU_TYPE_DISABLED = ClusterView({"CPU": 4.0}, node_types=(({"CPU": 8.0, "GPU": 1.0}, 0),))
GPU_TYPE_UNBOUNDED = ClusterView({"CPU": 4.0}, node_types=(({"CPU": 8.0, "GPU": 8.0}, -1),))


@pytest.mark.parametrize(
    ("cluster", "use_gpu", "expected"),
    [
        (CPU_LAPTOP, "auto", False),
        (GPU_NODE, "auto", True),
        (KUBERAY_AT_ZERO, "auto", True),
        (GPU_TYPE_DISABLED, "auto", False),
        (GPU_TYPE_UNBOUNDED, "auto", True),
        (KUBERAY_AT_ZERO, "no", False),
        (CPU_LAPTOP, "yes", True),
    ],
)
def test_use_gpu_auto_counts_what_the_cluster_can_scale_to(
    cluster: ClusterView, use_gpu: str, expected: bool
) -> None:
    cfg = load_config(
        "quickstart", [f"distributed.use_gpu={use_gpu}", "distributed.resources_per_worker={w: 1}"]
    )
    got, per_worker = worker_resources(cfg, cluster)
    assert got is expected
    assert per_worker == {"CPU": 1.0, "w": 1.0, **({"GPU": 1.0} if expected else {})}


def test_use_gpu_reads_yaml_booleans() -> None:
    assert load_config("quickstart", ["distributed.use_gpu=true"]).distributed.use_gpu == "yes"
    assert load_config("quickstart", ["distributed.use_gpu=off"]).distributed.use_gpu == "no"


def test_a_worker_keeps_its_own_gpu_request() -> None:
    cfg = load_config("quickstart", ["distributed.resources_per_worker={GPU: 0.5}"])
    assert worker_resources(cfg, KUBERAY_AT_ZERO) == (True, {"CPU": 1.0, "GPU": 0.5})


@pytest.mark.parametrize(
    ("gpus", "cluster", "expected"),
    [
        ("auto", CPU_LAPTOP, 0.0),
        ("auto", GPU_NODE, 1.0),
        ("auto", KUBERAY_AT_ZERO, 1.0),
        (0.25, KUBERAY_AT_ZERO, 0.25),
        (2, GPU_NODE, 2.0),
        (0, GPU_NODE, 0.0),
    ],
)
def test_single_process_trials_get_gpus_where_the_cluster_has_them(
    gpus: object, cluster: ClusterView, expected: float
) -> None:
    s = TuneSettings(trial_cpus=2, trial_gpus=gpus)
    assert trial_resources(s, cluster) == {"cpu": 2.0, "gpu": expected}


def test_a_distributed_trial_process_only_waits() -> None:
    s = TuneSettings(trial_workers=2)
    assert trial_resources(s, GPU_NODE) == {"cpu": 0, "memory": DRIVER_MEMORY}


def test_trial_gpus_errors_name_the_field_the_value_and_the_fix(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"tune.trial_gpus=0.5.*no GPU.*set tune.trial_gpus to 0 or auto"):
        trial_resources(TuneSettings(trial_gpus=0.5), CPU_LAPTOP)
    base = load_config("quickstart")
    space = tmp_path / "space.yaml"
    for value, fix in ((1.5, "whole number"), (-1, "fraction of one GPU"), ("many", "auto")):
        space.write_text(f"search:\n  peft.rank: {{choice: [4]}}\ntune: {{trial_gpus: {value}}}\n")
        with pytest.raises(ConfigError, match=f"tune.trial_gpus.*{fix}"):
            load_space(space, base)
    space.write_text("search:\n  peft.rank: {choice: [4]}\ntune: {trial_gpus: 1, trial_workers: 2}\n")
    with pytest.raises(ConfigError, match=r"tune.trial_gpus=1.*trial_workers=2.*distributed.use_gpu"):
        load_space(space, base)


def test_capacity_is_counted_node_by_node() -> None:
    two_nodes = [{"CPU": 4.0}, {"CPU": 3.0}]
    assert check_capacity(3, {"CPU": 2}, nodes=two_nodes) == 3  # 2 + 1: a worker cannot span nodes
    with pytest.raises(ClusterCapacityError, match=r"at most 3 \(cluster total CPU=7\); use at most 3 "):
        check_capacity(4, {"CPU": 2}, nodes=two_nodes)
    with pytest.raises(ClusterCapacityError, match=r"no node \(type\) can hold even one worker"):
        check_capacity(1, {"CPU": 1, "GPU": 1}, nodes=two_nodes)
    with pytest.raises(ClusterCapacityError, match=r"tune.trial_workers"):
        check_capacity(8, {"CPU": 1}, nodes=two_nodes, field="tune.trial_workers")


def test_capacity_counts_what_the_autoscaler_may_add() -> None:
    head = [{"CPU": 0.0, "memory": 4e9}]
    gpu_group = [({"CPU": 8.0, "GPU": 1.0}, 4)]
    assert check_capacity(4, {"CPU": 1, "GPU": 1}, nodes=head, types=gpu_group) == 4
    with pytest.raises(ClusterCapacityError, match=r"nodes and the autoscaler's node types hold at most 4"):
        check_capacity(5, {"CPU": 1, "GPU": 1}, nodes=head, types=gpu_group)
    unbounded = [({"CPU": 8.0, "GPU": 8.0}, -1)]
    assert check_capacity(100, {"CPU": 1, "GPU": 1}, nodes=head, types=unbounded) == float("inf")
    with pytest.raises(ClusterCapacityError, match="no node"):  # no type brings a TPU
        check_capacity(1, {"CPU": 1, "TPU": 1}, nodes=head, types=unbounded)
