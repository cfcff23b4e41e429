"""Built-in orderings: pure functions of their options and the block-epoch."""

from __future__ import annotations

import pytest

from bcd import plugins
from bcd.observe import Observations


def order(name, num_blocks, epoch, **options):
    return plugins.create("ordering", name, options).order(num_blocks, epoch)


def test_ascending_and_descending_with_start_block():
    assert order("ascending", 4, 0) == [0, 1, 2, 3]
    assert order("ascending", 4, 0, start_block=2) == [2, 3, 0, 1]
    assert order("descending", 4, 0) == [3, 2, 1, 0]
    assert order("descending", 4, 0, start_block=1) == [1, 0, 3, 2]


@pytest.mark.parametrize("name", ["ascending", "descending"])
def test_start_block_keeps_the_visits_one_cycle_across_block_epochs(name):
    visits = [b for epoch in range(3) for b in order(name, 4, epoch, start_block=2)]
    assert visits[:4] == order(name, 4, 1, start_block=2) == order(name, 4, 2, start_block=2)
    assert all(a != b for a, b in zip(visits, visits[1:])), visits
    cycle = visits[:4]
    assert visits == cycle * 3 and sorted(cycle) == [0, 1, 2, 3]


def test_random_reshuffles_every_block_epoch_reproducibly():
    orders = [order("random", 8, epoch, seed=3) for epoch in range(4)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert orders == [order("random", 8, epoch, seed=3) for epoch in range(4)]
    assert order("random", 8, 0, seed=4) != orders[0]
    assert order("random", 8, 0, seed=3, start_block=5)[0] == 5


def test_fixed_is_one_block_forever():
    assert order("fixed", 5, 0, start_block=3) == order("fixed", 5, 9, start_block=3) == [3]


@pytest.mark.parametrize("name", ["ascending", "descending", "random", "fixed"])
def test_start_block_out_of_range_is_refused(name):
    with pytest.raises(ValueError, match=r"start_block: 4; accepted: a block index 0 ... 3 or a block name"):
        order(name, 4, 0, start_block=4)


def importance(num_blocks, epoch, norms, **options):
    observed = Observations(grad_norm=norms, visits=[0 if n is None else 1 for n in norms])
    return plugins.create("ordering", "importance", options).order(num_blocks, epoch, observed)


def test_importance_visits_every_block_first_then_draws_by_gradient_norm():
    assert sorted(importance(4, 0, [None] * 4, seed=1)) == [0, 1, 2, 3]
    # Block 3's gradient norm is 97% of the total: with mix 0 it gets about 97% of 4000 draws.
    draws = [b for epoch in range(1, 1001) for b in importance(4, epoch, [1.0, 1.0, 1.0, 97.0], seed=1, mix=0.0)]
    assert 0.95 < draws.count(3) / len(draws) < 0.99
    # mix 1 is uniform whatever was observed.
    uniform = [b for epoch in range(1, 1001) for b in importance(4, epoch, [1.0, 1.0, 1.0, 97.0], seed=1, mix=1.0)]
    assert all(0.22 < uniform.count(b) / len(uniform) < 0.28 for b in range(4))
    # mix keeps every block's chance at mix / D or more: here 0.5 / 4 = 12.5%.
    mixed = [b for epoch in range(1, 1001) for b in importance(4, epoch, [0.0, 1.0, 1.0, 97.0], seed=1)]
    assert 0.10 < mixed.count(0) / len(mixed) < 0.15


def test_importance_is_a_pure_function_of_options_arguments_and_observations():
    norms = [3.0, 1.0, 2.0, 0.5]
    assert importance(4, 5, norms, seed=2) == importance(4, 5, norms, seed=2)
    assert len({tuple(importance(4, e, norms, seed=2)) for e in range(1, 9)}) > 1
    assert importance(4, 5, norms, seed=2) != importance(4, 5, norms, seed=3) or \
        importance(4, 6, norms, seed=2) != importance(4, 6, norms, seed=3)


@pytest.mark.parametrize("name", ["random", "importance"])
@pytest.mark.parametrize("seed", [None, 1.5, "7", True])
def test_a_seed_that_is_not_an_integer_is_refused_at_construction(name, seed):
    with pytest.raises(ValueError, match=rf"Invalid seed: {seed!r}; accepted: an integer\."):
        plugins.create("ordering", name, {"seed": seed})


@pytest.mark.parametrize("mix", [-0.1, 1.5, "half", True])
def test_importance_mix_out_of_range_is_refused(mix):
    with pytest.raises(ValueError, match=rf"Invalid mix: {mix!r}; accepted: a number from 0 to 1"):
        plugins.create("ordering", "importance", {"mix": mix})
