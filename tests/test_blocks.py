"""Block and Partition values."""

from __future__ import annotations

import pytest

from bcd import Block, Partition


def test_partition_refuses_overlap_duplicates_and_emptiness():
    with pytest.raises(ValueError, match=r"parameter 'w' is in block 'a' and in block 'b'"):
        Partition.from_groups({"a": ["w"], "b": ["w", "v"]})
    with pytest.raises(ValueError, match=r"two blocks are named 'a'"):
        Partition((Block(name="a", param_names=["w"]), Block(name="a", param_names=["v"])))
    with pytest.raises(ValueError, match=r"no blocks"):
        Partition(())
    with pytest.raises(ValueError, match=r"block 'a': it has no parameters"):
        Block(name="a", param_names=[])


def test_partition_lookup_and_fingerprint():
    p = Partition.from_groups([["w"], ["v", "u"]])
    assert p.index("block.1") == 1 and len(p) == 2 and p.param_names == ("w", "v", "u")
    assert p.fingerprint() == [["block.0", "w"], ["block.1", "v", "u"]]
    with pytest.raises(ValueError, match=r"Unknown block name: 'x'; the blocks are \['block.0', 'block.1'\]"):
        p.index("x")
