"""How many actors a backfill starts, and what each asks Ray for."""

from __future__ import annotations

import pytest

from sidecar.backfill_ray import Plan


def test_cpu_workers_take_a_core_each() -> None:
    plan = Plan(workers=3)
    assert (plan.actors, plan.actor_resources()) == (3, {"num_cpus": 1})


def test_gpu_actors_share_their_gpu_a_core_each() -> None:
    plan = Plan(gpus=2, actors_per_gpu=4)
    assert plan.actors == 8
    assert plan.actor_resources() == {"num_cpus": 1, "num_gpus": 0.25}
    assert Plan(gpus=1).actor_resources() == {"num_cpus": 1, "num_gpus": 1.0}


@pytest.mark.parametrize(
    "kwargs", [{"workers": 0}, {"gpus": -1}, {"actors_per_gpu": 0}, {"batch_size": 0}]
)
def test_a_plan_out_of_bounds_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Plan(**kwargs)
