"""Helpers shared by the benchmarks in tools/: spreads, machine facts, peak memory, tables, clocks.

Machine facts come from ``torch.utils.collect_env`` (what PyTorch's own bug reports use); tables
print with rich. Phases of a training step are timed inline with :class:`Stopwatch` rather than
with ``torch.utils.benchmark.Timer``: a training step changes the weights and the block schedule,
so re-running one statement many times, which is what Timer does, would not measure a run.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max: every figure in the benchmarks is reported this way."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def merge_spreads(spreads: Sequence[dict[str, float]]) -> dict[str, float]:
    """One spread over several runs: the median of their medians, the min of mins, the max of maxes."""
    return {"median": statistics.median(s["median"] for s in spreads),
            "min": min(s["min"] for s in spreads), "max": max(s["max"] for s in spreads)}


def environment(packages: Sequence[str] = ()) -> dict:
    """The machine and the versions that matter, for a benchmark's report (``torch.utils.collect_env``)."""
    from torch.utils import collect_env

    info = collect_env.get_env_info()
    versions = {"python": platform.python_version(), "torch": info.torch_version}
    for package in ("transformers", *packages):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cpu = next((line.split(":", 1)[1].strip() for line in (info.cpu_info or "").splitlines()
                if line.startswith("Model name")), platform.processor())
    return {"machine": info.os, "processor": cpu, "cpus": os.cpu_count(),
            "gpus": info.nvidia_gpu_models or None, "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux ``VmHWM``, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to ``clear_refs`` resets ``VmHWM``); a no-op where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Stopwatch:
    """Wall-clock seconds since the last :meth:`lap`, synchronising CUDA first so that the time is the device's."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def ms(s: dict[str, float]) -> str:
    """A spread of seconds as ``median [min-max]`` milliseconds."""
    return f"{1e3 * s['median']:.1f} [{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}]"


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A rich table on the terminal."""
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The same rows as a markdown table, for docs/benchmarks.md."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
