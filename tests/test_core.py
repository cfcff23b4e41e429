"""The library needs torch, pluggy and attrs alone; the lab (CLI, presets, integrations) comes with the extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = ("transformers", "accelerate", "datasets", "tensorboard", "rich", "matplotlib", "tokenizers")

# Run in a fresh interpreter where every lab package fails to import, as in `pip install bcd` without extras.
WITHOUT_LAB = f'''
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {LAB!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name.split(".")[0])
sys.meta_path.insert(0, Absent())
import torch, bcd
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
before = [p.detach().clone() for p in model.parameters()]
optimizer = bcd.BAdam(model, lr=1e-2, switch_every=1)
for step in range(len(optimizer.blocks)):
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a block was not trained"
assert not any(m.split(".")[0] in {LAB!r} for m in sys.modules)
from bcd.lab.cli import main
assert main(["plugins"]) == 2
print("trained", len(optimizer.blocks), "blocks")
'''


def test_the_library_depends_on_torch_pluggy_and_attrs_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert names == {"torch", "pluggy", "attrs"}
    lab = {d.split(">")[0].strip() for d in project["optional-dependencies"]["lab"]}
    assert lab == set(LAB)


def test_bcd_trains_and_the_cli_says_what_to_install_without_the_lab_packages():
    result = subprocess.run([sys.executable, "-c", WITHOUT_LAB], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trained 3 blocks"
    assert result.stderr.strip().endswith("the command line needs the lab extra (rich is not installed); "
                                          "accepted: pip install 'bcd[lab]'")


def test_the_gpu_check_says_it_skips_without_cuda():
    import torch

    if torch.cuda.is_available():
        return  # on a GPU it runs the checks: tools/gpu_check.py by hand
    result = subprocess.run([sys.executable, "tools/gpu_check.py"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == (
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check, skipped.")
