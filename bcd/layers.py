"""Find a model's repeated layer stacks by structure, not by parameter names.

Llama keeps its layers in ``model.layers``, GPT-2 in ``transformer.h``, BERT in
``encoder.layer``, T5 in ``encoder.block`` and ``decoder.block``. What they share is structure:
a ``nn.ModuleList`` (or ``nn.Sequential``) whose children that hold parameters are all of one
type. The outermost such containers are the stacks; containers nested inside a layer (MoE
experts, T5's sub-layers) belong to that layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from torch import nn


@attrs.frozen(kw_only=True)
class LayerStack:
    """A repeated stack of layers.

    Attributes:
        prefix: qualified name of the container, ``""`` when it is the model itself.
        layer_names: qualified names of the layers that hold candidate parameters, in order.
    """

    prefix: str
    layer_names: tuple[str, ...]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _holds(module_name: str, param_names: set[str]) -> bool:
    start = module_name + "."
    return any(name.startswith(start) for name in param_names)


def find_layer_stacks(model: nn.Module, param_names: set[str] | Mapping[str, object]) -> list[LayerStack]:
    """The outermost layer stacks of ``model``, in registration order.

    Args:
        model: the model.
        param_names: the candidate parameter names; children holding none of them are ignored.

    Returns:
        The stacks found; empty when the model has none. A model that is itself a
        ``nn.Sequential`` or ``nn.ModuleList`` with two children or more that hold parameters is one
        stack of them, whatever their types; with one (``nn.Sequential(model)``, a wrapper) it is
        looked into like any module.
    """
    names = set(param_names)
    stacks: list[LayerStack] = []

    def children_with_params(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (_join(prefix, name), child)
            for name, child in module.named_children()
            if _holds(_join(prefix, name), names)
        ]

    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        layers = children_with_params("", model)
        if len(layers) >= 2:
            return [LayerStack(prefix="", layer_names=tuple(name for name, _ in layers))]

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qualified = _join(prefix, name)
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                layers = children_with_params(qualified, child)
                minimum = 1 if isinstance(child, nn.ModuleList) else 2
                if len(layers) >= minimum and len({type(layer) for _, layer in layers}) == 1:
                    stacks.append(LayerStack(prefix=qualified, layer_names=tuple(n for n, _ in layers)))
                    continue
            visit(qualified, child)

    visit("", model)
    return stacks
