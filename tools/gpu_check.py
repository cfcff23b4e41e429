"""The GPU check in one command: every CUDA test, then the 8B memory benchmark on the device.

    python tools/gpu_check.py                 # on a machine with CUDA: tests, then llama-3-8b
    python tools/gpu_check.py --shape small   # a quick benchmark shape instead

Runs ``pytest -m cuda`` (tests/test_cuda.py: fused kernels on CUDA, fp32 buffers and masters on
the device, live measurement with ``torch.cuda.max_memory_allocated``, a CUDA state dict resumed
on the CPU) and ``tools/bench_scale.py --device cuda`` for bcd (K = 1, every block once), which
prints CUDA's peak allocated and reserved memory beside ``bcd memory``'s estimate. Without CUDA
it says so in one line and exits 0, so it can run anywhere. Exit status: 1 if a test or the
benchmark failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b", help="bench_scale.py shape (default llama-3-8b)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check, skipped.")
        return 0
    print(f"gpu_check: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}", flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], cwd=ROOT)
    bench = subprocess.run([sys.executable, "tools/bench_scale.py", "--shape", args.shape, "--methods", "bcd",
                            "--steps", "0", "--device", "cuda"], cwd=ROOT)
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
