"""A third-party bcd plugin: the ``halves`` partitioner.

Two blocks: the lower half of the model's layers (with the embedding) and the upper half (with
the head). Install with ``pip install ./examples/bcd-halves`` and use it by name::

    bcd.BlockCoordinateOptimizer(model, partitioner="halves")
"""

from __future__ import annotations

import attrs
import bcd
from bcd.layers import find_layer_stacks


@attrs.frozen(kw_only=True)
class Halves:
    """Split the parameters, in model order, where the layer stack is cut in two."""

    dynamic = False

    def partition(self, model, params, epoch):
        layers = [layer for stack in find_layer_stacks(model, params) for layer in stack.layer_names]
        if len(layers) < 2:
            raise ValueError(f"Invalid model for 'halves': {len(layers)} layer(s) found; accepted: 2 or more.")
        names = list(params)
        cut_layer = layers[len(layers) // 2]
        cut = next(i for i, n in enumerate(names) if n.startswith(cut_layer + "."))
        return bcd.Partition.from_groups({"lower": names[:cut], "upper": names[cut:]})


@bcd.hookimpl
def register_partitioners(register):
    register("halves", Halves)
