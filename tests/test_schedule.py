"""BlockSchedule, model-free: visits, block-epochs, the revisit rule, its state dict and checks."""

from __future__ import annotations

import pytest

from bcd import plugins
from bcd.schedule import BlockSchedule


def schedule(name: str = "ascending", num_blocks: int = 3, k: int = 2, **options) -> BlockSchedule:
    return BlockSchedule(ordering=plugins.create("ordering", name, options), num_blocks=num_blocks, switch_every=k)


def run(s: BlockSchedule, steps: int) -> list[tuple[int, int, int]]:
    """(active block, block-epoch, step in block) before each of ``steps`` steps."""
    seen = []
    for _ in range(steps):
        seen.append((s.active, s.block_epoch, s.step_in_block))
        s = s.step()
    return seen


def test_each_block_gets_k_steps_in_order_then_a_new_block_epoch():
    assert run(schedule(k=2), 8) == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (2, 0, 0), (2, 0, 1), (0, 1, 0), (0, 1, 1),
    ]


def test_global_step_counts_every_step_and_steps_are_values():
    start = schedule(k=3)
    later = start
    for _ in range(7):
        later = later.step()
    assert (later.global_step, later.block_epoch, later.position, later.step_in_block) == (7, 0, 2, 1)
    assert (start.global_step, start.active) == (0, 0)  # the original is unchanged


def test_random_order_is_redrawn_each_block_epoch():
    s = schedule("random", num_blocks=6, k=1, seed=3)
    orders = []
    for _ in range(3):
        orders.append(s.order)
        for _ in range(6):
            s = s.step()
    assert len(set(orders)) == 3 and all(sorted(o) == list(range(6)) for o in orders)


def test_the_revisit_rule_one_block_is_one_long_visit():
    s = schedule(num_blocks=1, k=2)
    nxt = s.step().step()
    assert nxt.block_epoch == 1 and nxt.step_in_block == 0 and nxt.continues(s)
    fixed = schedule("fixed", num_blocks=4, k=1, start_block=2)
    assert fixed.step().continues(fixed) and fixed.step().active == 2
    two = schedule(num_blocks=2, k=1)
    assert not two.step().continues(two)


def test_state_dict_round_trip_and_ordering_options():
    s = schedule("random", num_blocks=4, k=3, seed=9)
    for _ in range(14):
        s = s.step()
    saved = s.state_dict()
    assert saved["ordering_options"] == {"seed": 9, "start_block": None}
    assert schedule("random", num_blocks=4, k=3, seed=9).load(saved) == s


@pytest.mark.parametrize(
    "change,match",
    [
        ({"step_in_block": 3}, r"step_in_block is 3; accepted: 0 ... 2"),
        ({"step_in_block": -1}, r"step_in_block is -1; accepted: an integer >= 0"),
        ({"position": -1}, r"position is -1; accepted: an integer >= 0"),
        ({"position": 4}, r"position is 4; accepted: 0 ... 3"),
        ({"global_step": "7"}, r"global_step is '7'"),
        ({"block_epoch": True}, r"block_epoch is True"),
        ({"order": [3, 2, 1, 0]}, r"saved with order \[3, 2, 1, 0\], this optimizer's ordering gives"),
        ({"ordering_options": {"seed": 1, "start_block": None}}, r"ordering options \{'seed': 1"),
    ],
)
def test_a_bad_saved_schedule_is_refused(change, match):
    s = schedule("random", num_blocks=4, k=3, seed=9)
    with pytest.raises(ValueError, match=match):
        s.load({**s.state_dict(), **change})


def test_missing_key_is_refused():
    s = schedule()
    saved = s.state_dict()
    del saved["step_in_block"]
    with pytest.raises(ValueError, match=r"schedule has no 'step_in_block'"):
        s.load(saved)


def test_switch_every_is_checked():
    with pytest.raises(ValueError, match=r"switch_every: 0; accepted: an integer >= 1"):
        schedule(k=0)
