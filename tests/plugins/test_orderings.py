"""Built-in orderings: pure functions of their options and the block-epoch."""

from __future__ import annotations

import pytest

from bcd import plugins


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
