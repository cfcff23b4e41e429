r"""What training one block costs: one model, used to size bcd's buffers and to estimate memory.

Which tensors need fp32 master copies (bf16 and fp16 ones), what the inner solver keeps per
tensor (learnt from the solver itself, so a plugin's counts as torch's do), how much fp32
gradient is cast at once, and from these the bytes of each kind a block asks for:

- **masters**: :math:`4m_{low}`, fp32 copies of the block's low-precision elements; in the lean
  precision (no fp32 copies kept) one chunk of the largest entry, the fp32 scratch it is stepped in;
- **gradient**: the fp32 gradient cast at once, :math:`4\min(n, C)` for Adam and AdamW stepped
  in row chunks of :math:`C` = :data:`GRADIENT_CHUNK` elements, :math:`4n` for another torch
  solver stepped one tensor at a time (:math:`n` the largest low-precision entry), the block's
  whole low-precision part for a solver stepped once over the block;
- **moments**: the solver's per-element state, e.g. :math:`8m` for Adam's :math:`m` and :math:`v`;
- **moments8**: with ``lean="8bit"``, the 8-bit moments of the entries that keep them
  (:mod:`bcd.quantized`): one byte per element and key, an fp32 scale per :data:`QUANT_BLOCK`, and
  the fp32 chunk they are dequantized into while stepped. Not a buffer: allocated per visit.

:class:`bcd.buffers.Buffers` allocates the largest block's figures once
(:func:`plan_buffers`); ``bcd.lab.memory`` reports the same figures, in bytes, by category.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch

from bcd.blocks import entry_numel, parse_entry
from bcd.distributed import sharded

LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Elements of fp32 gradient cast at a time when Adam or AdamW is stepped in row chunks (16 MB).
GRADIENT_CHUNK = 2**22
#: Elements per 8-bit quantization block (one fp32 scale each), and the smallest entry quantized:
#: bitsandbytes' 8-bit optimizers' choices (:mod:`bcd.quantized`).
QUANT_BLOCK = 256
QUANT_MIN_NUMEL = 4096
# Solvers whose state bcd may create in its own buffers: every per-element entry starts at zero
# (Adam's m, v and AMSGrad's max v) and the step count is a scalar that starts at zero.
PREFILLED = (torch.optim.Adam, torch.optim.AdamW)


def needs_master(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored in a precision too low for the solver to update in place."""
    return param.dtype in LOW_PRECISION


def keeps_master(param: torch.Tensor, lean: bool | str) -> bool:
    """Whether bcd keeps an fp32 copy of ``param`` while its block is active: a low-precision one, unless
    ``lean`` (a 0-d one still gets its one-element copy: it has no rows to step in chunks)."""
    return needs_master(param) and not (lean and param.ndim >= 1)


def quantizes(param: torch.Tensor, numel: int, lean: bool | str) -> bool:
    """Whether an entry of ``numel`` elements of ``param`` keeps 8-bit moments: ``lean="8bit"``, a
    low-precision tensor with rows (stepped in chunks, no master) and at least :data:`QUANT_MIN_NUMEL`."""
    return lean == "8bit" and needs_master(param) and param.ndim >= 1 and numel >= QUANT_MIN_NUMEL


def chunk_rows(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows of a tensor of ``shape`` stepped at once in row chunks: at most :data:`GRADIENT_CHUNK` elements, one row at least."""
    return max(1, GRADIENT_CHUNK // max(1, int(torch.Size(shape[1:]).numel())))


def streams(solver: torch.optim.Optimizer) -> bool:
    """Whether ``solver`` updates each tensor independently, so it may be stepped tensor by tensor.

    True for torch's own optimizers but LBFGS (which couples every tensor through its closure);
    a plugin's solver is stepped once over the block, the safe choice for any arithmetic.
    """
    return type(solver).__module__.startswith("torch.optim") and not isinstance(solver, torch.optim.LBFGS)


@attrs.frozen(kw_only=True)
class SolverLayout:
    """What a solver keeps for each tensor it steps, learnt from one throwaway step.

    Attributes:
        per_element: the keys kept with the tensor's shape, with their bytes per element.
        whole: every other key (Adam's step count), with its value after a zero-gradient step;
            tensors are zeroed, so a copy is the state of a tensor not stepped yet.
        streamed: how bcd casts the fp32 gradient for it: ``"chunk"`` (Adam, AdamW: row chunks),
            ``"tensor"`` (other torch solvers: one tensor at a time) or ``"block"`` (at once).
    """

    per_element: Mapping[str, int]
    whole: Mapping[str, Any]
    streamed: str

    @property
    def bytes_per_element(self) -> int:
        return sum(self.per_element.values())

    @property
    def bytes_per_tensor(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.whole.values() if isinstance(v, torch.Tensor))

    @property
    def keys(self) -> set[str]:
        """Every key it keeps per tensor."""
        return {*self.per_element, *self.whole}

    def is_per_element(self, key: str) -> bool | None:
        """Whether ``key`` is kept with the tensor's shape (True), whole (False), or not kept at all (None)."""
        return True if key in self.per_element else False if key in self.whole else None

    def fresh(self) -> dict[str, Any]:
        """The scalar state of a tensor not stepped yet (copies; per-element keys are the caller's)."""
        return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in self.whole.items()}


def solver_layout(factory: Callable[..., torch.optim.Optimizer], options: Mapping[str, Any] | None = None,
                  hyper: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> SolverLayout:
    """Step ``factory([{**hyper, "params": [t]}], **options)`` once on a 2-element zero tensor ``t``
    with a zero gradient, and read what it keeps (a zero gradient leaves Adam's moments at zero).

    Raises:
        whatever the factory or its step raises (LBFGS needs a closure, a plugin may need more).
    """
    probe = torch.zeros(2, device=device)
    probe.grad = torch.zeros(2, device=device)
    solver = factory([{**{k: v for k, v in (hyper or {}).items() if k != "params"}, "params": [probe]}], **(options or {}))
    solver.step()
    state = solver.state[probe]
    per_element = {k: v.element_size() for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == probe.shape}
    whole = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
             for k, v in state.items() if k not in per_element}
    streamed = "chunk" if type(solver) in PREFILLED else "tensor" if streams(solver) else "block"
    return SolverLayout(per_element=per_element, whole=whole, streamed=streamed)


def layout_or_none(factory: Callable[..., torch.optim.Optimizer], options: Mapping[str, Any] | None = None,
                   hyper: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> SolverLayout | None:
    """:func:`solver_layout`, or None when the solver cannot be stepped so: then nothing is planned
    or checked by layout, and the general rules apply."""
    try:
        return solver_layout(factory, options, hyper, device)
    except Exception:  # noqa: BLE001 - any failure only means "layout unknown"
        return None


def block_bytes(entries: Sequence[str], params: Mapping[str, torch.Tensor],
                layout: SolverLayout, lean: bool | str = False) -> dict[tuple[str, torch.device], int]:
    """Bytes by ``(kind, device)`` that training the block of ``entries`` (names or row entries) adds.

    Kinds: ``masters``, ``gradient`` (fp32, cast at once), ``moments`` (per-element solver
    state) and ``moments8`` (8-bit moments with their fp32 chunk). Sharded (DTensor) entries are
    left out: their solver keeps its own state. ``lean``: no fp32 copies, a chunk of scratch
    instead (:class:`bcd.precision.MasterCopies`); ``"8bit"``: 8-bit moments too.
    """
    need: dict[tuple[str, torch.device], int] = {}
    low_block: dict[torch.device, int] = {}
    for entry in entries:
        param = params[parse_entry(entry)[0]]
        if sharded(param):
            continue
        numel, device = entry_numel(entry, params), param.device
        if quantizes(param, numel, lean):
            keys, chunk = len(layout.per_element), min(numel, chunk_rows(param.shape) * param[0].numel())
            need[("moments8", device)] = need.get(("moments8", device), 0) + keys * (numel + 4 * -(-numel // QUANT_BLOCK))
            # The fp32 chunk a visit's moments are dequantized into, one chunk at a time.
            need[("moments8 scratch", device)] = max(need.get(("moments8 scratch", device), 0), 4 * keys * chunk)
        else:
            need[("moments", device)] = need.get(("moments", device), 0) + layout.bytes_per_element * numel
        if needs_master(param):
            cast = min(numel, GRADIENT_CHUNK) if layout.streamed == "chunk" else numel
            need[("masters", device)] = (max(need.get(("masters", device), 0), 4 * cast) if lean
                                         else need.get(("masters", device), 0) + 4 * numel)
            low_block[device] = low_block.get(device, 0) + numel
            need[("gradient", device)] = max(need.get(("gradient", device), 0), 4 * cast)
    if layout.streamed == "block":
        need.update({("gradient", device): 4 * numel for device, numel in low_block.items()})
    return need


def plan_buffers(blocks: Iterable[Sequence[str]], params: Mapping[str, torch.Tensor],
                 layout: SolverLayout | None, lean: bool | str = False) -> dict[tuple[str, torch.device], int]:
    """fp32 elements per ``(kind, device)`` for the largest need of each kind among ``blocks``:
    what :class:`bcd.buffers.Buffers` allocates once and keeps across visits (nothing planned
    for a solver of unknown layout: the buffers then grow on demand)."""
    planned: dict[tuple[str, torch.device], int] = {}
    for entries in blocks if layout is not None else ():
        for key, count in block_bytes(entries, params, layout, lean).items():
            if not key[0].startswith("moments8"):  # allocated per visit, in 8 bits: not a buffer
                planned[key] = max(planned.get(key, 0), count // 4)
    return planned
