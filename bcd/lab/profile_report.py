"""Ways to show a :class:`bcd.lab.profiler.Profile`: table, summary, JSON, CSV, plot, TensorBoard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import attrs
from rich.table import Table

from bcd.lab.profiler import BlockProfile, Profile


def _rows(result: Profile) -> list[BlockProfile]:
    return [result.full, *result.blocks, result.none]


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def table(result: Profile) -> Table:
    """A rich table, one row per configuration."""
    out = Table(title=f"Profile of {result.model}: batch {result.batch} x seq {result.seq}, {result.dtype}, "
                      f"{result.device}, checkpointing {'on' if result.checkpointing else 'off'}, "
                      f"median of {result.repeats} [min-max]")
    for column in ("block", "depth", "params", "forward ms", "backward ms", "backward/full (time)",
                   "backward GFLOP", "backward/full (FLOPs)", "memory delta"):
        out.add_column(column, justify="left" if column == "block" else "right")
    for row in _rows(result):
        backward = row.backward_time
        out.add_row(
            row.name,
            str(row.depth) if row.depth >= 0 else "",
            f"{row.params:,}",
            f"{_ms(row.forward_time.median)} [{_ms(row.forward_time.min)}-{_ms(row.forward_time.max)}]",
            f"{_ms(backward.median)} [{_ms(backward.min)}-{_ms(backward.max)}]" if backward else "-",
            f"{row.backward_time_ratio:.3f}" if row.backward_time_ratio is not None else "-",
            f"{row.backward_flops / 1e9:.3f}",
            f"{row.backward_flops_ratio:.3f}",
            f"{row.memory_delta / 1e6:.1f} MB" if row.memory_delta is not None else "n/a",
        )
    return out


def summary(result: Profile) -> str:
    """The block-epoch prediction, in words."""
    e = result.epoch
    return (
        f"Block-epoch over D = {e.blocks} blocks, backward relative to full-parameter backward:\n"
        f"  paper's coarse count (D+1)/(2D)         {e.coarse:.3f}\n"
        f"  refined count (D+2)/(4D) + head share   {e.refined:.3f}  (head share {e.head_share:.3f})\n"
        f"  counted FLOPs                           {e.flops:.3f}\n"
        f"  measured time                           {e.time:.3f}"
    )


NOISY = 2.0  # max / min of a block's repeats above which its time ratio is not to be trusted


def spread_warning(result: Profile) -> str | None:
    """A warning when the repeats of some timing disagree by more than :data:`NOISY` times, else None."""
    spreads = [(row.name, t.max / t.min) for row in result.blocks
               for t in (row.forward_time, row.backward_time) if t is not None and t.min > 0]
    name, worst = max(spreads, key=lambda s: s[1], default=(None, 1.0))
    if worst <= NOISY:
        return None
    return (f"warning: repeats disagree up to {worst:.1f}x (max/min, {name}): the machine was busy, so the measured "
            f"time ratios are unreliable (the FLOP ratios are not affected); rerun with more --repeats on a quiet machine.")


def to_dict(result: Profile) -> dict:
    """The JSON document: ``attrs.asdict`` of the profile, tuples as lists (schema: docs/profile.schema.json)."""
    return json.loads(json.dumps(attrs.asdict(result)))


def write_json(result: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(result), indent=2))


def write_csv(result: Profile, path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["block", "depth", "params", "forward_s_median", "backward_s_median", "backward_s_min",
                         "backward_s_max", "backward_time_ratio", "forward_flops", "backward_flops",
                         "backward_flops_ratio", "memory_delta_bytes"])
        for row in _rows(result):
            b = row.backward_time
            writer.writerow([row.name, row.depth, row.params, row.forward_time.median, b.median if b else "",
                             b.min if b else "", b.max if b else "", row.backward_time_ratio or "",
                             row.forward_flops, row.backward_flops, row.backward_flops_ratio,
                             row.memory_delta if row.memory_delta is not None else ""])


def plot(result: Profile, path: str | Path) -> None:
    """Backward time and FLOPs by depth, each with the full-backward line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b.name for b in result.blocks]
    depth = list(range(len(names)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    times = [1e3 * b.backward_time.median for b in result.blocks]
    errors = [[1e3 * (b.backward_time.median - b.backward_time.min) for b in result.blocks],
              [1e3 * (b.backward_time.max - b.backward_time.median) for b in result.blocks]]
    left.bar(depth, times, yerr=errors, color="tab:blue", capsize=3, label="block active alone")
    left.axhline(1e3 * result.full.backward_time.median, color="tab:red", linestyle="--", label="full backward")
    left.set_ylabel("backward time, ms (median, min-max)")
    right.bar(depth, [b.backward_flops / 1e9 for b in result.blocks], color="tab:green", label="block active alone")
    right.axhline(result.full.backward_flops / 1e9, color="tab:red", linestyle="--", label="full backward")
    right.set_ylabel("backward GFLOP (counted)")
    for axis in (left, right):
        axis.set_xticks(depth, names, rotation=60, ha="right", fontsize=8)
        axis.set_xlabel("active block (input to output)")
        axis.legend()
    figure.suptitle(f"{result.model}: batch {result.batch} x seq {result.seq}, {result.dtype}, {result.device}; "
                    f"block-epoch backward / full: FLOPs {result.epoch.flops:.2f}, time {result.epoch.time:.2f}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_tensorboard(result: Profile, directory: str | Path) -> None:
    """Per-block scalars, with the depth as the step, and the summary as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for block in result.blocks:
        writer.add_scalar("profile/backward_ms", 1e3 * block.backward_time.median, block.depth)
        writer.add_scalar("profile/forward_ms", 1e3 * block.forward_time.median, block.depth)
        writer.add_scalar("profile/backward_flops_ratio", block.backward_flops_ratio, block.depth)
        writer.add_scalar("profile/backward_time_ratio", block.backward_time_ratio, block.depth)
    writer.add_text("profile/summary", "```\n" + summary(result) + "\n```")
    writer.close()
