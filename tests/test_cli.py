"""The ``bcd`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bcd.lab.cli import main


def test_plugins_lists_builtins_with_their_package(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    import bcd

    assert {"kind": "solver", "name": "adamw", "source": f"bcd {bcd.__version__}"} in rows
    assert all(r["source"].startswith("bcd ") for r in rows if r["name"] in {"layer", "random", "sgd"})
    assert {(r["kind"], r["name"]) for r in rows} >= {
        ("partitioner", "layer"), ("partitioner", "random-subset"), ("partitioner", "per-module"),
        ("partitioner", "explicit"), ("ordering", "ascending"), ("ordering", "descending"),
        ("ordering", "random"), ("ordering", "fixed"), ("solver", "adam"), ("solver", "sgd"),
    }


def test_plugins_table_through_the_console_script():
    result = subprocess.run(["bcd", "plugins"], capture_output=True, text=True, check=True)
    assert "random-subset" in result.stdout and "bcd 0.1.0" in result.stdout


def test_help_names_every_command():
    result = subprocess.run([sys.executable, "-m", "bcd.lab.cli", "--help"], capture_output=True, text=True, check=True)
    assert "plugins" in result.stdout


def test_every_flag_of_every_command_has_help():
    import argparse

    from bcd.lab.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"plugins", "memory", "profile", "finetune"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"bcd {name} {action.option_strings[0]} has no help"
        assert sub.description, name


def _files(tmp_path):
    (tmp_path / "string.json").write_text('"just a string"')
    (tmp_path / "hidden.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "64"}))
    (tmp_path / "heads.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                     "num_key_value_heads": 3}))
    (tmp_path / "numbers.jsonl").write_text(json.dumps({"instruction": "add", "output": 3}) + "\n")
    (tmp_path / "huge.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10**18}))
    (tmp_path / "wide.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 2**40, "num_attention_heads": 1}))
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "a-file").write_text("")
    return tmp_path


TINY = ["--preset", "llama-tiny"]
BAD_INVOCATIONS = [
    ([], "required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["plugins", "--bogus"], "unrecognized arguments: --bogus"),
    (["memory"], "one of the arguments --preset --config is required"),
    (["memory", "--preset", "llama-99"], "invalid choice: 'llama-99'"),
    (["memory", "--config", "{tmp}/missing.json"], "missing.json': no such file or folder"),
    (["memory", "--config", "{tmp}/string.json"], "it holds str 'just a string'"),
    (["memory", "--config", "{tmp}/hidden.json"], "expected int, got str"),
    (["memory", "--config", "{tmp}/heads.json"], "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (["memory", "--config", "{tmp}/huge.json"], f"vocab_size={10**18}; accepted: an integer from 1 to 2**24"),
    (["profile", "--config", "{tmp}/wide.json"], f"hidden_size={2**40}; accepted: an integer from 1 to 2**24"),
    (["memory", *TINY, "--batch", "0"], "argument --batch: '0'; accepted: an integer >= 1"),
    (["memory", *TINY, "--seq", "0"], "argument --seq: '0'"),
    (["memory", *TINY, "--lora-rank", "-8"], "argument --lora-rank: '-8'"),
    (["memory", *TINY, "--world-size", "0"], "argument --world-size: '0'"),
    (["memory", *TINY, "--batch", "two"], "argument --batch: 'two'; accepted: an integer >= 1"),
    (["memory", *TINY, "--budget", "lots"], "Invalid size: 'lots'"),
    (["memory", *TINY, "--method", "sgd"], "argument --method: invalid choice: 'sgd'"),
    (["memory", *TINY, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["memory", *TINY, "--partition", "random-subset"], "Missing option(s) ['num_blocks'] for partitioner 'random-subset'"),
    (["memory", *TINY, "--partition-option", "oops"], "Invalid --partition-option: 'oops'"),
    (["memory", *TINY, "--lora-targets", "nothing"], "Invalid LoRA targets: ['nothing']"),
    (["profile", *TINY, "--json", "{tmp}/no/dir/x.json"], "x.json': not a writable file path"),
    (["profile", *TINY, "--plot", "{tmp}"], "not a writable file path"),
    (["profile", *TINY, "--tensorboard", "{tmp}/a-file/logs"], "not a writable folder"),
    (["profile", *TINY, "--repeats", "0"], "argument --repeats: '0'"),
    (["profile", *TINY, "--warmup", "-1"], "argument --warmup: '-1'; accepted: an integer >= 0"),
    (["profile", *TINY, "--device", "tpu"], "Unknown device: 'tpu'"),
    (["finetune", "--order", "zigzag", "--output-dir", "{tmp}/out"], "Unknown ordering: 'zigzag'"),
    (["finetune", "--model", "./no/such/model", "--output-dir", "{tmp}/out"], "'./no/such/model' is no local folder"),
    (["finetune", "--dataset", "{tmp}/numbers.jsonl", "--output-dir", "{tmp}/out"], "column 'output' holds int64 values"),
    (["finetune", "--dataset", "./missing.jsonl", "--output-dir", "{tmp}/out"], "'./missing.jsonl' is no file"),
    (["finetune", "--output-dir", "{tmp}/a-file/out"], "not a writable folder"),
    (["finetune", "--model", "{tmp}/encoder", "--output-dir", "{tmp}/out"], "encoder' is not a causal LM (model_type 'bert'"),
    (["finetune", "--model", "{tmp}/no-tokenizer", "--output-dir", "{tmp}/out"], "no tokenizer in '"),
    (["finetune", "--dtype", "fp8", "--output-dir", "{tmp}/out"], "argument --dtype: invalid choice: 'fp8'"),
    (["finetune", "--lr", "-1"], "argument --lr: '-1'; accepted: a finite number > 0.0"),
    (["finetune", "--lr", "inf"], "argument --lr: 'inf'; accepted: a finite number > 0.0"),
    (["finetune", "--max-steps", str(10**20)], f"argument --max-steps: '{10**20}'; accepted: an integer >= 1 and <= 1e+09"),
    (["memory", *TINY, "--budget", "24"], "Invalid size: '24'; accepted: a positive number up to 1 PiB with a unit"),
    (["memory", *TINY, "--budget=1" + "0" * 400 + "GB"], "Invalid size: '100000"),
    (["finetune", "--max-steps", "0"], "argument --max-steps: '0'"),
]


def test_bad_invocation_table_is_large_enough():
    assert len(BAD_INVOCATIONS) >= 20


@pytest.mark.parametrize("argv,text", BAD_INVOCATIONS, ids=[" ".join(a)[:40] or "(none)" for a, _ in BAD_INVOCATIONS])
def test_a_bad_invocation_is_one_line_and_exit_2(argv, text, tmp_path, capsys):
    tmp = _files(tmp_path)
    code = main([a.replace("{tmp}", str(tmp)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and text in err, err
    assert err.startswith("bcd")
    assert not (tmp / "out").exists()  # refused before any work


def test_the_console_script_exits_2_with_one_line():
    result = subprocess.run(["bcd", "memory", "--preset", "llama-tiny", "--seq", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["bcd memory: error: argument --seq: '0'; accepted: an integer >= 1 and <= 1e+09"]


def test_a_refused_dataset_is_one_line_on_stderr_from_the_console_script(tmp_path):
    """datasets logs its own error for a malformed file: the refusal must stay the only line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "add", "output": "3"}\n{bad json\n')
    result = subprocess.run(["bcd", "finetune", "--dataset", str(bad), "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    *before, refusal = result.stderr.splitlines()
    assert refusal.startswith("bcd finetune: error: Cannot load dataset") and "JSON parse error" in refusal
    # Other packages may warn as they are imported (bitsandbytes, on a CPU with AVX512-BF16, asks for
    # `kernels`); what must not reach stderr is datasets' own report of the same error.
    assert not any("JSON parse error" in line or "Traceback" in line or "datasets" in line for line in before), result.stderr


def test_a_closed_pipe_ends_quietly():
    """`bcd plugins --json | head -1`: the reader closed the pipe; no BrokenPipeError on stderr."""
    result = subprocess.run("bcd plugins --json | head -1", shell=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[" and result.stderr == ""


def test_parameter_counts_are_readable(capsys):
    assert main(["memory", "--preset", "llama-tiny"]) == 0
    out = capsys.readouterr().out
    assert "0.00B" not in out and "K parameters, bfloat16" in out
