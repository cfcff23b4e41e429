"""bcd: pluggable block-coordinate optimization for PyTorch, with BAdam as the reference composition."""

import importlib
from typing import Any

from bcd import plugins
from bcd.badam import BAdam
from bcd.blocks import Block, Partition
from bcd.contracts import ObservingOrdering, Ordering, Partitioner
from bcd.events import BlockSwitch
from bcd.expansion import LandscapeExpansion, landscape_expansion
from bcd.hookspecs import hookimpl
from bcd.optimizer import BlockCoordinateOptimizer, PrecisionNote
from bcd.schedule import BlockSchedule
from bcd.schedules import switch_warmup

__all__ = [
    "BAdam",
    "Block",
    "BlockCoordinateOptimizer",
    "BlockSchedule",
    "BlockSwitch",
    "LandscapeExpansion",
    "ObservingOrdering",
    "Ordering",
    "Partition",
    "Partitioner",
    "PrecisionNote",
    "hookimpl",
    "landscape_expansion",
    "memory",
    "plugins",
    "sharded",
    "switch_warmup",
    "testing",
]
__version__ = "0.1.0"

# Loaded on first use: `import bcd` loads the library alone (torch, pluggy, attrs). bcd.memory is
# the lab's estimate and measurement (bcd.lab.memory, it needs the lab extra); bcd.sharded loads
# torch.distributed.checkpoint.
_LAZY = {"memory": "bcd.lab.memory", "sharded": "bcd.sharded", "testing": "bcd.testing"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'bcd' has no attribute {name!r}")
