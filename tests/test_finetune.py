"""Instruction data, prompt masking and the `bcd finetune` main job, on local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bcd.lab.cli import main
from bcd.lab.finetune import IGNORE_INDEX, format_prompt, load_instructions, tokenize, train_tokenizer
from bcd.lab.integrations.transformers import ShortRunWarning
from bcd.lab.presets import tiny_llama

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bundled_demo_set_loads():
    data = load_instructions()
    assert len(data) == 600 and {"instruction", "input", "output"} <= set(data.column_names)


def test_prompt_template_with_and_without_input():
    assert format_prompt({"instruction": "Add.", "input": "1 and 2"}).endswith("### Input:\n1 and 2\n\n### Response:\n")
    assert "### Input" not in format_prompt({"instruction": "Say hi.", "input": ""})


def test_prompt_tokens_are_masked_out_of_the_labels():
    data = load_instructions()
    tokenizer = train_tokenizer([format_prompt(e) + e["output"] for e in data], vocab_size=300)
    encoded = tokenize(data.select(range(5)), tokenizer, max_length=256)
    for example, row in zip(data.select(range(5)), encoded):
        prompt_length = len(tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"])
        assert row["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
        response = row["labels"][prompt_length:]
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response[:-1]) == example["output"]
        assert row["input_ids"][prompt_length:] == response


def test_bad_data_is_a_clear_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\], missing \['instruction', 'output'\]"):
        load_instructions(bad)
    with pytest.raises(ValueError, match=r"no-such-dir/x' is no file; accepted: a local .json/.jsonl file"):
        load_instructions(tmp_path / "no-such-dir" / "x")
    with pytest.raises(ValueError, match=r"column 'output' holds int64 values; accepted: text"):
        load_instructions(write_jsonl(tmp_path / "numbers.jsonl", [{"instruction": "add", "output": 3}]))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_real_alpaca_gpt4_sample_loads_and_tokenizes():
    data = load_instructions(SHARED / "alpaca_gpt4_en_999.json")
    assert len(data) == 999
    tokenizer = train_tokenizer([format_prompt(e) + e["output"] for e in data.select(range(200))], vocab_size=400)
    encoded = tokenize(data.select(range(20)), tokenizer, max_length=64)
    assert all(len(r["input_ids"]) <= 64 for r in encoded)


def test_finetune_with_a_local_model_directory_and_dataset(tmp_path, capsys):
    rows = [{"instruction": "Echo the word.", "input": w, "output": w} for w in ["alpha", "beta", "gamma", "delta"] * 5]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    tokenizer = train_tokenizer([format_prompt(r) + r["output"] for r in rows], vocab_size=280)
    model = tiny_llama(vocab_size=len(tokenizer), layers=2, hidden=32)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    # D = 4 blocks at K = 2 need 8 steps to visit each once: 6 leave one untrained, and the run says so.
    with pytest.warns(ShortRunWarning, match=r"6 steps are fewer than one block-epoch \(K x D = 2 x 4 = 8\): 1 of the 4"):
        code = main(["finetune", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
                     "--max-steps", "6", "--batch-size", "4", "--switch-every", "2", "--no-tensorboard", "--dtype", "fp32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eval loss before -> after" in printed and "block-epochs completed" in printed
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # --dtype fp32 trained in fp32


def test_finetune_demo_defaults_learn(tmp_path):
    from bcd.lab.finetune import finetune

    summary = finetune(output_dir=str(tmp_path), max_steps=60, switch_every=5, progress=False)
    assert summary.loss_after < summary.loss_before - 1.0
    assert summary.block_epochs == 2 and summary.blocks == 6
    assert summary.memory["solver_state"] < summary.adamw_estimate["solver_state"] / 2
    assert summary.tensorboard_dir is not None and Path(summary.tensorboard_dir).is_dir()


def test_finetune_lean_8bit_learns_with_8bit_moments_and_no_master_copies(tmp_path):
    """``lean="8bit"`` reaches bcd.BAdam: the same run holds under a third of the moments' bytes and no master
    copies, only the fp32 scratch of one chunk (here the largest entry, the embedding: half the masters' bytes)."""
    from bcd.lab.finetune import finetune

    runs = {lean: finetune(output_dir=str(tmp_path / str(lean)), max_steps=12, switch_every=2, progress=False,
                           tensorboard=False, lean=lean) for lean in (False, "8bit")}
    lean, default = runs["8bit"].memory, runs[False].memory
    assert runs["8bit"].loss_after < runs["8bit"].loss_before - 0.5
    assert lean["solver_state"] < default["solver_state"] / 3  # 2 bytes of codes an element against 8, scales, norms
    assert lean["master_copies"] < default["master_copies"] / 2


def test_finetune_refuses_bad_numbers():
    from bcd.lab.finetune import finetune

    with pytest.raises(ValueError, match=r"Invalid max_steps: 0; accepted: an integer >= 1"):
        finetune(max_steps=0)


def test_training_curves_land_in_the_printed_tensorboard_folder(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    assert main(["finetune", "--output-dir", str(out), "--max-steps", "20", "--switch-every", "5"]) == 0
    folder = out.absolute() / "tensorboard"
    assert f"TensorBoard logs: tensorboard --logdir {folder}" in capsys.readouterr().out.splitlines()
    scalars = set()
    for events in folder.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/bcd/active_block",
            "train/bcd/switches"} <= scalars, scalars
    assert list(work.iterdir()) == []  # nothing under the working directory
