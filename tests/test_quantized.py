"""8-bit moments (``lean="8bit"``): bitsandbytes' blockwise codes inside the lean precision's chunk loop."""

from __future__ import annotations

import io

import pytest
import torch

import bcd
from bcd import cost, quantized
from bcd.blocks import entry_numel
from bcd.lab import memory

from conftest import VOCAB, tiny_llama

LR = 1e-2
K = 3


def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1000 + step))
    return model(input_ids=ids, labels=ids).loss


def build(lean, seed: int = 0, **options) -> tuple[torch.nn.Module, bcd.BlockCoordinateOptimizer]:
    """hidden 64: the attention's q/o and the MLP's matrices (4096+ elements) keep 8-bit moments,
    the k/v projections (2048) and the norms keep fp32 ones."""
    torch.manual_seed(seed)
    model = tiny_llama(hidden=64).to(torch.bfloat16)
    options.setdefault("order", "ascending")
    options.setdefault("order_options", {"start_block": "model.layers.0"})
    return model, bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=K, lean=lean, **options)


def solver_pairs(optimizer: bcd.BlockCoordinateOptimizer) -> list[tuple[str, dict]]:
    names = optimizer.active_block.param_names
    params = [p for g in optimizer.solver.param_groups for p in g["params"]]
    assert len(names) == len(params)
    return [(name, optimizer.solver.state[p]) for name, p in zip(names, params)]


def test_the_first_step_equals_the_lean_one_and_stores_bitsandbytes_codes_of_its_moments():
    """From zero moments the first step is the lean precision's exactly; what is kept of a large
    entry's moments is bitsandbytes' blockwise quantization of them, a small entry keeps fp32."""
    (lean_model, lean), (model, eight) = build(True), build("8bit")
    for m, optimizer in ((lean_model, lean), (model, eight)):
        loss(m, 0).backward()
        optimizer.step()
    for (name, a), b in zip(lean_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    functional = quantized.library()
    kinds = set()
    for (name, exact), (_, kept) in zip(solver_pairs(lean), solver_pairs(eight)):
        big = entry_numel(name, dict(model.named_parameters())) >= cost.QUANT_MIN_NUMEL
        kinds.add(big)
        for key, signed in quantized.SIGNED.items():
            if key not in exact:
                continue
            if big:
                codes, state = functional.quantize_blockwise(
                    exact[key].contiguous(), code=functional.create_dynamic_map(signed=signed), blocksize=256)
                assert kept[key].dtype == torch.uint8 and torch.equal(kept[key], codes), (name, key)
                assert torch.equal(kept[key + quantized.SCALES], state.absmax), (name, key)
            else:
                assert kept[key].dtype == torch.float32 and torch.equal(kept[key], exact[key]), (name, key)
        assert torch.equal(kept["step"], exact["step"])
    assert kinds == {True, False}  # both kinds were in the block


def test_decoded_moments_stay_within_the_codes_resolution_of_the_fp32_ones():
    """A visit's later steps read the decoded moments: within 2% of the block's largest magnitude
    (the dynamic code's spacing near 1 is 1.6%), while the lean run keeps them exactly."""
    (lean_model, lean), (model, eight) = build(True), build("8bit")
    for step in range(K - 1):
        for m, optimizer in ((lean_model, lean), (model, eight)):
            loss(m, step).backward()
            optimizer.step()
            optimizer.zero_grad()
    functional = quantized.library()
    for (name, exact), (_, kept) in zip(solver_pairs(lean), solver_pairs(eight)):
        if kept["exp_avg"].dtype != torch.uint8:
            continue
        for key, signed in quantized.SIGNED.items():
            if key not in exact:
                continue
            decoded = functional.dequantize_blockwise(kept[key], absmax=kept[key + quantized.SCALES],
                                                      code=functional.create_dynamic_map(signed=signed), blocksize=256)
            blocks = exact[key].reshape(-1, 256)
            error = (decoded.reshape(-1, 256) - blocks).abs().amax(1) / blocks.abs().amax(1).clamp_min(1e-30)
            assert float(error.max()) < 0.02, (name, key)


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(monkeypatch):
    """Mid-visit, through torch.save and a weights_only load; 1000-element chunks, so an entry's
    scales are laid out over several chunks, each with a short last block (960 or 896 elements)."""
    monkeypatch.setattr(cost, "GRADIENT_CHUNK", 1000)

    def run(start=0, saved=None, stop=2 * K + 2):
        model, optimizer = build("8bit", order="random", order_options={"seed": 3})
        if saved is not None:
            state = torch.load(io.BytesIO(saved), weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        for step in range(start, stop):
            loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    model, optimizer = run(stop=K + 1)
    assert optimizer.step_in_block == 1 and any(v.dtype == torch.uint8 for _, s in solver_pairs(optimizer) for v in s.values())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    uninterrupted, _ = run()
    resumed, _ = run(K + 1, buffer.getvalue())
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_state_dict_loads_only_into_the_same_lean_setting():
    model, eight = build("8bit")
    loss(model, 0).backward()
    eight.step()
    _, lean = build(True)
    with pytest.raises(ValueError, match=r"has dtype torch.uint8 \(8-bit moments: it was saved with lean='8bit'\)"):
        lean.load_state_dict(eight.state_dict())
    model, lean = build(True)
    loss(model, 0).backward()
    lean.step()
    _, other = build("8bit")
    with pytest.raises(ValueError, match=r"is torch.float32 \(\d+, \d+\); accepted: torch.uint8 .*another lean setting"):
        other.load_state_dict(lean.state_dict())
    assert other.solver is None and other.step_in_block == 0  # nothing changed


def test_bad_values_and_a_missing_library_are_refused_before_anything_changes(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64).to(torch.bfloat16)
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"Invalid lean: '8-bit'; accepted: False .*, True .* or '8bit'"):
        bcd.BlockCoordinateOptimizer(model, lr=LR, lean="8-bit")
    with pytest.raises(ValueError, match=r"lean='8bit' with solver 'sgd'"):
        bcd.BlockCoordinateOptimizer(model, lr=LR, solver="sgd", lean="8bit")

    def missing(name, *args):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(quantized.importlib, "import_module", missing)
    with pytest.raises(ValueError, match=r"cannot be imported .*pip install 'bcd\[lowbit\]'"):
        bcd.BlockCoordinateOptimizer(model, lr=LR, lean="8bit")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen


def test_the_estimate_counts_what_the_8bit_state_holds():
    """``bcd memory``'s badam-lean8 against the live solver state of the block it names the largest,
    and 6 bytes per quantized element under badam-lean (8 of fp32 moments, 2 of codes)."""
    model, optimizer = build("8bit", order="ascending", order_options={"start_block": "model.layers.0"})
    loss(model, 0).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    live = memory.measure(model, optimizer)
    block = optimizer.active_block
    report = memory.estimate(model, methods=["badam-lean", "badam-lean8"])
    figure = next(f for f in report.method("badam-lean8").blocks if f.name == block.name)
    lean_figure = next(f for f in report.method("badam-lean").blocks if f.name == block.name)
    numels = [entry_numel(e, params) for e in block.param_names]
    big = [n for n in numels if n >= cost.QUANT_MIN_NUMEL]
    scratch = 8 * max(big)  # m and v of the largest quantized entry (one chunk here), dequantized for its step
    scales = sum(4 * 2 * -(-n // 256) for n in big)
    assert lean_figure.bytes.solver_state - figure.bytes.solver_state == 6 * sum(big) - scales - scratch
    codes = sum(v.numel() * v.element_size() for _, s in solver_pairs(optimizer) for k, v in s.items() if v.dtype == torch.uint8
                or k.endswith(quantized.SCALES))
    assert codes == 2 * sum(big) + scales
    # The live state holds the codes, the fp32 moments buffer (planned for the largest unquantized need) and a
    # step count per entry; the estimate adds the transient scratch.
    buffer = sum(f.numel() * 4 for (kind, _), f in optimizer.buffers.flat.items() if kind == "moments")
    assert live.solver_state == codes + buffer + 4 * len(numels)
    assert figure.bytes.solver_state - scratch <= live.solver_state
