r"""Adam's moments in 8 bits between steps (``lean="8bit"``), with bitsandbytes' blockwise kernels.

The lean precision already steps each low-precision entry in row chunks of fp32 scratch
(:mod:`bcd.precision`); here its moments are also kept in 8 bits between steps. Each chunk of a
moment is dequantized into fp32, torch's own Adam or AdamW steps it, and it is quantized back,
as in 8-bit Adam (Dettmers et al., 2022, arXiv 2110.02861): blocks of :data:`BLOCK` elements,
each stored as one byte per element, an index into a dynamic (exponent-like) code, and one fp32
scale, the block's largest magnitude,

.. math::

    \hat x_i = \operatorname{code}[q_i] \cdot \max_{j \in \text{block}} |x_j|,

a signed code for :math:`m` and an unsigned one for :math:`v`. An entry of ``m`` elements then
keeps :math:`2m` bytes of moments (and :math:`2m \cdot 4/256` of scales) instead of :math:`8m`.
The quantization is deterministic, so a resumed run is the uninterrupted one bit for bit.

The kernels are bitsandbytes' (:func:`bitsandbytes.functional.quantize_blockwise` and
``dequantize_blockwise``), native on CPUs and on CUDA: about 3 ns per element to quantize and
1 ns to dequantize on a 2-core CPU, where torchao's pure-PyTorch quantizer takes 120 ns eager
(its optimizers compile theirs). bitsandbytes is an optional dependency (``pip install
'bcd[lowbit]'``), imported only when ``lean="8bit"`` is asked for.

Which entries: those the lean precision steps in chunks (low-precision tensors with rows), with at
least :data:`bcd.cost.QUANT_MIN_NUMEL` (4096) elements, as bitsandbytes' own 8-bit optimizers choose; the others keep
fp32 moments (:func:`bcd.cost.quantizes`). Chunks are quantized independently (a chunk's last block may be short), so the
scales of an entry are laid out chunk after chunk (:func:`scales_before`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, MutableMapping
from types import ModuleType

import torch
from torch.optim import Optimizer

from bcd.cost import QUANT_BLOCK as BLOCK
from bcd.cost import chunk_rows

#: The state keys kept per element by torch's Adam and AdamW, and whether each can be negative.
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
#: The suffix of the state key that holds a quantized moment's scales.
SCALES = ".absmax"


def library() -> ModuleType:
    """``bitsandbytes.functional``, imported on first use.

    Raises:
        ValueError: bitsandbytes is not installed, with what to install.
    """
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    # Its import warns about optional 4-bit GPU kernels that 8-bit moments never use.
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError as error:
        raise ValueError(
            f"lean='8bit' keeps Adam's moments in 8 bits with bitsandbytes' kernels, which cannot be imported ({error}); "
            "accepted: install it (pip install 'bcd[lowbit]'), or lean=True (fp32 moments) or lean=False."
        ) from error
    finally:
        logger.setLevel(level)


def scales_before(shape: torch.Size | tuple[int, ...], row: int) -> int:
    """How many scales an entry of ``shape`` keeps for its rows before ``row`` (a chunk's first row,
    or ``shape[0]`` for all): every chunk but the last has the same rows, and its blocks start at
    its first element."""
    per_row = int(torch.Size(shape[1:]).numel())
    rows = chunk_rows(shape)
    full, rest = divmod(row, rows)
    return full * -(-rows * per_row // BLOCK) + -(-rest * per_row // BLOCK)


def zeros(keys: Mapping[str, int], shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    """The state of an entry not stepped yet: codes (uint8, ``shape``) and zero scales for each
    per-element key (a zero scale decodes every code to 0, Adam's initial moments)."""
    blocks = scales_before(shape, shape[0])
    state: dict[str, torch.Tensor] = {}
    for key in keys:
        state[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[key + SCALES] = torch.zeros(blocks, dtype=torch.float32, device=device)
    return state


_CODES: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _code(functional: ModuleType, signed: bool, device: torch.device) -> torch.Tensor:
    """The dynamic code (256 fp32 values) of a signed or unsigned moment, made once per device."""
    key = (signed, device)
    if key not in _CODES:
        _CODES[key] = functional.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def load(state: Mapping[str, torch.Tensor], start: int, rows: int) -> dict[str, torch.Tensor]:
    """The fp32 moments of the chunk of rows ``start:start + rows``, dequantized afresh."""
    functional = library()
    out = {}
    for key in SIGNED:
        if key in state:
            codes = state[key][start:start + rows]
            scale, blocks = scales_before(state[key].shape, start), -(-codes.numel() // BLOCK)
            out[key] = functional.dequantize_blockwise(
                codes, absmax=state[key + SCALES][scale:scale + blocks],
                code=_code(functional, SIGNED[key], codes.device), blocksize=BLOCK)
    return out


def store(state: MutableMapping[str, torch.Tensor], stepped: Mapping[str, torch.Tensor], start: int) -> None:
    """Quantize the fp32 moments of the chunk from row ``start`` (``stepped``) back into ``state``."""
    functional = library()
    for key, value in stepped.items():
        if key in SIGNED and key in state:
            scale = scales_before(state[key].shape, start)
            codes, quant = functional.quantize_blockwise(value, code=_code(functional, SIGNED[key], value.device),
                                                         blocksize=BLOCK)
            state[key][start:start + value.shape[0]].copy_(codes)
            state[key + SCALES][scale:scale + quant.absmax.numel()].copy_(quant.absmax)


def is_quantized(state: Mapping[str, object]) -> bool:
    """Whether a solver state entry holds 8-bit moments (codes and scales)."""
    return any(isinstance(key, str) and key.endswith(SCALES) for key in state)


def load_into(solver: Optimizer, saved: Mapping[str, object]) -> None:
    """``solver.load_state_dict(saved)``, with any 8-bit moments in ``saved`` kept as they are.

    torch casts a floating parameter's state to its dtype, which would turn the codes into fp32
    (four times their bytes): they are set aside, the rest is loaded, and they are put back.
    """
    states: Mapping[int, Mapping[str, torch.Tensor]] = saved["state"]  # type: ignore[assignment]
    held = {key: {name: value for name, value in entry.items() if name in SIGNED or name.endswith(SCALES)}
            for key, entry in states.items() if is_quantized(entry)}
    rest = {key: {name: value for name, value in entry.items() if name not in held.get(key, {})}
            for key, entry in states.items()}
    solver.load_state_dict({**saved, "state": rest})
    params = [p for group in solver.param_groups for p in group["params"]]
    for key, values in held.items():
        solver.state[params[key]].update({name: value.to(params[key].device, copy=True) for name, value in values.items()})
