"""bcd: pluggable block-coordinate optimization for PyTorch, with BAdam as the reference composition."""

from bcd import plugins
from bcd.badam import BAdam
from bcd.blocks import Block, Partition
from bcd.events import BlockSwitch
from bcd.hookspecs import hookimpl
from bcd.optimizer import BlockCoordinateOptimizer, PrecisionNote

__all__ = [
    "BAdam",
    "Block",
    "BlockCoordinateOptimizer",
    "BlockSwitch",
    "Partition",
    "PrecisionNote",
    "hookimpl",
    "plugins",
]
__version__ = "0.1.0"
