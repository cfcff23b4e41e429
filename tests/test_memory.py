"""Memory accounting: estimates against the paper, live measurement against an independent count."""

from __future__ import annotations

import json

import pytest
import torch

import bcd
from bcd.lab import memory
from bcd import cost
from bcd.blocks import entry_numel
from bcd.lab.cli import main
from bcd.lab.presets import PRESETS, build_model, load_config

from conftest import CASES, MLP


def within(value: float, expected: float, tolerance: float = 0.03) -> bool:
    return abs(value - expected) <= tolerance * expected


def test_llama_2_7b_reproduces_the_papers_table_4_and_gets_under_it():
    model = build_model(load_config("llama-2-7b"))
    layers_only = {"include_embedding": False, "include_head": False}
    report = memory.estimate(model, methods=["adam", "badam"], partitioner_options=layers_only)
    adam, badam = report.method("adam").breakdown, report.method("badam")
    gb = 1e9
    assert within(adam.weights / gb, 13.4)
    assert within(adam.gradients / gb, 13.4)
    # Mixed-precision Adam's "optimizer states" in the paper: m, v and the fp32 master copy.
    assert within((adam.solver_state + adam.master_copies) / gb, 80.4)
    # BAdam, one transformer layer: m, v and the master copy as in the paper (1.6 and 0.8 GB) ...
    assert within(badam.breakdown.solver_state / gb, 1.6)
    assert within(badam.breakdown.master_copies / gb, 0.8)
    assert badam.largest_block == "model.layers.0" and len(badam.blocks) == 32
    # ... but the paper's 0.8 GB fp32 gradient is the layer's bf16 gradient (2 x 202.4M) and one
    # 16 MB fp32 buffer, the step being streamed in chunks.
    layer = 202_383_360
    assert badam.breakdown.gradients == 2 * layer + 4 * cost.GRADIENT_CHUNK
    assert badam.breakdown.total - badam.breakdown.weights < 16 * layer
    # The default trains every parameter: D = 34, embedding and head smaller than a layer.
    full = memory.estimate(model, methods=["badam"]).method("badam")
    assert len(full.blocks) == 34 and full.blocks[0].name == "embedding" and full.largest_block == "model.layers.0"
    assert full.breakdown == badam.breakdown and full.breakdown.total < full.paper_formula


def test_the_largest_block_sets_the_peak_and_row_blocks_bound_it():
    model = build_model(load_config("llama-3-8b"))
    unsplit = memory.estimate(model, methods=["badam"], max_block_params=10**12).method("badam")
    assert unsplit.largest_block == "head"
    head = next(f for f in unsplit.blocks if f.name == "head")
    assert head.params == 128256 * 4096 + 4096
    assert unsplit.breakdown.total > unsplit.paper_formula  # the uneven block costs more than the average
    badam = memory.estimate(model, methods=["badam"]).method("badam")
    layer = next(f for f in badam.blocks if f.name == "model.layers.0").params
    names = [f.name for f in badam.blocks]
    assert names[:3] == ["embedding/0", "embedding/1", "embedding/2"] and names[-3:] == ["head/0", "head/1", "head/2"]
    assert all(f.params <= layer for f in badam.blocks) and len(badam.blocks) == 38
    # A head row block holds its rows' bf16 gradient only (bcd.rowgrad): a layer sets every peak.
    head = next(f for f in badam.blocks if f.name == "head/0")
    assert head.bytes.gradients == 2 * head.params + 4 * cost.GRADIENT_CHUNK < 2 * 128256 * 4096
    assert badam.breakdown.gradients == 2 * layer + 4 * cost.GRADIENT_CHUNK and badam.largest_block == "model.layers.0"
    assert badam.breakdown.solver_state == 8 * layer + 4 * 9 and badam.breakdown.master_copies == 4 * layer
    assert badam.breakdown.total < 20 * 10**9 < 23 * 10**9 < unsplit.breakdown.total


def test_live_measure_equals_an_independent_count_and_the_estimate():
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=1e-3, switch_every=10, order="ascending")
    params = dict(model.named_parameters())
    case.loss(model, 0).backward()
    optimizer.step()  # the solver and master copies exist from the visit's first step on
    optimizer.zero_grad()
    case.loss(model, 1).backward()
    live = memory.measure(model, optimizer)
    block = optimizer.active_block
    tensors = [params[n] for n in block.tensor_names]
    # Independent count: the model, the block's bf16 gradients (whole tensors), the buffers as planned.
    sizes = [[entry_numel(e, params) for e in b.param_names] for b in optimizer.blocks]
    assert live.parameters == {"bfloat16": 2 * sum(p.numel() for p in model.parameters())}
    assert live.master_copies == 4 * max(sum(s) for s in sizes)
    assert live.gradients == 2 * sum(p.numel() for p in tensors) + 4 * max(max(s) for s in sizes)
    assert live.solver_state == 8 * max(sum(s) for s in sizes) + 4 * len(block.param_names)
    report = memory.estimate(model, methods=["badam"]).method("badam")
    estimate, largest = report.breakdown, optimizer.blocks[optimizer.blocks.index(report.largest_block)]
    assert estimate.weights == sum(live.parameters.values())
    assert estimate.master_copies == live.master_copies
    # The moments buffer is the same; the step counters are one per entry of the block counted.
    assert estimate.solver_state - 4 * len(largest.param_names) == live.solver_state - 4 * len(block.param_names)
    optimizer.step()
    after = memory.measure(model, optimizer)  # the bf16 gradients were freed as they were cast
    assert after.gradients == 4 * max(max(s) for s in sizes)


def test_the_lean_estimate_equals_what_a_lean_optimizer_holds():
    """lean=True: no fp32 masters, one chunk of fp32 scratch in their place; the moments as with masters."""
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=1e-3, switch_every=10, order="ascending", lean=True)
    case.loss(model, 0).backward()
    optimizer.step()
    live = memory.measure(model, optimizer)
    params = dict(model.named_parameters())
    sizes = [[entry_numel(e, params) for e in b.param_names] for b in optimizer.blocks]
    # The largest entry fits one chunk here; the solver's stand-ins for the entries share one fp32 element.
    assert live.master_copies == 4 * max(max(s) for s in sizes) + 4
    report = memory.estimate(model, methods=["badam", "badam-lean"])
    lean, full = report.method("badam-lean").breakdown, report.method("badam").breakdown
    assert lean.master_copies == live.master_copies - 4 < full.master_copies
    assert lean.solver_state == full.solver_state and lean.gradients == full.gradients
    assert full.total - lean.total == full.master_copies - lean.master_copies


def test_measure_counts_shared_storage_once_and_works_for_torch_optimizers():
    model = CASES["gpt2"].model()  # tied embedding and head
    optimizer = torch.optim.AdamW(model.parameters())
    CASES["gpt2"].loss(model, 0).backward()
    optimizer.step()
    live = memory.measure(model, optimizer)
    params = list(model.parameters())  # tied weight appears once
    assert live.parameters == {"float32": 4 * sum(p.numel() for p in params)}
    assert live.gradients == 4 * sum(p.numel() for p in params)
    assert live.solver_state == 8 * sum(p.numel() for p in params) + 4 * len(params)


def test_activation_estimate_and_checkpointing():
    config = load_config("llama-2-7b")
    off = memory.estimate_activations(config, batch=1, seq=512)
    on = memory.estimate_activations(config, batch=1, seq=512, checkpointing=True)
    assert on.bytes < off.bytes and off.note == "estimate"
    with pytest.raises(ValueError, match=r"Invalid batch: 0; accepted: an integer >= 1"):
        memory.estimate_activations(config, batch=0, seq=8)


@pytest.mark.parametrize(
    "text,expected", [("24GiB", 24 * 2**30), ("80 GB", 80 * 10**9), ("1.5MiB", int(1.5 * 2**20)), ("1024B", 1024)]
)
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["24 gallons", "-3GB", "GB", "", "24", "0GB", "1" + "0" * 400 + "GB", "2048TiB"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(ValueError, match=r"Invalid size: .*accepted: a positive number up to 1 PiB with a unit"):
        memory.parse_size(text)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown preset: 'llama-9b'; accepted: llama-2-7b, llama-3-8b"):
        load_config("llama-9b")
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"Unreadable config: .*config.json"):
        load_config(config=broken)
    with pytest.raises(ValueError, match=r"Unreadable config"):
        load_config(config=tmp_path / "missing")
    model = build_model(load_config("llama-tiny"))
    with pytest.raises(ValueError, match=r"Unknown method\(s\): \['sgd'\]; accepted: adam, badam, badam-lean, badam-lean8, lora, lomo"):
        memory.estimate(model, methods=["sgd"])
    with pytest.raises(ValueError, match=r"LoRA targets: \['c_attn'\] match no linear layer; .* named .*q_proj"):
        memory.estimate(model, methods=["lora"], lora_targets=["c_attn"])


def test_config_file_and_model_directory(tmp_path):
    config = load_config("llama-tiny")
    config.save_pretrained(tmp_path)  # a local model directory holding config.json
    from_dir = build_model(load_config(config=tmp_path))
    from_file = build_model(load_config(config=tmp_path / "config.json"))
    count = sum(p.numel() for p in build_model(config).parameters())
    assert sum(p.numel() for p in from_dir.parameters()) == sum(p.numel() for p in from_file.parameters()) == count


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        model = build_model(load_config(name))
        assert next(model.parameters()).device.type == "meta"


def test_cli_json_and_budget_verdict(capsys):
    assert main(["memory", "--preset", "llama-2-7b", "--budget", "24GiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in report["methods"]] == ["adam", "badam", "badam-lean", "badam-lean8", "lora", "lomo"]
    assert report["verdict"].startswith("budget 24GiB: fits: badam, badam-lean, badam-lean8, lora, lomo; does not fit: adam")


def test_cli_table_names_the_largest_block(capsys):
    assert main(["memory", "--preset", "llama-3-8b", "--method", "badam", "--max-block-params", "1000000000000"]) == 0
    assert "the largest, head (525.3M parameters" in capsys.readouterr().out
    assert main(["memory", "--preset", "llama-3-8b", "--method", "badam"]) == 0
    assert "D = 38 blocks; the largest, model.layers.0 (218.1M parameters" in capsys.readouterr().out


def test_tensorboard_memory_logger(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from bcd.lab.integrations.tensorboard import attach_memory_logger

    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=1e-3, switch_every=2)
    writer = SummaryWriter(tmp_path)
    handle = attach_memory_logger(writer, model, optimizer)
    for step in range(3):
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"memory/gradients_MB", "memory/solver_state_MB", "memory/master_copies_MB",
            "memory/weights_bfloat16_MB"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("memory/gradients_MB")] == [0, 1, 2]
    assert all(e.value > 0 for e in events.Scalars("memory/gradients_MB"))


def test_world_size_gives_per_rank_figures():
    model = build_model(load_config("llama-2-7b"))
    one = memory.estimate(model, methods=["badam"]).method("badam")
    four = memory.estimate(model, methods=["badam"], world_size=4).method("badam")
    assert four.breakdown.weights == -(-one.breakdown.weights // 4)
    assert four.breakdown.master_copies == -(-one.breakdown.master_copies // 4)
    tensors = 9  # a Llama layer: 7 matrices and 2 norms, one step counter each
    assert four.breakdown.solver_state - 4 * tensors == -(-(one.breakdown.solver_state - 4 * tensors) // 4)
    with pytest.raises(ValueError, match=r"Invalid world_size: 0; accepted: an integer >= 1"):
        memory.estimate(model, world_size=0)


def test_cli_world_size(capsys):
    assert main(["memory", "--preset", "llama-2-7b", "--method", "badam", "--world-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["methods"][0]["breakdown"]["weights"] == 6738415616


@pytest.mark.parametrize("preset", sorted(__import__("bcd.lab.presets", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_prints_a_full_table_with_default_flags(preset, capsys):
    assert main(["memory", "--preset", preset]) == 0
    out = capsys.readouterr().out
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 3]
    assert {"adam", "badam", "badam-lean", "badam-lean8", "lora", "lomo"} <= set(rows), out


def test_bcd_memory_is_reachable_from_a_bare_import_bcd():
    """As docs/memory.md writes it, in a fresh process where nothing else imported the submodule."""
    import subprocess
    import sys

    script = "import bcd; print(bcd.memory.measure.__name__, bcd.memory.estimate.__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["measure", "estimate"]


def test_estimate_refuses_the_row_entries_the_optimizer_refuses():
    """One check for both: an explicit partition whose row ranges leave a gap is no estimate either."""
    model = MLP()
    rest = [n for n, _ in model.named_parameters() if n != "inp.weight"]
    blocks = [["inp.weight[0:3]"], ["inp.weight[5:8]", *rest]]
    for build in (lambda: memory.estimate(model, methods=["badam"], partitioner="explicit",
                                          partitioner_options={"blocks": blocks}),
                  lambda: bcd.BlockCoordinateOptimizer(model, partitioner="explicit", partitioner_options={"blocks": blocks})):
        with pytest.raises(ValueError, match=r"row ranges of 'inp.weight' are \[\(0, 3\), \(5, 8\)\], which do not tile its 8 rows"):
            build()
