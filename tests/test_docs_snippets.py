"""Every fenced Python and shell snippet of README.md and docs/*.md runs, offline, as written.

The rules that make a snippet runnable here are mechanical, and these are all of them:

- **Python** snippets run one by one, each in a fresh namespace that already holds ``torch``,
  ``bcd``, ``model`` (a bf16 tiny Llama from :func:`bcd.lab.presets.tiny_llama`), ``optimizer``
  (``bcd.BAdam`` over it), ``loader`` (a ``DataLoader`` of ``input_ids``/``labels`` batches),
  ``data`` (a ``datasets.Dataset`` of the same) and ``rank = 0``, with ``examples/bcd-halves`` on
  ``sys.path``; a hub name in :data:`HUB` is replaced by a tiny model saved locally.
- **Shell** snippets run command by command (backslash continuations joined, ``# comments``
  dropped) in a fresh folder; placeholders in :data:`PLACEHOLDERS` become local files; slow
  commands get the flags in :data:`FASTER` appended (a later flag wins); commands starting with a
  prefix in :data:`NOT_RUN` are skipped with its reason.
- A snippet preceded by ``<!-- snippet: skip, REASON -->`` is skipped with that reason.

Skips show in pytest's summary (``-ra``) with their reasons.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "bcd-halves" / "README.md"]
FENCE = re.compile(r"(?:<!-- snippet: skip, (?P<skip>.+?) -->\n)?^```(?P<lang>python|bash|shell|sh)\n(?P<code>.*?)^```",
                   re.S | re.M)
# The docs' TrainingArguments say use_cpu themselves (bf16=True without CUDA needs it): they run as written.
HUB = {"meta-llama/Llama-3.2-1B": "{tiny_model}"}
PLACEHOLDERS = {"path/to/config.json": "{tiny_config}", "path/or/hub-name": "{tiny_model}", "data.jsonl": "{tiny_data}"}
FASTER = {"bcd finetune": "--max-steps 12 --switch-every 3", "bcd profile": "--batch 2 --seq 32 --repeats 1 --warmup 0"}
NOT_RUN = {
    "pip install": "installation: the suite runs after it",
    "python -m pytest": "the test suite itself",
    "torchrun": "several processes: tests/test_distributed.py runs every mode on 2 ranks",
    "accelerate launch": "accelerate's FSDP2 config: GPUs only",
    "python tools/": "a benchmark: minutes on a quiet machine, run by hand",
}


def snippets():
    for source in SOURCES:
        text = source.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start("code")].count("\n") + 1
            kind = "python" if match["lang"] == "python" else "shell"
            yield pytest.param(kind, match["code"], match["skip"], id=f"{source.relative_to(ROOT)}:{line}")


def commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    lines = [line.split(" # ")[0].split("  #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The tiny model, config and data that stand in for hub names and placeholder paths."""
    from bcd.lab.finetune import train_tokenizer
    from bcd.lab.presets import tiny_llama, tiny_llama_config

    folder = tmp_path_factory.mktemp("docs")
    rows = [{"instruction": "Echo the word.", "input": w, "output": w} for w in ["alpha", "beta", "gamma"] * 4]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer([r["instruction"] + r["output"] for r in rows], vocab_size=280)
    model = tiny_llama(vocab_size=len(tokenizer), layers=2, hidden=32)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "config.json").write_text(json.dumps(tiny_llama_config(layers=2, hidden=32)))
    return {"tiny_model": str(folder / "model"), "tiny_config": str(folder / "config.json"),
            "tiny_data": str(folder / "data.jsonl")}


def namespace() -> dict:
    import datasets

    import bcd
    from bcd.lab.presets import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=32, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (4, 16))
    batches = [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in (0, 2)]
    return {
        "torch": torch, "bcd": bcd, "model": model, "optimizer": bcd.BAdam(model, lr=1e-3, switch_every=2),
        "loader": torch.utils.data.DataLoader(batches, batch_size=None), "rank": 0,
        "data": datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
    }


def substitute(code: str, table: dict[str, str], local: dict[str, str]) -> str:
    for placeholder, value in table.items():
        code = code.replace(placeholder, value.format(**local))
    return code


@pytest.mark.parametrize("kind,code,skip", list(snippets()))
def test_snippet_runs(kind, code, skip, local, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    if kind == "python":
        monkeypatch.syspath_prepend(str(ROOT / "examples" / "bcd-halves"))
        exec(compile(substitute(code, HUB, local), "<snippet>", "exec"), namespace())
        return
    ran = 0
    for command in commands(substitute(code, PLACEHOLDERS, local)):
        reason = next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)
        if reason is None and "--device cuda" in command and not torch.cuda.is_available():
            reason = "needs CUDA"
        if reason:
            continue
        extra = next((flags for prefix, flags in FASTER.items() if command.startswith(prefix)), "")
        argv = shlex.split(f"{command} {extra}")
        if argv[0] == "python":
            argv[0] = sys.executable
        result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        ran += 1
    if not ran:
        pytest.skip("every command is one of: " + "; ".join(f"{p}: {w}" for p, w in NOT_RUN.items()))
