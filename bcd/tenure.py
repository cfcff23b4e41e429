"""Which optimizer drives a model now, and handing the model back when it stops.

A model is driven by one :class:`bcd.BlockCoordinateOptimizer` at a time. Ownership is kept per
parameter (not per module), so a newer optimizer over the same model, or over a wrapper of it
(``nn.Sequential(model)``, DDP), finds the one it takes over from. An optimizer's :class:`Tenure`
holds what it must give back: the hooks it installed on the model and the candidates it froze.
Closing, or garbage collection, gives them back once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from bcd.activation import remove_all

# The optimizer that drives each parameter now, keyed by the tensor (not the module): a newer one
# over the same model, or over a wrapper of it (nn.Sequential(model), DDP), takes over.
_owners: WeakIdKeyDictionary = WeakIdKeyDictionary()


def owner_of(model: Any) -> Any:
    """The open optimizer that drives a parameter of ``model`` now, or None."""
    if not isinstance(model, nn.Module):
        return None
    for param in model.parameters():
        ref = _owners.get(param)
        owner = ref() if ref is not None else None
        if owner is not None and not owner.closed:
            return owner
    return None


def _let_go(hooks: list[RemovableHandle], trainable: list[nn.Parameter]) -> None:
    """Remove an optimizer's hooks from the model and make its candidates trainable again."""
    remove_all(hooks)
    for param in trainable:
        param.requires_grad_(True)


class Tenure:
    """One optimizer's hold on its model: its hooks, its candidates, and whether (why) it ended.

    Args:
        optimizer: the optimizer, held weakly; collecting it ends the tenure as :meth:`end` does.
        params: the candidates it drives, handed back trainable at the end.
    """

    def __init__(self, optimizer: Any, params: Iterable[nn.Parameter]) -> None:
        self.hooks: list[RemovableHandle] = []
        self.trainable = list(params)
        #: Why the tenure ended (what a later ``step()`` names), or None while it lasts.
        self.reason: str | None = None
        self.hold(optimizer, self.trainable)
        self._finalize = weakref.finalize(optimizer, _let_go, self.hooks, self.trainable)

    def hold(self, optimizer: Any, params: Iterable[nn.Parameter]) -> None:
        """Record ``optimizer`` as the one driving ``params`` (a wrapper's, after it replaced them)."""
        self.trainable[:] = params
        ref = weakref.ref(optimizer)
        for param in self.trainable:
            _owners[param] = ref

    def check_open(self) -> None:
        """Raises:
            ValueError: the tenure ended, naming why and what to do instead.
        """
        if self.reason is not None:
            raise ValueError(
                f"This optimizer is closed ({self.reason}); nothing was updated. Accepted: step the optimizer that "
                "drives the model now, or build a new one (load this one's state_dict() into it to continue)."
            )

    def end(self, reason: str) -> None:
        """Remove the hooks and make the candidates trainable again (the first call only)."""
        if self.reason is None:
            self.reason = reason
            self._finalize()


def check_unreplaced(model: nn.Module, candidates: Mapping[str, nn.Parameter], names: Sequence[str]) -> None:
    """Refuse to go on when the model's parameters were replaced (``load_state_dict(assign=True)``, a wrapper).

    Raises:
        ValueError: naming the first replaced parameter and what to do instead.
    """
    for name in names:
        if model.get_parameter(name) is not candidates[name]:
            raise ValueError(
                f"The model's parameters were replaced after the optimizer was built (e.g. {name!r}), by "
                "model.load_state_dict(..., assign=True) or a wrapper such as fully_shard; nothing was updated. "
                "Accepted: load weights in place (assign=False), or wrap the model first and build the optimizer "
                "over the wrapped model."
            )


def refuse_copy(optimizer: Any, *args: Any) -> None:
    """``copy``, ``deepcopy`` and ``pickle`` of an optimizer: refused, pointing to its state dict.

    Raises:
        TypeError: as pickle does for any object it cannot copy.
    """
    raise TypeError(
        f"A {type(optimizer).__name__} cannot be pickled or copied: it drives one live model. Accepted: save "
        "optimizer.state_dict() (with the model's), build a new optimizer over the model copy, load it there."
    )
