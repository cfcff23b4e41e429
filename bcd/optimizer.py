r"""The block-coordinate optimizer: one block trained at a time by an inner solver.

With a partition :math:`\theta = (\theta_1, \dots, \theta_D)`, block-epoch :math:`t` visits the
blocks in an order :math:`\pi^t`; the block :math:`\pi^t_i` gets :math:`K` steps of the inner
solver (``switch_every``), starting from fresh solver state, while every other block is frozen:

.. math::

    \theta_{\pi_i}^{t,k+1} = \mathrm{Solver}(\theta_{\pi_i}^{t,k}, \nabla_{\pi_i} f(\theta^{t,k})),
    \quad k = 0, \dots, K-1.

Frozen means ``requires_grad=False`` and ``grad=None``, so autograd computes no weight gradient
for frozen blocks and stops below the lowest active parameter. This class is the wiring: the
schedule is :class:`bcd.schedule.BlockSchedule`, the groups :func:`bcd.groups.outer_groups`,
state-dict checks :func:`bcd.state.check`, the wait for a wrapper :class:`bcd.distributed.WrapperWait`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd import checkpointing, distributed, layout, rowgrad, state
from bcd.activation import ActiveBlock
from bcd.buffers import Buffers
from bcd.blocks import Block, Partition
from bcd.construction import Composition, PrecisionNote, check_partition, compose, partition_of, warn_if_fp32
from bcd.events import BlockSwitch, SwitchHooks
from bcd.groups import check_groups, copy_hyperparameters
from bcd.observe import observed_norm
from bcd.schedule import BlockSchedule
from bcd.tenure import Tenure, check_unreplaced, owner_of, refuse_copy

STATE_FORMAT = state.STATE_FORMAT
__all__ = ["BlockCoordinateOptimizer", "PrecisionNote", "STATE_FORMAT"]

def _construction_only(optimizer: torch.optim.Optimizer, value: Any) -> None:
    """torch's ``Optimizer.__init__`` sets ``state`` to an empty dict; nothing else may."""
    if value:
        raise AttributeError("BlockCoordinateOptimizer.state is read-only: bcd keeps the active block's solver state "
                             "in .solver, and restores it with load_state_dict().")


class BlockCoordinateOptimizer(torch.optim.Optimizer):
    """Train one block of a model at a time with an inner ``torch.optim`` solver.

    ``param_groups`` hold every parameter of the partition with the solver's hyperparameters
    (LR schedulers, the Trainer, ``clip_grad_norm_`` work as usual); they are checked and copied
    into the solver's groups before each step. A model is driven by one optimizer at a time: a
    second one over the same model (a re-run notebook cell) takes over with the candidates the
    first saw and closes the first. :meth:`close` (or a ``with`` block, or garbage collection)
    removes every hook the optimizer installed.

    Args:
        model: the model; its parameters that require grad now are the candidates to train.
        lr: learning rate handed to the solver (its own default when None).
        switch_every: K, ``step()`` calls per block visit (accumulation micro-steps do not count).
        partitioner: a registered name (``layer``, ``random-subset``, ``per-module``, ``explicit``, a plugin's) or a Partitioner.
        partitioner_options: keyword options for a partitioner given by name.
        order: a registered name (``ascending``, ``descending``, ``random``, ``fixed``, ``importance``, a plugin's)
            or a :class:`bcd.Ordering` object.
        order_options: options for an ordering given by name; ``start_block`` may be a block name.
        solver: a registered name (``adam``, ``adamw``, ``sgd``, a plugin's) or a factory
            ``factory(param_groups, **solver_options)``, e.g. ``functools.partial(torch.optim.AdamW, ...)``.
        solver_options: the solver's hyperparameters, unchanged (``weight_decay`` is what you set).
        no_decay: put 1-D parameters (biases, norm weights) in a group with ``weight_decay=0``.
        groups: torch-style group dicts with ``"params"`` (parameters or names) and hyperparameter
            overrides; candidates in no group form the first, default group.
        data_parallel: average the active block's gradients across ranks (:mod:`bcd.distributed`).
        max_block_params: split any partitioner's blocks larger than this many elements by rows
            (``Partition.limit``), so a plugin partitioner gets row blocks without knowing of them.
        lean: no fp32 masters: bf16/fp16 blocks stepped in fp32 chunks, rounded (:mod:`bcd.precision`); "8bit": 8-bit moments.

    Raises:
        ValueError: any invalid argument, naming the value received and what is accepted.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float | None = None,
        switch_every: int = 50,
        partitioner: Any = "layer",
        partitioner_options: Mapping[str, Any] | None = None,
        order: Any = "ascending",
        order_options: Mapping[str, Any] | None = None,
        solver: str | Callable[..., torch.optim.Optimizer] = "adamw",
        solver_options: Mapping[str, Any] | None = None,
        no_decay: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        data_parallel: bool = False,
        max_block_params: int | None = None,
        lean: bool | str = False,
    ) -> None:
        # Everything is checked before anything changes: a refused call leaves the model as it was.
        previous = owner_of(model)
        plan: Composition = compose(
            model, lr=lr, switch_every=switch_every, partitioner=partitioner, partitioner_options=partitioner_options,
            order=order, order_options=order_options, solver=solver, solver_options=solver_options, no_decay=no_decay,
            groups=groups, data_parallel=data_parallel, max_block_params=max_block_params, lean=lean)
        super().__init__([{**hyper, "params": [plan.candidates[n] for n in names]} for hyper, names in plan.groups],
                         plan.defaults)
        #: The checked pieces this optimizer was built from (names, objects, solver factory, defaults).
        self.composition = plan
        self._model, self.data_parallel = model, data_parallel
        self.partition, self.schedule = plan.partition, plan.schedule
        self._group_names = [names for _, names in plan.groups]
        if previous is not None:  # first: it gives back the rows it registered (bcd.rowgrad)
            previous.close(reason="a newer optimizer over the same model took over")
        self._block = ActiveBlock(plan.candidates, data_parallel, lambda: self._wait is not None and self._wait.pending,
                                  Buffers(plan.buffers), plan.lean, rowgrad.owners(model, plan.candidates))
        self._switch_hooks = SwitchHooks()
        #: Block switches so far (a revisit of the same block is none), kept across state dicts.
        self.switches = 0
        # Closing, or collecting, the optimizer hands the candidates back trainable, as it found them.
        self._tenure = Tenure(self, plan.candidates.values())
        checkpointing.make_compatible(model)
        # On several ranks with a plain model, freezing waits for the first forward: DDP registers
        # only the parameters that require grad when the Trainer or accelerate builds it.
        self._wait = distributed.WrapperWait(model, self._adopt) if plan.awaiting_wrapper else None
        if self._wait is None:
            self._block.freeze_all()
        else:
            self._tenure.hooks.append(self._wait.handle)
        warn_if_fp32(plan.candidates)
        self._activate(reason="start")
        # Checkpointing switched on later (the Trainer does) must not run backward through frozen blocks.
        self._tenure.hooks.append(checkpointing.guard(model))

    # ------------------------------------------------------------------ public view

    _candidates = property(lambda self: self._block.candidates)
    group_names = property(lambda self: tuple(tuple(names) for names in self._group_names),
                           doc="The members of each of param_groups, by name (state dicts name parameters so).")
    candidates = property(lambda self: types.MappingProxyType(self._block.candidates), doc=(
        "Every parameter this optimizer may train, by qualified name (read-only): what required grad when the first "
        "optimizer over the model was built."))
    blocks = property(lambda self: self.partition, doc="The partition (of the current block-epoch, if dynamic).")
    active_block_index = property(lambda self: self.schedule.active, doc="Index of the active block in blocks.")
    active_block = property(lambda self: self.partition[self.schedule.active], doc="The block being trained.")
    block_epoch = property(lambda self: self.schedule.block_epoch, doc="Block-epochs complete (0-based current).")
    step_in_block = property(lambda self: self.schedule.step_in_block, doc="Steps of this visit so far, 0 ... K-1.")
    global_step = property(lambda self: self.schedule.global_step, doc="Optimizer steps taken in all.")
    switch_every = property(lambda self: self.schedule.switch_every, doc="K, steps per block visit.")
    block_order = property(lambda self: list(self.schedule.order), doc="This block-epoch's order, as block indices.")
    solver = property(lambda self: self._block.solver, doc=(
        "The inner solver over the active block; None until the visit's first step (built then, from the weights then)."))
    master_copies = property(lambda self: self._block.masters, doc="The active block's master copies; None like solver.")
    buffers = property(lambda self: self._block.buffers, doc="The fp32 buffers kept across visits (bcd.buffers.Buffers).")
    closed = property(lambda self: self._tenure.reason is not None, doc="Whether close() ran or a newer optimizer took over.")
    state = property(lambda self: {p: {} for p in self._block.candidates.values()}, _construction_only, doc=(
        "torch's per-parameter state: empty for each candidate (the active block's is in solver); DCP needs no lr-0 step."))

    def register_block_switch_hook(self, hook: Callable[[BlockCoordinateOptimizer, BlockSwitch], None], *,
                                   prepend: bool = False) -> RemovableHandle:
        """Call ``hook(optimizer, event)`` at every block activation (start, switch, resume), in registration order
        (``prepend=True``: first, so that what it keeps in step, the expansion, moves before a later hook can raise)."""
        return self._switch_hooks.register(hook, prepend)

    # ------------------------------------------------------------------ activation

    def partition_for(self, epoch: int) -> Partition:
        """The partition of block-epoch ``epoch`` (a dynamic partitioner's), checked; changes nothing."""
        return partition_of(self.composition.partitioner, self.composition.partitioner_name, self._model,
                            self._candidates, epoch, self.composition.max_block_params, self.partition)

    def _adopt(self, current: dict[str, nn.Parameter]) -> None:
        """The wrapper is in place: re-read the parameters by name, freeze all but the active block."""
        self._block.adopt(current)
        self._tenure.hold(self, self._candidates.values())
        check_partition(self.partition, self.composition.partitioner_name, self._candidates, 0)  # rows of sharded tensors
        for group, names in zip(self.param_groups, self._group_names):
            group["params"] = [self._candidates[n] for n in names]
        self._switch_hooks(self, BlockSwitch.at(self.schedule, self.partition, None, "adopt"))

    def _activate(self, *, reason: str, previous: Block | None = None) -> None:
        self._block.activate(self.active_block)
        self.switches += reason == "switch"
        self._switch_hooks(self, BlockSwitch.at(self.schedule, self.partition, previous, reason))

    def _ensure_solver(self) -> None:
        if self._wait is not None:
            self._wait.start()
        self._block.ensure_solver(lambda tensors: state.solver_groups(self.param_groups, self._group_names, tensors),
                                  self.composition.solver_factory, self.composition.solver_options)

    # ------------------------------------------------------------------ stepping

    def step(self, closure=None):
        """One inner-solver step on the active block, switching after K; returns the closure's loss or None.

        What can refuse the step (closed, replaced parameters, ranks' gradients differ, a bad
        hyperparameter) is checked before any tensor changes.
        """
        self._tenure.check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._wait is not None:
            self._wait.start()
        check_unreplaced(self._model, self._candidates, self.active_block.tensor_names)
        self._block.check_unchanged()
        if self._wait is not None and self._block.solver is None:
            # At each visit's first step (one all-gather of two numbers): a wrapper the optimizer
            # could not see at construction must average this block's gradients too.
            distributed.check_gradients_agree(self._block.params, self.active_block.name)
        check_groups(self.param_groups, self.defaults)
        self._ensure_solver()
        copy_hyperparameters(self.param_groups, self._block.solver, self._block.solver_group_index)
        grad_norm = observed_norm(self.schedule.ordering, self._block.params, self.active_block.name)
        # What comes next (order, partition) is computed before any weight moves: a failure there
        # leaves weights, schedule and solver state as they were.
        schedule = self.schedule.step(grad_norm)  # and a dynamic partitioner's new partition at a new block-epoch:
        partition = (self.partition_for(schedule.block_epoch) if self.composition.partitioner.dynamic
                     and schedule.block_epoch != self.schedule.block_epoch else self.partition)
        self._block.step(self.schedule.global_step)
        self._advance(schedule, partition)
        return loss

    def _advance(self, schedule: BlockSchedule, partition: Partition) -> None:
        previous, block = self.schedule, self.active_block
        regrouped = partition is not self.partition
        if regrouped and schedule.steps_in_visit:
            schedule = attrs.evolve(schedule, steps_in_visit=0)  # a regrouped block is a new visit, whatever its index
        self.schedule, self.partition = schedule, partition
        if schedule.step_in_block == 0 and (regrouped or not schedule.continues(previous)):
            self._activate(reason="switch", previous=block)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, and the active block's rows' (:mod:`bcd.rowgrad`)."""
        super().zero_grad(set_to_none)
        self._block.zero_row_grads(set_to_none)

    # ------------------------------------------------------------------ lifecycle

    def close(self, reason: str = "close() was called") -> None:
        """Remove every hook this optimizer installed and make the candidates trainable again (idempotent);
        ``reason`` is what a later ``step()`` names when it refuses."""
        if not self.closed:
            if self._wait is not None:
                self._wait.close()
            self._block.release()
            self._tenure.end(reason)  # hooks removed, candidates trainable again; once, not again when collected

    def __enter__(self) -> BlockCoordinateOptimizer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    __reduce_ex__ = __deepcopy__ = refuse_copy

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly, in torch's layout that DCP carries (:mod:`bcd.layout`); torch's hooks run."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        saved = layout.pack(state.save(self), self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            saved = post_hook(self, saved) or saved
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`, bit-identically on the same device; torch's load hooks run.

        Raises:
            ValueError: naming the key, the value and what is accepted (:func:`bcd.state.check`: nothing changes).
        """
        self._tenure.check_open()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        restore = state.check(layout.unpack(state_dict, self), self)
        check_unreplaced(self._model, self._candidates, restore.partition[restore.schedule.active].tensor_names)
        for group, hyper in zip(self.param_groups, restore.group_hyperparameters):
            group.update(hyper)
        self.partition, self.schedule, self.switches = restore.partition, restore.schedule, restore.switches
        self._activate(reason="resume")
        if restore.solver_state is not None:
            self._ensure_solver()
            self._block.load_solver_state(restore.solver_state, restore.master_copies)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only used while constructing: the groups follow the partition, fixed for a run."""
        if hasattr(self, "schedule"):
            raise ValueError("BlockCoordinateOptimizer does not take parameter groups after construction; "
                             "pass groups=... when building it.")
        super().add_param_group(param_group)
