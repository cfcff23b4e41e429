"""Row blocks, the streamed step and the kept buffers, against hand-written loops."""

from __future__ import annotations

import pytest
import torch

import bcd
from bcd import cost
from bcd.blocks import parse_entry
from bcd.rowgrad import ROWS

from conftest import CASES

K = 2
LR = 1e-2


def row_partition(model: torch.nn.Module) -> bcd.Partition:
    """The embedding in three row blocks, the rest one block per tensor."""
    names = [n for n, _ in model.named_parameters()]
    embedding = names[0]
    rows = model.get_parameter(embedding).shape[0]
    cuts = [0, rows // 3, 2 * rows // 3, rows]
    groups = {f"rows.{i}": [f"{embedding}[{a}:{b}]"] for i, (a, b) in enumerate(zip(cuts, cuts[1:]))}
    groups.update({name: [name] for name in names[1:]})
    return bcd.Partition.from_groups(groups)


def hand_written_block_epoch(model: torch.nn.Module, partition: bcd.Partition, loss, dtype) -> None:
    """BAdam over ``partition`` in ascending order, written out: fp32 masters of the block's rows,
    a fresh fused AdamW per visit, the gradient's rows only, results rounded into the model."""
    params = dict(model.named_parameters())
    step = 0
    for block in partition:
        for p in params.values():
            p.requires_grad_(False)
        entries = [(params[parse_entry(e)[0]], parse_entry(e)[1] or (0, params[parse_entry(e)[0]].shape[0]))
                   for e in block.param_names]
        for param, _ in entries:
            param.requires_grad_(True)
        masters = [param.detach()[a:b].float().clone() if dtype == torch.bfloat16 else param.detach()[a:b]
                   for param, (a, b) in entries]
        solver = torch.optim.AdamW(masters, lr=LR, fused=True)
        for _ in range(K):
            loss(model, step).backward()
            for master, (param, (a, b)) in zip(masters, entries):
                master.grad = param.grad[a:b].float()
            solver.step()
            with torch.no_grad():
                for master, (param, (a, b)) in zip(masters, entries):
                    param.detach()[a:b].copy_(master)
                    param.grad = None
            step += 1


@pytest.mark.parametrize("chunk", [None, 50], ids=["whole-tensors", "64-element-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_block_epoch_with_row_blocks_equals_a_hand_written_loop(dtype, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(cost, "GRADIENT_CHUNK", chunk)
    case = CASES["llama"]
    reference = case.model(dtype=dtype)
    partition = row_partition(reference)
    hand_written_block_epoch(reference, partition, case.loss, dtype)

    model = case.model(dtype=dtype)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=K, partitioner="explicit",
                                             partitioner_options={"blocks": {b.name: b.param_names for b in partition}},
                                             order="ascending")
    for step in range(K * len(partition)):
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in reference.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name


def test_inactive_rows_get_no_gradient_and_stay_bit_identical():
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    partition = row_partition(model)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=1, partitioner="explicit",
                                             partitioner_options={"blocks": {b.name: b.param_names for b in partition}},
                                             order="ascending")
    embedding = model.get_parameter(partition[0].tensor_names[0])
    a, b = parse_entry(partition[1].param_names[0])[1]
    optimizer.step()  # nothing to do on block 0 without a gradient: move on to rows.1
    optimizer.zero_grad()
    assert optimizer.active_block.name == "rows.1"
    before = embedding.detach().clone()
    case.loss(model, 0).backward()
    # What clipping over model.parameters() sees is the block's gradient: its rows', as a parameter
    # of their own (bcd.rowgrad); the embedding has none.
    rows = dict(model.named_parameters())[f"{partition[0].tensor_names[0].rpartition('.')[0]}.{ROWS}"]
    assert embedding.grad is None and rows.grad.shape[0] == b - a and rows.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(embedding[:a], before[:a]) and torch.equal(embedding[b:], before[b:])
    assert not torch.equal(embedding[a:b], before[a:b])


def test_buffers_are_allocated_once_and_reused_across_switches():
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=LR, switch_every=1, order="ascending")
    pointers = []
    for step in range(2 * len(optimizer.blocks)):
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        pointers.append({key: flat.data_ptr() for key, flat in optimizer.buffers.flat.items()})
    assert pointers[0] and all(p == pointers[0] for p in pointers)
    kinds = {kind for kind, _ in pointers[0]}
    assert kinds == {"masters", "gradient", "moments"}


def test_a_solver_that_is_not_torchs_is_stepped_once_over_the_block():
    calls = []

    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            calls.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
            return super().step(closure)

    Counting.__module__ = "someone.elses"
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=1, solver=Counting, order="ascending")
    calls.clear()  # construction steps a throwaway instance on a 2-element tensor to learn its layout (bcd.cost)
    case.loss(model, 0).backward()
    optimizer.step()
    assert calls == [len(optimizer.blocks[0].param_names)]  # one step, every gradient present
    torch_solver = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=1, solver="sgd", order="ascending")
    assert cost.streams(torch.optim.SGD([torch.zeros(1)], lr=0.1))
    assert not cost.streams(Counting([torch.zeros(1)], lr=0.1))
    torch_solver.close()


def test_an_fp64_model_is_its_own_master_and_trains_as_torchs_adamw():
    """fp64 parameters keep fp64 moments (bcd's buffers are fp32): D = 1 is torch's fused AdamW, bit for bit."""
    case = CASES["mlp"]
    model, reference = case.model(dtype=torch.float64), case.model(dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, partitioner="explicit",
                                             partitioner_options={"blocks": [names]})
    adamw = torch.optim.AdamW(reference.parameters(), lr=LR, fused=True)
    for step in range(3):
        for m, o in ((model, optimizer), (reference, adamw)):
            case.loss(m, step).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert optimizer.solver.state[next(iter(model.parameters()))]["exp_avg"].dtype == torch.float64


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_complex_parameters_are_refused_at_construction():
    model = torch.nn.Linear(2, 2).to(torch.complex64)
    with pytest.raises(ValueError, match=r"weight is torch.complex64; accepted: real floating-point parameters"):
        bcd.BlockCoordinateOptimizer(model, lr=LR)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("start, change", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_dtype_change_mid_visit_is_refused_at_the_next_step(start, change):
    case = CASES["mlp"]
    model = case.model(dtype=start)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=3)
    case.loss(model, 0).backward()
    optimizer.step()
    model.to(change)
    case.loss(model, 1).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"changed from {start} on cpu to {change} on cpu in the middle of a block visit"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimizer.global_step == 1


def explicit_rows(model: torch.nn.Module) -> dict:
    return {"partitioner": "explicit", "partitioner_options": {"blocks": {b.name: b.param_names for b in row_partition(model)}}}


def lean_pair(chunk: int, monkeypatch, lean_steps: int = 1):
    """Two bf16 Llamas, one trained with masters, one lean, with row blocks of the embedding; the
    lean one's weights before its last step and the master one's fp32 masters after the same step."""
    monkeypatch.setattr(cost, "GRADIENT_CHUNK", chunk)  # several chunks per entry, cut across rows, and the buffers
    case = CASES["llama"]
    models = [case.model(dtype=torch.bfloat16) for _ in range(2)]
    optimizers = [bcd.BlockCoordinateOptimizer(m, lr=LR, switch_every=K, lean=lean, **explicit_rows(m))
                  for m, lean in zip(models, (False, True))]
    for step in range(lean_steps):
        for model, optimizer in zip(models, optimizers):
            case.loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
    return models, optimizers


@pytest.mark.parametrize("chunk", [2**24, 40])
def test_the_lean_precision_rounds_the_exact_update_to_a_neighbour(chunk, monkeypatch):
    """From the same weights and gradient, each lean weight is one of the two bf16 neighbours of the
    fp32 value the master path computes (its master copy): the same Adam step, only rounded."""
    (master_model, lean_model), (with_masters, lean) = lean_pair(chunk, monkeypatch)
    assert lean.master_copies.state_dict() == {} and with_masters.master_copies.state_dict()
    for entry, exact in with_masters.master_copies.state_dict().items():
        name, rows = parse_entry(entry)
        got = lean_model.get_parameter(name).detach()
        got = (got if rows is None else got[rows[0]:rows[1]]).float()
        down = exact.to(torch.bfloat16).float()
        up = torch.nextafter(exact.to(torch.bfloat16), torch.where(exact > down, float("inf"), float("-inf"))
                             .to(torch.bfloat16)).float()
        assert torch.all((got == down) | (got == up)), entry
        assert not torch.equal(got, down)  # rounded stochastically, not to nearest everywhere


def test_the_lean_precision_keeps_only_a_chunk_of_fp32_scratch(monkeypatch):
    (_, lean_model), (with_masters, lean) = lean_pair(40, monkeypatch)
    kept = {kind: flat.numel() for (kind, _), flat in lean.buffers.flat.items()}
    assert kept["masters"] <= 40 < max(m.numel() for m in with_masters.master_copies.state_dict().values())
    assert kept["moments"] == {k: f.numel() for (k, _), f in with_masters.buffers.flat.items()}["moments"]


def test_the_lean_precision_resumes_bit_identically_mid_visit(monkeypatch):
    """Its rounding is drawn from the optimizer step, the tensor and the row: nothing else to save."""
    import copy

    monkeypatch.setattr(cost, "GRADIENT_CHUNK", 40)
    case = CASES["llama"]

    def run(start=0, state=None, stop=3 * K + 1):
        model = case.model(dtype=torch.bfloat16)
        optimizer = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=K, order="random", order_options={"seed": 3},
                                                 lean=True, **explicit_rows(model))
        if state is not None:
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
        for step in range(start, stop):
            case.loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    model, optimizer = run(stop=K + 1)  # mid-visit
    assert optimizer.step_in_block == 1
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    uninterrupted, _ = run()
    resumed, _ = run(K + 1, saved)
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_lean_precision_needs_adam_or_adamw():
    with pytest.raises(ValueError, match=r"lean=True with solver 'sgd'; accepted: lean with solver 'adam' or 'adamw'"):
        bcd.BlockCoordinateOptimizer(CASES["llama"].model(dtype=torch.bfloat16), lr=LR, solver="sgd", lean=True)
    with pytest.raises(ValueError, match=r"Invalid lean: 'yes'"):
        bcd.BlockCoordinateOptimizer(CASES["llama"].model(dtype=torch.bfloat16), lr=LR, lean="yes")


def test_a_lean_state_dict_does_not_load_into_an_optimizer_with_masters():
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    lean = bcd.BlockCoordinateOptimizer(model, lr=LR, switch_every=K, lean=True)
    case.loss(model, 0).backward()
    lean.step()  # mid-visit: the solver state is saved, no masters
    saved = lean.state_dict()
    other = bcd.BlockCoordinateOptimizer(case.model(dtype=torch.bfloat16), lr=LR, switch_every=K)
    with pytest.raises(ValueError, match=r"master_copies hold \[\].*another lean setting"):
        other.load_state_dict(saved)
