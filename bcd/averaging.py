"""Gradient averaging over ranks for ``data_parallel=True``: fixed buckets, launched during backward.

bcd's own data parallelism averages only what is trained this step (the active block, and with
the expansion the blocks it steps), so no wrapper is needed. One blocking all-reduce per tensor
would pay the collective's latency once per tensor and wait for each; DDP's answer, used here
too, is buckets:

- The tensors are laid, in reverse order (backward produces the last layers' gradients first),
  into buckets of at most :data:`BUCKET_BYTES` bytes of one dtype and device.
- As backward accumulates a gradient (``register_post_accumulate_grad_hook``) it is marked
  ready; a bucket whose tensors are all ready is flattened and its all-reduce launched
  asynchronously, in bucket order, so that every rank issues the same collectives in the same
  order while backward goes on below.
- At the end of backward (a callback queued on autograd's engine, as FSDP2 does) the buckets not
  yet launched are launched with the tensors that got a gradient, every launch is waited for, and
  the sums divided by the world size are copied back into ``.grad``. Clipping and the step
  therefore see the mean, as they would with one call per tensor: the same sums, the same values.

With gradient accumulation every micro-batch's backward averages what ``.grad`` holds; the
earlier micro-batches' part is equal on every rank already, so the mean of the sums is the sum
of the means, as with DDP without ``no_sync``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

#: The most bytes one all-reduce carries (DDP's default ``bucket_cap_mb``, 25 MiB); 0: one call per tensor.
BUCKET_BYTES = 25 * 2**20


class GradientBuckets:
    """The buckets of one set of tensors, and the state of the backward now running.

    The end of backward is where autograd's engine runs its queued callbacks: torch has no public
    hook for it (a multi-grad hook fires before the last accumulation, and fails under
    ``torch.autograd.grad`` on leaves), so this queues one as FSDP2 does, the project's one use of
    a private torch member (``Variable._execution_engine``, allowed by name in
    tests/test_architecture.py). Each backward (a reentrant checkpoint's inner one too) finishes
    once, with every gradient it accumulated.

    Args:
        params: the tensors whose gradients are averaged (the active block's, or the expanded ones).
        group: the process group (None: the default one).
        bucket_bytes: the most bytes per bucket; a tensor larger than that is a bucket of its own.
    """

    def __init__(self, params: Iterable[nn.Parameter], group: Any = None, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = list(params)
        self.group = group
        self.world = dist.get_world_size(group)
        self.buckets: list[list[int]] = []  # indices into params
        self._where: list[int] = [0] * len(self.params)  # index -> its bucket
        size = 0
        for index in reversed(range(len(self.params))):
            param = self.params[index]
            nbytes = param.numel() * param.element_size()
            last = self.params[self.buckets[-1][0]] if self.buckets else None
            if last is None or size + nbytes > bucket_bytes or (param.dtype, param.device) != (last.dtype, last.device):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(index)
            self._where[index] = len(self.buckets) - 1
            size += nbytes
        self._reset()

    def _reset(self) -> None:
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._launched: list[tuple[list[torch.Tensor], torch.Tensor | None, Any]] = []
        self._queued = False

    def hooks(self) -> list[RemovableHandle]:
        """One post-accumulate-grad hook per tensor (``remove()`` each to stop averaging)."""
        return [param.register_post_accumulate_grad_hook(functools.partial(self._accumulated, index))
                for index, param in enumerate(self.params)]

    def _accumulated(self, index: int, param: torch.Tensor) -> None:
        if not self._queued:  # once per backward: finish after its last node
            Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        self._ready[self._where[index]].add(index)
        while len(self._launched) < len(self.buckets):
            bucket = len(self._launched)
            if len(self._ready[bucket]) < len(self.buckets[bucket]):
                break
            self._launch(bucket)

    def _launch(self, bucket: int) -> None:
        """Flatten the ready gradients of ``bucket`` and start their sum over the ranks."""
        grads = [g for i in self.buckets[bucket] if i in self._ready[bucket] and (g := self.params[i].grad) is not None]
        if not grads:
            self._launched.append(([], None, None))
            return
        # A lone contiguous gradient (a large tensor is a bucket of its own) is reduced in place, not copied.
        flat = grads[0].view(-1) if len(grads) == 1 and grads[0].is_contiguous() else torch.cat([g.reshape(-1) for g in grads])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._launched.append((grads, flat, work))

    def _finish(self) -> None:
        """End of backward: launch the rest, wait, and write the means back into ``.grad``."""
        try:
            while len(self._launched) < len(self.buckets):
                self._launch(len(self._launched))
            for grads, flat, work in self._launched:
                if work is None:
                    continue
                work.wait()
                flat.div_(self.world)
                if flat.data_ptr() == grads[0].data_ptr():  # reduced in place
                    continue
                offset = 0
                for grad in grads:
                    grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
        finally:
            self._reset()


def average_gradients(params: Iterable[nn.Parameter], group: Any = None) -> list[RemovableHandle]:
    """Average the gradients of ``params`` over the ranks at every backward, in buckets (module docstring).

    Returns:
        The hooks' handles: removing them stops the averaging.
    """
    params = list(params)
    if not params:
        return []
    if BUCKET_BYTES <= 0:  # one blocking call per tensor, as backward accumulates it (a benchmark's baseline)
        world = dist.get_world_size(group)

        def hook(param: torch.Tensor) -> None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
            param.grad.div_(world)

        return [p.register_post_accumulate_grad_hook(hook) for p in params]
    return GradientBuckets(params, group, BUCKET_BYTES).hooks()
