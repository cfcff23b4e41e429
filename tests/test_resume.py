"""Exact resume: state_dict -> fresh model and optimizer -> load_state_dict continues bit-identically."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

import bcd

from conftest import CASES, train

K = 3


def make(case, dtype, order, partitioner="layer", partitioner_options=None):
    model = case.model(dtype=dtype)
    options = dict(partitioner_options or {})
    optimizer = bcd.BlockCoordinateOptimizer(
        model, lr=1e-2, switch_every=K, partitioner=partitioner, max_block_params=options.pop("max_block_params", None),
        partitioner_options=options, order=order,
        order_options={"seed": 7} if order in ("random", "importance") else {}, solver="adamw",
        solver_options={"weight_decay": 0.1}, no_decay=True,
    )
    return model, optimizer


def roundtrip(obj):
    """Through bytes, as a checkpoint file would; weights_only=True as the Trainer loads."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "order,partitioner,options",
    [
        ("ascending", "layer", {}),
        ("descending", "layer", {}),
        ("random", "layer", {}),
        ("random", "random-subset", {"num_blocks": 3, "seed": 2, "redraw": True}),
        ("random", "layer", {"max_block_params": 300}),
        ("importance", "layer", {}),
    ],
    ids=["ascending", "descending", "random", "random-subset-redraw", "random-row-blocks", "importance"],
)
def test_resume_mid_block_is_bit_identical(order, partitioner, options, dtype):
    case = CASES["llama"]
    # The cut lands mid-block; with D = 4 it is in the second block-epoch and the run goes on into
    # the fourth, so an observing ordering draws two orders from the restored observations.
    total, cut = 12 * K + 1, 2 * K + 1 + 3 * K
    model, optimizer = make(case, dtype, order, partitioner, options)
    reference_losses = train(model, optimizer, case, total)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, optimizer = make(case, dtype, order, partitioner, options)
    first = train(model, optimizer, case, cut)
    assert optimizer.step_in_block not in (0,), "the cut must be mid-block"
    cut_epoch = optimizer.block_epoch
    model_state, optimizer_state = roundtrip(model.state_dict()), roundtrip(optimizer.state_dict())
    del model, optimizer

    fresh_model, fresh_optimizer = make(case, dtype, order, partitioner, options)
    fresh_model.load_state_dict(model_state)
    fresh_optimizer.load_state_dict(optimizer_state)
    second = train(fresh_model, fresh_optimizer, case, total - cut, start=cut)

    assert len(second) == total - cut
    if order == "importance":  # drew later orders from the restored observations
        assert fresh_optimizer.block_epoch >= cut_epoch + 2
    assert first + second == reference_losses
    for name, param in fresh_model.named_parameters():
        assert torch.equal(param, reference[name]), name


def test_resume_in_a_fresh_process(tmp_path):
    """The checkpoint files are all a new process needs: row blocks (cast in chunks), mid-block, random order."""
    script = textwrap.dedent(
        f"""
        import sys, torch, bcd, bcd.cost
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import CASES, train
        from test_resume import make
        bcd.cost.GRADIENT_CHUNK = 40
        case = CASES["gpt2"]
        model, optimizer = make(case, torch.bfloat16, "random", "layer", {{"max_block_params": 500}})
        assert any("[" in entry for entry in optimizer.blocks.param_names)
        if sys.argv[1] == "save":
            train(model, optimizer, case, 4)
            torch.save(model.state_dict(), sys.argv[2] + "/model.pt")
            torch.save(optimizer.state_dict(), sys.argv[2] + "/optimizer.pt")
        else:
            model.load_state_dict(torch.load(sys.argv[2] + "/model.pt", weights_only=True))
            optimizer.load_state_dict(torch.load(sys.argv[2] + "/optimizer.pt", weights_only=True))
        train(model, optimizer, case, 5, start=4)
        torch.save(model.state_dict(), sys.argv[2] + "/" + sys.argv[1] + ".pt")
        """
    )
    path = tmp_path / "run.py"
    path.write_text(script)
    subprocess.run([sys.executable, str(path), "save", str(tmp_path)], check=True)
    subprocess.run([sys.executable, str(path), "load", str(tmp_path)], check=True)
    # "save" trained 4 + 5 steps in one process; "load" trained the 5 after a restart.
    uninterrupted = torch.load(tmp_path / "save.pt", weights_only=True)
    resumed = torch.load(tmp_path / "load.pt", weights_only=True)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_the_recipe_resumes_in_a_fresh_process_bit_identically(tmp_path):
    """bcd.BAdam with the run length: the expansion over every block, its bf16 steps stochastically
    rounded from seeded draws; a restart mid-block continues exactly (nothing of the draws is saved)."""
    script = textwrap.dedent(
        f"""
        import sys, torch, bcd
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import CASES, train
        case = CASES["llama"]
        model = case.model(dtype=torch.bfloat16)
        optimizer = bcd.BAdam(model, lr=1e-2, total_steps=24, seed=5, weight_decay=0.1)
        assert optimizer.expansion is not None and optimizer.switch_every == 2
        if sys.argv[1] == "save":
            train(model, optimizer, case, 5)  # mid-block: K = 2
            torch.save(model.state_dict(), sys.argv[2] + "/model.pt")
            torch.save(optimizer.state_dict(), sys.argv[2] + "/optimizer.pt")
        else:
            model.load_state_dict(torch.load(sys.argv[2] + "/model.pt", weights_only=True))
            optimizer.load_state_dict(torch.load(sys.argv[2] + "/optimizer.pt", weights_only=True))
        train(model, optimizer, case, 6, start=5)
        torch.save(model.state_dict(), sys.argv[2] + "/" + sys.argv[1] + ".pt")
        """
    )
    path = tmp_path / "run.py"
    path.write_text(script)
    subprocess.run([sys.executable, str(path), "save", str(tmp_path)], check=True)
    subprocess.run([sys.executable, str(path), "load", str(tmp_path)], check=True)
    uninterrupted = torch.load(tmp_path / "save.pt", weights_only=True)
    resumed = torch.load(tmp_path / "load.pt", weights_only=True)
    start = CASES["llama"].model(dtype=torch.bfloat16).state_dict()
    assert all(not torch.equal(uninterrupted[n], start[n]) for n in start)  # every weight was stepped
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_state_dict_from_another_partition_is_refused_untouched():
    case = CASES["llama"]
    _, saved = make(case, torch.float32, "ascending")
    model, other = make(case, torch.float32, "ascending", "layer", {"include_embedding": False})
    before = (other.active_block, other.global_step, [p.requires_grad for p in model.parameters()])
    with pytest.raises(ValueError, match="another partition"):
        other.load_state_dict(saved.state_dict())
    assert before == (other.active_block, other.global_step, [p.requires_grad for p in model.parameters()])


def test_state_dict_from_another_model_is_refused():
    _, saved = make(CASES["gpt2"], torch.float32, "ascending")
    _, other = make(CASES["llama"], torch.float32, "ascending")
    with pytest.raises(ValueError, match="another partition"):
        other.load_state_dict(saved.state_dict())


@pytest.mark.parametrize(
    "change,match",
    [
        ({"switch_every": K + 1}, "switch_every"),
        ({"order": "descending", "order_options": {}}, "ordering"),
        ({"order_options": {"seed": 8}}, "order"),
        ({"solver": "adam"}, "solver"),
        ({"no_decay": False}, "group"),
    ],
)
def test_state_dict_with_other_settings_is_refused(change, match):
    case = CASES["llama"]
    model, saved = make(case, torch.float32, "random")
    train(model, saved, case, 2)
    settings = dict(lr=1e-2, switch_every=K, order="random", order_options={"seed": 7}, solver="adamw",
                    solver_options={"weight_decay": 0.1}, no_decay=True)
    settings.update(change)
    if settings["solver"] == "adam":
        settings["solver_options"] = {}
    other = bcd.BlockCoordinateOptimizer(case.model(), **settings)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(saved.state_dict())


def test_state_dict_from_another_dtype_is_refused():
    case = CASES["llama"]
    model, saved = make(case, torch.bfloat16, "ascending")
    train(model, saved, case, 1)  # mid-visit: master copies exist
    _, other = make(case, torch.float32, "ascending")
    with pytest.raises(ValueError, match="dtype"):
        other.load_state_dict(saved.state_dict())


def test_not_a_bcd_state_dict_is_refused():
    case = CASES["mlp"]
    model, optimizer = make(case, torch.float32, "ascending")
    plain = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="format"):
        optimizer.load_state_dict(plain)
