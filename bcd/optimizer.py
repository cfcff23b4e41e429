r"""The block-coordinate optimizer: one block trained at a time by an inner solver.

With a partition :math:`\theta = (\theta_1, \dots, \theta_D)`, block-epoch :math:`t` visits the
blocks in an order :math:`\pi^t`; the block :math:`\pi^t_i` gets :math:`K` steps of the inner
solver (``switch_every``), starting from fresh solver state, while every other block is frozen:

.. math::

    \theta_{\pi_i}^{t,k+1} = \mathrm{Solver}(\theta_{\pi_i}^{t,k}, \nabla_{\pi_i} f(\theta^{t,k})),
    \quad k = 0, \dots, K-1.

Global step :math:`n` (0-based) belongs to the :math:`\lfloor n/K \rfloor`-th visit: the first
block is no exception. Frozen means ``requires_grad=False`` and ``grad=None``, so autograd
computes no weight gradient for frozen blocks and stops below the lowest active parameter.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bcd import checkpointing, distributed, plugins
from bcd.blocks import Block, Partition, trainable_parameters
from bcd.checks import positive_int
from bcd.events import BlockSwitch
from bcd.precision import MasterCopies, needs_master

STATE_FORMAT = "bcd.BlockCoordinateOptimizer/1"


class PrecisionNote(UserWarning):
    """A note that the model's precision costs memory bcd could save."""


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside bcd (e.g. BAdam's caller)."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _start_at_first_forward(optimizer: BlockCoordinateOptimizer):
    """A global forward pre-hook calling ``optimizer._start()`` when its model's forward begins.

    Forwards without autograd (an evaluation before training, outside the training wrapper) do
    not count. The hook holds the optimizer weakly: one dropped before any forward leaves a hook
    that does nothing.
    """
    ref = weakref.ref(optimizer)

    def hook(module: nn.Module, args: Any) -> None:
        live = ref()
        if live is not None and module is live._model and torch.is_grad_enabled():
            live._start()

    return hook


class BlockCoordinateOptimizer(torch.optim.Optimizer):
    """Train one block of a model at a time with an inner ``torch.optim`` solver.

    ``param_groups`` hold every parameter of the partition and the solver's hyperparameters, so
    LR schedulers, the transformers Trainer and ``clip_grad_norm_`` work as with any optimizer;
    before each step the hyperparameters of each group are copied into the solver's groups.

    Args:
        model: the model; its parameters that require grad now are the candidates to train.
        lr: learning rate handed to the solver (its own default when None).
        switch_every: K, optimizer steps per block visit (gradient-accumulation micro-steps do
            not count: only ``step()`` does).
        partitioner: name of a registered partitioner (``layer``, ``random-subset``,
            ``per-module``, ``explicit``, or a plugin's).
        partitioner_options: keyword options for the partitioner.
        order: name of a registered ordering (``ascending``, ``descending``, ``random``,
            ``fixed``, or a plugin's).
        order_options: keyword options for the ordering; ``start_block`` may be a block name.
        solver: name of a registered inner solver (``adam``, ``adamw``, ``sgd``, or a plugin's).
        solver_options: hyperparameters for the solver, passed through unchanged
            (``weight_decay`` is exactly what you set here).
        no_decay: put 1-D parameters (biases, norm weights) in a group with ``weight_decay=0``.
        groups: optional parameter groups, torch-style: dicts with ``"params"`` (parameters or
            their qualified names) and hyperparameter overrides. Candidates in no group form the
            first, default group.
        data_parallel: average the active block's gradients over the default process group as
            backward produces them (bcd's own data parallelism: no DDP wrapper, communication
            per step proportional to the block). Without it, on several ranks, ``model`` is a
            DDP or FSDP2 model, or a plain one that such a wrapper takes over before its first
            forward (the Trainer, accelerate). See :mod:`bcd.distributed`.

    Raises:
        ValueError: any invalid argument, naming the value received and what is accepted.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float | None = None,
        switch_every: int = 50,
        partitioner: str = "layer",
        partitioner_options: Mapping[str, Any] | None = None,
        order: str = "ascending",
        order_options: Mapping[str, Any] | None = None,
        solver: str = "adamw",
        solver_options: Mapping[str, Any] | None = None,
        no_decay: bool = False,
        groups: Sequence[Mapping[str, Any]] | None = None,
        data_parallel: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__}; accepted: a torch.nn.Module.")
        distributed.check_supported(model)
        # On several ranks with a plain model, a wrapper (DDP, FSDP2) is expected before the first
        # forward: the Trainer and accelerate add it after the optimizer exists.
        self._awaiting_wrapper = distributed.expects_wrapper(model, data_parallel)
        self._check_sync = self._awaiting_wrapper
        self.data_parallel = data_parallel
        positive_int("switch_every", switch_every)
        solver_options = dict(solver_options or {})
        if lr is not None:
            if "lr" in solver_options:
                raise ValueError(f"lr given twice: lr={lr!r} and solver_options['lr']={solver_options['lr']!r}; give one.")
            solver_options["lr"] = lr
        if "lr" in solver_options and not (isinstance(solver_options["lr"], (int, float)) and solver_options["lr"] >= 0):
            raise ValueError(f"Invalid lr: {solver_options['lr']!r}; accepted: a number >= 0.")

        self._candidates = trainable_parameters(model)
        self._model = model
        self.switch_every = switch_every
        self._partitioner_name = partitioner
        self._partitioner = plugins.create("partitioner", partitioner, dict(partitioner_options or {}))
        self._epoch = 0
        self.partition = self._make_partition(0)
        self._param_names = set(self.partition.param_names)

        self._order_name = order
        order_options = dict(order_options or {})
        if isinstance(order_options.get("start_block"), str):
            order_options["start_block"] = self.partition.index(order_options["start_block"])
        self._ordering = plugins.create("ordering", order, order_options)
        self._order = self._make_order(0)

        self._solver_name = solver
        self._solver_factory = plugins.lookup("solver", solver).factory
        self._solver_options = solver_options
        defaults = self._probe_solver()
        checkpointing.make_compatible(model)

        super().__init__(self._outer_groups(model, no_decay, groups), defaults)

        # Freeze every candidate (and those the partition left out: they are never trained);
        # _activate then unfreezes the first block. Awaiting a wrapper, freezing waits for the
        # first forward (_start): DDP registers only the parameters that require grad when it is
        # built, and would never average a block frozen then.
        if not self._awaiting_wrapper:
            self._freeze_all()
        if any(not needs_master(p) and p.is_floating_point() for p in self._candidates.values()):
            warnings.warn(
                "bcd: some trainable parameters are fp32 and are updated in place; a bf16 model "
                "(model.to(torch.bfloat16)) keeps fp32 master copies for the active block only and "
                "needs about half the memory.",
                PrecisionNote,
                stacklevel=_caller_stacklevel(),
            )
        self._solver: torch.optim.Optimizer | None = None
        self._masters: MasterCopies | None = None
        self._active_params: list[nn.Parameter] = []
        self._sync_handles: list = []
        self._active: int | None = None
        self._position = 0
        self._step_in_block = 0
        self._global_step = 0
        self._activate(self._order[0], reason="start")
        # Checkpointing switched on later (the Trainer does) must not run backward through frozen blocks.
        self._checkpointing_guard = checkpointing.guard(model)
        # A global hook, because it runs before every module's own hooks: a wrapper's pre-forward
        # (FSDP2 unsharding the root's parameters) must not have run yet when _start looks.
        self._start_handle = (
            nn.modules.module.register_module_forward_pre_hook(_start_at_first_forward(self))
            if self._awaiting_wrapper
            else None
        )

    # ------------------------------------------------------------------ construction helpers

    def _freeze_all(self) -> None:
        for param in self._candidates.values():
            param.requires_grad_(False)
            param.grad = None

    def _start(self) -> None:
        """Finish a construction that awaited a wrapper: adopt its parameters, freeze all but the active block.

        Runs once, at the model's first forward (or the first step or state load, if earlier),
        when the Trainer or accelerate has wrapped the model. FSDP2 swaps in new parameter
        objects under the same names; they are looked up again by name.
        """
        if not self._awaiting_wrapper:
            return
        distributed.check_wrapper_at_first_forward()
        current = dict(self._model.named_parameters(remove_duplicate=False))
        missing = [n for n in self._candidates if n not in current]
        if missing:
            raise ValueError(
                f"The model lost parameters after the optimizer was built (e.g. {missing[0]!r}); a wrapper may only "
                "replace parameters under the same names (FSDP2 does)."
            )
        self._candidates = {n: current[n] for n in self._candidates}
        for group, names in zip(self.param_groups, self._group_names):
            group["params"] = [self._candidates[n] for n in names]
        self._freeze_all()
        self._active_params = [self._candidates[n] for n in self.active_block.param_names]
        for param in self._active_params:
            param.requires_grad_(True)
        self._start_handle.remove()
        self._awaiting_wrapper = False

    def _make_partition(self, epoch: int) -> Partition:
        partition = self._partitioner.partition(self._model, self._candidates, epoch)
        if not isinstance(partition, Partition):
            raise ValueError(
                f"Invalid partition from partitioner {self._partitioner_name!r}: {type(partition).__name__}; "
                "accepted: a bcd.Partition."
            )
        unknown = [n for n in partition.param_names if n not in self._candidates]
        if unknown:
            raise ValueError(
                f"Invalid partition from partitioner {self._partitioner_name!r}: {unknown[:5]} are not trainable "
                "parameters of the model; a block may only hold parameters that require grad."
            )
        if epoch > 0 and set(partition.param_names) != self._param_names:
            raise ValueError(
                f"Invalid partition from partitioner {self._partitioner_name!r} at block-epoch {epoch}: it covers "
                "other parameters than at block-epoch 0; a dynamic partitioner may regroup, not add or drop."
            )
        return partition

    def _make_order(self, epoch: int) -> list[int]:
        order = [int(i) for i in self._ordering.order(len(self.partition), epoch)]
        if not order or any(not 0 <= i < len(self.partition) for i in order):
            raise ValueError(
                f"Invalid order from ordering {self._order_name!r}: {order}; accepted: block indices "
                f"0 ... {len(self.partition) - 1}, at least one."
            )
        return order

    def _probe_solver(self) -> dict[str, Any]:
        """Build the solver once over a dummy tensor: validates its options, yields its defaults."""
        probe = plugins.create("solver", self._solver_name, self._solver_options, [torch.zeros(1)])
        if not isinstance(probe, torch.optim.Optimizer):
            raise ValueError(
                f"Invalid solver {self._solver_name!r}: its factory returned {type(probe).__name__}; "
                "accepted: a torch.optim.Optimizer."
            )
        return dict(probe.defaults)

    def _outer_groups(
        self, model: nn.Module, no_decay: bool, groups: Sequence[Mapping[str, Any]] | None
    ) -> list[dict[str, Any]]:
        names = [n for n in self._candidates if n in self._param_names]
        by_id = {id(p): n for n, p in self._candidates.items()}
        assigned: dict[str, int] = {}
        specs: list[dict[str, Any]] = [{}]
        for spec in groups or ():
            if "params" not in spec:
                raise ValueError(f"Invalid group: {dict(spec)!r} has no 'params'; accepted: dicts with 'params'.")
            specs.append({k: v for k, v in spec.items() if k != "params"})
            for item in spec["params"]:
                name = item if isinstance(item, str) else by_id.get(id(item))
                if name not in self._param_names:
                    raise ValueError(
                        f"Invalid group: parameter {item if isinstance(item, str) else tuple(item.shape)!r} is not one "
                        "of the partition's trainable parameters."
                    )
                if name in assigned:
                    raise ValueError(f"Invalid groups: parameter {name!r} is in two groups; accepted: at most one.")
                assigned[name] = len(specs) - 1
        if no_decay:
            specs.append({"weight_decay": 0.0})
            for name in names:
                if name not in assigned and self._candidates[name].ndim <= 1:
                    assigned[name] = len(specs) - 1
        members: list[list[str]] = [[] for _ in specs]
        for name in names:
            members[assigned.get(name, 0)].append(name)
        self._group_names = [m for m in members if m]
        return [
            {**spec, "params": [self._candidates[n] for n in member]}
            for spec, member in zip(specs, members)
            if member
        ]

    # ------------------------------------------------------------------ public view

    @property
    def blocks(self) -> Partition:
        """The partition (of the current block-epoch, for a dynamic partitioner)."""
        return self.partition

    @property
    def active_block(self) -> Block:
        """The block being trained."""
        return self.partition[self._active]

    @property
    def active_block_index(self) -> int:
        """Index of the active block in :attr:`blocks`."""
        return self._active

    @property
    def block_epoch(self) -> int:
        """How many block-epochs are complete (the current one's number, 0-based)."""
        return self._epoch

    @property
    def step_in_block(self) -> int:
        """Steps the active block has had in this visit, 0 ... K-1."""
        return self._step_in_block

    @property
    def global_step(self) -> int:
        """Optimizer steps taken in all."""
        return self._global_step

    @property
    def block_order(self) -> list[int]:
        """The current block-epoch's order, as block indices."""
        return list(self._order)

    @property
    def solver(self) -> torch.optim.Optimizer | None:
        """The inner solver over the active block; None until the visit's first step.

        It is built at the first ``step()`` of each visit (and dropped at the switch), so that
        weights loaded into the model after a switch or after construction are what the fp32
        master copies start from.
        """
        return self._solver

    @property
    def master_copies(self) -> MasterCopies | None:
        """The active block's master copies (the parameters themselves where fp32); None like :attr:`solver`."""
        return self._masters

    # ------------------------------------------------------------------ switching

    def _release(self) -> None:
        """Freeze the active block and drop the solver and master copies, so their memory is freed."""
        for param in self._active_params:
            param.requires_grad_(False)
            param.grad = None
        for handle in self._sync_handles:
            handle.remove()
        self._sync_handles = []
        self._active_params = []
        self._solver = None
        self._masters = None

    def _activate(self, index: int, *, reason: str, previous: Block | None = None) -> None:
        self._release()
        block = self.partition[index]
        self._active_params = [self._candidates[n] for n in block.param_names]
        for param in self._active_params:
            param.requires_grad_(True)
        if self.data_parallel:
            self._sync_handles = distributed.gradient_sync_hooks(self._active_params)
        self._active = index
        self._step_in_block = 0
        plugins.pm.hook.block_switched(
            event=BlockSwitch(
                block=block,
                block_index=index,
                previous=previous,
                block_epoch=self._epoch,
                position=self._position,
                global_step=self._global_step,
                reason=reason,
            )
        )

    def _advance(self) -> None:
        """Move to the next block of the order, starting a new block-epoch when it is done."""
        previous = self.active_block
        self._position += 1
        repartitioned = False
        if self._position == len(self._order):
            self._epoch += 1
            self._position = 0
            if self._partitioner.dynamic:
                self.partition = self._make_partition(self._epoch)
                repartitioned = True
            self._order = self._make_order(self._epoch)
        index = self._order[self._position]
        if index == self._active and not repartitioned:
            # The same block again (D = 1, fixed order): one longer visit, solver state kept.
            self._step_in_block = 0
        else:
            self._activate(index, reason="switch", previous=previous)

    def _ensure_solver(self) -> None:
        """Build the master copies and the solver for the active block, from its current weights."""
        if self._solver is not None:
            return
        self._start()
        block = self.active_block
        current = dict(self._model.named_parameters())
        replaced = [n for n in block.param_names if current.get(n) is not self._candidates[n]]
        if replaced:
            raise ValueError(
                f"The model's parameters were replaced after the optimizer was built (e.g. {replaced[0]!r}): a wrapper "
                "such as fully_shard (FSDP2, also when accelerate or the Trainer applies it) swaps in new parameter "
                "objects. Accepted: wrap the model first, then build the optimizer over the wrapped model."
            )
        self._masters = MasterCopies(self._active_params, block.param_names)
        master_of = dict(zip(block.param_names, self._masters.solver_params))
        solver_groups, self._solver_group_index = [], []
        for index_in_outer, (group, names) in enumerate(zip(self.param_groups, self._group_names)):
            in_block = [master_of[n] for n in names if n in master_of]
            if in_block:
                hyper = {k: v for k, v in group.items() if k != "params"}
                solver_groups.append({**hyper, "params": in_block})
                self._solver_group_index.append(index_in_outer)
        self._solver = self._solver_factory(solver_groups, **self._solver_options)

    # ------------------------------------------------------------------ stepping

    def _sync_hyperparameters(self) -> None:
        for solver_group, outer_index in zip(self._solver.param_groups, self._solver_group_index):
            outer = self.param_groups[outer_index]
            for key in solver_group:
                if key != "params" and key in outer:
                    solver_group[key] = outer[key]

    def step(self, closure=None):
        """One inner-solver step on the active block; switches blocks after K of them.

        Args:
            closure: optional, re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._start()
        if self._check_sync and self._solver is None:
            # At each visit's first step (one all-gather of two numbers): a wrapper the optimizer
            # could not see at construction must average this block's gradients too.
            distributed.check_gradients_agree(self._active_params, self.active_block.name)
        self._ensure_solver()
        self._sync_hyperparameters()
        self._masters.grads_in()
        self._solver.step()
        self._masters.write_back()
        self._global_step += 1
        self._step_in_block += 1
        if self._step_in_block == self.switch_every:
            self._advance()
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: schedule position, order, solver state, masters.

        Parameters are identified by qualified name, so the dict loads into an optimizer over a
        freshly built model. It holds only tensors and plain Python values (``torch.load`` with
        ``weights_only=True`` reads it).
        """
        return {
            "format": STATE_FORMAT,
            "partition": self.partition.fingerprint(),
            "switch_every": self.switch_every,
            "partitioner": self._partitioner_name,
            "ordering": self._order_name,
            "solver": self._solver_name,
            "schedule": {
                "block_epoch": self._epoch,
                "position": self._position,
                "order": list(self._order),
                "active_block": self._active,
                "step_in_block": self._step_in_block,
                "global_step": self._global_step,
            },
            "param_groups": [
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
                for group, names in zip(self.param_groups, self._group_names)
            ],
            # None and {} before the visit's first step: nothing to restore but the position.
            "solver_state": self._solver.state_dict() if self._solver is not None else None,
            "master_copies": self._masters.state_dict() if self._masters is not None else {},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`, bit-identically on the same device.

        Everything is checked before anything changes, so a refused state dict leaves the
        optimizer as it was.

        Raises:
            ValueError: the state dict is not bcd's, or was saved for another model, partition,
                K, ordering, solver or parameter grouping.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT:
            got = state_dict.get("format") if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"Invalid state dict: format {got!r}; accepted: {STATE_FORMAT!r} from BlockCoordinateOptimizer.state_dict().")
        for key, mine in (
            ("switch_every", self.switch_every),
            ("partitioner", self._partitioner_name),
            ("ordering", self._order_name),
            ("solver", self._solver_name),
        ):
            if state_dict[key] != mine:
                raise ValueError(f"Invalid state dict: saved with {key}={state_dict[key]!r}, this optimizer has {mine!r}.")
        schedule = state_dict["schedule"]
        epoch = schedule["block_epoch"]
        partition = self._make_partition(epoch) if self._partitioner.dynamic else self.partition
        if partition.fingerprint() != [list(b) for b in state_dict["partition"]]:
            raise ValueError(
                "Invalid state dict: it was saved for another partition (block or parameter names differ); "
                f"saved blocks {[b[0] for b in state_dict['partition']][:6]}..., "
                f"this optimizer's {[b.name for b in partition][:6]}...."
            )
        order = self._make_order(epoch)
        if order != list(schedule["order"]):
            raise ValueError(
                f"Invalid state dict: block-epoch {epoch} was saved with order {schedule['order']}, this optimizer's "
                f"ordering gives {order}; the ordering options (seed, start_block) differ."
            )
        saved_groups = state_dict["param_groups"]
        if [g["params"] for g in saved_groups] != self._group_names:
            raise ValueError(
                f"Invalid state dict: {len(saved_groups)} parameter group(s) with other members than this "
                f"optimizer's {len(self._group_names)}; build the optimizer with the same groups/no_decay."
            )
        active = schedule["active_block"]
        if active != order[schedule["position"]] and not (len(set(order)) == 1 and active == order[0]):
            raise ValueError(f"Invalid state dict: active block {active} is not at position {schedule['position']} of {order}.")
        expected_masters = {n for n in partition[active].param_names if needs_master(self._candidates[n])}
        if state_dict["solver_state"] is None:
            expected_masters = set()
        if set(state_dict["master_copies"]) != expected_masters:
            raise ValueError(
                "Invalid state dict: its master copies do not match the active block's low-precision "
                "parameters; it was saved with another model dtype."
            )

        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.partition = partition
        self._epoch, self._position, self._order = epoch, schedule["position"], order
        self._global_step = schedule["global_step"]
        self._activate(active, reason="resume")
        if state_dict["solver_state"] is not None:
            self._ensure_solver()
            self._solver.load_state_dict(self._reshard_solver_state(state_dict["solver_state"]))
            self._masters.load_state_dict(state_dict["master_copies"])
        self._step_in_block = schedule["step_in_block"]

    def _reshard_solver_state(self, solver_state: Mapping[str, Any]) -> dict[str, Any]:
        """Solver state saved as full tensors (:func:`bcd.distributed.full_state_dict`), sharded like the masters."""
        params = [p for group in self._solver.param_groups for p in group["params"]]
        state = {
            index: {key: distributed.like(value, params[int(index)]) if isinstance(value, torch.Tensor) else value
                    for key, value in entry.items()}
            for index, entry in solver_state["state"].items()
        }
        return {**solver_state, "state": state}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only used while constructing: the groups follow the partition, fixed for a run."""
        if hasattr(self, "_active"):
            raise NotImplementedError(
                "BlockCoordinateOptimizer does not take parameter groups after construction; "
                "pass groups=... when building it."
            )
        super().add_param_group(param_group)

