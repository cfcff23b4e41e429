"""Multi-process training on CPU (gloo, 2 ranks spawned from pytest) against one process."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bcd
from bcd import distributed, memory
from bcd.testing import free_port

from conftest import tiny_llama

K, STEPS, BATCH = 2, 16, 4  # D = 4 blocks (embedding, 2 layers, head): STEPS = two block-epochs


pytestmark = pytest.mark.filterwarnings("ignore::bcd.PrecisionNote")


def build(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama(layers=2).to(dtype)


def optimizer_for(model: nn.Module, data_parallel: bool = False, order: str = "random"):
    return bcd.BAdam(model, lr=1e-2, switch_every=K, order=order, seed=3, include_embedding=True,
                     include_head=True, data_parallel=data_parallel)


def expanded_optimizer(model: nn.Module, data_parallel: bool = False):
    """The recipe: BAdam with the expansion over every other block (decay on, so the decay path is compared too)."""
    return bcd.BAdam(model, lr=1e-2, switch_every=K, order="random", seed=3, weight_decay=0.1,
                     data_parallel=data_parallel, expansion="all")


def batches(steps: int):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (BATCH, 12), generator=generator) for _ in range(steps)]


def train(model, forward, optimizer, data, rank=0, world=1):
    for ids in data:
        share = ids[rank * BATCH // world:(rank + 1) * BATCH // world]
        forward(input_ids=share, labels=share).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix = "module."
    return {n.removeprefix(prefix): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def assert_same_training(result: dict, reference: dict, start: dict, what: str = "") -> None:
    """Each tensor of ``result`` took the same update from ``start`` as ``reference``'s, within 1e-3 of its size.

    Why a relative tolerance: two ranks sum gradients in another order than one process does
    (gloo's all-reduce or FSDP2's reduce-scatter, with kernels that differ between CPUs: AVX-512
    on an Intel Xeon, AVX2 on an AMD EPYC), so gradients differ in their last bits, and Adam's
    normalised step m / (sqrt(v) + eps) turns that into differences of up to lr per step on the
    coordinates whose gradient is near zero. Measured: 6.5e-5 absolute after a 6-step visit at
    lr 1e-2, about 1e-5 of the tensor's update norm. A wrong reduction (a rank's own gradient, a
    shard's norm, a block left out) changes the update by a fraction of its size: refused.
    """
    assert result.keys() == reference.keys()
    for name, value in reference.items():
        update = (value - start[name]).norm()
        difference = (result[name] - value).norm()
        assert difference <= 1e-3 * update + 1e-7, f"{what}{name}: differs by {difference:.3g}, update {update:.3g}"


def wrap(model: nn.Module, mode: str, world: int):
    """Returns (model the optimizer gets, callable for the forward)."""
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    if mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return ddp, ddp
    return model, model


def worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    # What torchrun sets: the Trainer and accelerate read it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank, world, mode, out)
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: about one spawned process in 40 aborted there
    # ("terminate called without an active exception", no Python frame left) after all its work
    # and its output were done, which failed the test for nothing bcd does. Errors above still
    # propagate and fail the test as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def work(rank: int, world: int, mode: str, out: str) -> None:
    if mode == "unsynced":
        model = build()
        optimizer = optimizer_for(model)  # several ranks, no wrapper yet: it may still come
        before = full_params(model)
        share = batches(1)[0][rank::world]
        model(input_ids=share, labels=share).loss.backward()
        with pytest.raises(ValueError, match=r"2 ranks hold different gradients .* Nothing was updated"):
            optimizer.step()
        for name, value in full_params(model).items():
            assert torch.equal(value, before[name]), name
        return
    if mode == "memory":
        model, _ = wrap(build(torch.bfloat16), "fsdp2", world)
        optimizer = optimizer_for(model)
        train(model, model, optimizer, batches(1), rank, world)
        live = memory.measure(model, optimizer)
        steps = 4 * len(optimizer.solver.state)
        torch.save({"masters": live.master_copies, "state": live.solver_state, "steps": steps}, f"{out}.{rank}")
        return
    if mode.startswith("resume"):
        checkpoint = os.path.join(os.path.dirname(out), "checkpoint.pt")
        model, forward = wrap(build(), "fsdp2", world)
        optimizer = optimizer_for(model)
        data = batches(STEPS)
        if mode == "resume-save":
            train(model, forward, optimizer, data[:5], rank, world)  # K = 2: step 5 is mid-block
            state = {"model": full_params(model), "optimizer": distributed.full_state_dict(optimizer)}
            if rank == 0:
                torch.save(state, checkpoint)
        else:
            state = torch.load(checkpoint, weights_only=True)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(distributed.like(state["model"][name], param))
            optimizer.load_state_dict(state["optimizer"])
        train(model, forward, optimizer, data[5:], rank, world)
    elif mode.startswith("dcp"):
        import torch.distributed.checkpoint as dcp

        bf16 = "bf16" in mode  # bf16 weights: fp32 master copies, sharded DTensors, are in the checkpoint too
        directory = os.path.join(os.path.dirname(out), "dcp-bf16" if bf16 else "dcp")
        model, forward = wrap(build(torch.bfloat16 if bf16 else torch.float32), "fsdp2", world)
        optimizer = optimizer_for(model)
        if mode.endswith("save"):
            train(model, forward, optimizer, batches(5), rank, world)  # K = 2: step 5 is mid-block
            dcp.save(dcp_state(model, optimizer), checkpoint_id=directory)
            gathered = distributed.full_state_dict(optimizer)["param_groups"][0]["bcd"]
            if rank == 0:
                torch.save(gathered, os.path.join(directory, "gathered.pt"))
        elif mode.endswith("uninterrupted"):
            train(model, forward, optimizer, batches(STEPS), rank, world)
        else:
            dcp_resume(model, forward, optimizer, directory, rank, world)
    elif mode.startswith("accelerate-fsdp"):
        # accelerate's own FSDP2 checkpoint functions, which the Trainer calls: they run only under a
        # GPU Trainer (on CPU accelerate falls back to DDP), so they are called here directly.
        from types import SimpleNamespace

        from accelerate import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin, load_fsdp_optimizer, save_fsdp_optimizer

        PartialState(cpu=True)  # accelerate's logging needs its state
        kind, phase = mode.removeprefix("accelerate-fsdp-").split("-")
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=f"{kind.upper()}_STATE_DICT")
        accelerator = SimpleNamespace(process_index=rank, wait_for_everyone=dist.barrier)
        directory, saved_at = os.path.join(os.path.dirname(out), f"accelerate-{kind}"), 4  # K = 2: a visit boundary
        model, forward = wrap(build(), "fsdp2", world)
        optimizer = optimizer_for(model)
        if phase == "save":
            train(model, forward, optimizer, batches(saved_at), rank, world)
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, directory)
            torch.save(full_params(model), os.path.join(directory, f"weights.{rank}"))
        else:
            weights = torch.load(os.path.join(directory, f"weights.{rank}"), weights_only=True)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(distributed.like(weights[name], param))
            load_fsdp_optimizer(plugin, accelerator, optimizer, model, directory)
            assert optimizer.global_step == saved_at
            train(model, forward, optimizer, batches(STEPS)[saved_at:], rank, world)
    elif mode.endswith("-after"):
        # The optimizer first, the wrapper after: the order of the Trainer and accelerate's prepare().
        model = build()
        optimizer = optimizer_for(model)
        with torch.no_grad():  # e.g. an evaluation first: not the forward bcd waits for
            model(input_ids=batches(1)[0])
        model, forward = wrap(model, mode.removesuffix("-after"), world)
        train(model, forward, optimizer, batches(STEPS), rank, world)
    elif mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        model = build()
        wrapped, optimizer = Accelerator(cpu=True).prepare(model, optimizer_for(model))  # DDP, after the optimizer
        ids = batches(1)[0]
        with pytest.raises(ValueError, match=r"accelerate's default.*DistributedDataParallelKwargs"):
            wrapped(input_ids=ids, labels=ids)

        accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        model = build()
        wrapped, optimizer = accelerator.prepare(model, optimizer_for(model))
        for ids in batches(STEPS):
            share = ids[rank * BATCH // world:(rank + 1) * BATCH // world]
            accelerator.backward(wrapped(input_ids=share, labels=share).loss)
            accelerator.clip_grad_norm_(wrapped.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    elif mode == "trainer-checkpointing":
        # With gradient checkpointing the Trainer asks DDP not to look for unused parameters.
        with pytest.raises(ValueError, match=r"find_unused_parameters=False .*ddp_find_unused_parameters=True"):
            trainer_run(out, world, gradient_checkpointing=True)
        model = trainer_run(out, world, gradient_checkpointing=True, ddp_find_unused_parameters=True)
    elif mode.startswith("trainer"):
        model = trainer_run(out, world, resume=mode == "trainer-resume")
    elif mode.startswith("expansion-"):
        wrapper = mode.removeprefix("expansion-")
        model = build()
        optimizer = expanded_optimizer(model, data_parallel=wrapper == "native")
        model, forward = wrap(model, wrapper, world)
        train(model, forward, optimizer, batches(STEPS), rank, world)
        assert optimizer.expansion.deferred
        mine = full_params(model)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        for name, value in mine.items():  # one averaged gradient, one seeded rounding: the replicas agree exactly
            assert all(torch.equal(other[name], value) for other in gathered), name
    elif mode == "fsdp2-importance":
        model, forward = wrap(build(), "fsdp2", world)
        optimizer = optimizer_for(model, order="importance")
        active = []
        for ids in batches(STEPS):
            train(model, forward, optimizer, [ids], rank, world)
            active.append(optimizer.schedule.active)
        seen = (active, optimizer.schedule.observed.grad_norm)
        gathered = [None] * world
        dist.all_gather_object(gathered, seen)
        assert all(other == seen for other in gathered), gathered  # the same norms and blocks on every rank
        if rank == 0:
            torch.save({"active": active, "norms": torch.tensor(seen[1])}, f"{out}.norms")
    else:
        model, forward = wrap(build(), mode, world)
        optimizer = optimizer_for(model, data_parallel=mode == "native")
        train(model, forward, optimizer, batches(STEPS), rank, world)
    params = full_params(model)
    if rank == 0:
        torch.save(params, out)


def trainer_run(out: str, world: int, resume: bool = False, **overrides: Any) -> nn.Module:
    """The transformers Trainer with bcd.BAdam; on several ranks accelerate wraps the model in DDP."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from bcd.lab.integrations.transformers import badam_from_training_args

    ids = torch.cat(batches(STEPS)).tolist()  # equal lengths: the mean over ranks is the global mean
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), "trainer"), per_device_train_batch_size=BATCH // world,
        max_steps=STEPS, learning_rate=1e-2, max_grad_norm=1.0, lr_scheduler_type="cosine", save_steps=5,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **overrides,
    )
    model = build()
    optimizer = badam_from_training_args(model, args, switch_every=K, order="random", seed=3,
                                         include_embedding=True, include_head=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                      optimizers=(optimizer, None))
    checkpoint = os.path.join(args.output_dir, "checkpoint-5")  # K = 2: step 5 is mid-block
    trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    assert world == 1 or isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
    return model


def spawn(mode: str, tmp_path, world: int = 2):
    out = str(tmp_path / f"{mode}-{world}.pt")
    mp.spawn(worker, args=(world, free_port(), mode, out), nprocs=world, join=True)
    return out


@pytest.fixture(scope="module")
def single_process():
    model = build()
    train(model, model, optimizer_for(model), batches(STEPS))
    return full_params(model)


@pytest.mark.parametrize("wrapper", ["native", "ddp"])
def test_the_expansion_on_two_ranks_keeps_replicas_identical_and_matches_one_process(wrapper, tmp_path):
    model = build()
    start = full_params(model)
    optimizer = bcd.BAdam(model, lr=1e-2, switch_every=K, order="random", seed=3, weight_decay=0.1)
    optimizer.expansion = bcd.landscape_expansion(optimizer, 0.25, reach="all", defer=True)  # the ranks' semantics
    train(model, model, optimizer, batches(STEPS))
    reference = full_params(model)
    result = torch.load(spawn(f"expansion-{wrapper}", tmp_path), weights_only=True)
    # Why a tolerance over the whole model: the reference steps each expanded tensor from the sign
    # of its full-batch gradient, two ranks from the sign of the mean of their halves, which
    # differs in the last bits (another summation order): a coordinate whose gradient is near zero
    # may take the opposite sign step, and Adam's step differs as in assert_same_training.
    # Measured on an AMD EPYC: 7.6e-7 of the update's norm, both wrappers. Each rank stepping from
    # its own half's gradient, or clipping before averaging, differs by several percent.
    update = torch.cat([(reference[n] - start[n]).flatten() for n in start]).norm()
    difference = torch.cat([(result[n] - reference[n]).flatten() for n in start]).norm()
    assert difference <= 1e-4 * update, f"differs by {difference / update:.3g} of the update"


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-after", "ddp", "ddp-after", "accelerate", "native"])
def test_two_ranks_match_one_process(mode, tmp_path, single_process):
    result = torch.load(spawn(mode, tmp_path), weights_only=True)
    assert result.keys() == single_process.keys()
    for name, value in single_process.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=1e-5, msg=name)


def test_importance_order_on_two_fsdp2_ranks_matches_one_process(tmp_path, single_process):
    """The order draws from gradient norms: each rank must see the full norm, not its shard's."""
    model = build()
    start = full_params(model)
    optimizer = optimizer_for(model, order="importance")
    active = []
    for ids in batches(STEPS):
        train(model, model, optimizer, [ids])
        active.append(optimizer.schedule.active)
    single = full_params(model)
    assert any(not torch.equal(single[name], value) for name, value in single_process.items())  # another order
    out = spawn("fsdp2-importance", tmp_path)
    seen = torch.load(f"{out}.norms", weights_only=True)
    # The blocks drawn are exactly one process's; the norms differ in reduction order only.
    assert seen["active"] == active
    torch.testing.assert_close(seen["norms"], torch.tensor(optimizer.schedule.observed.grad_norm), rtol=1e-5, atol=0)
    assert_same_training(torch.load(out, weights_only=True), single, start)


def test_trainer_on_two_ranks_matches_one_process_and_resumes(tmp_path):
    """DDP added by the Trainer (accelerate) after the optimizer was built; a checkpoint saved mid-block."""
    single = full_params(trainer_run(str(tmp_path / "single" / "out"), world=1))
    uninterrupted = torch.load(spawn("trainer", tmp_path), weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(uninterrupted[name], value, rtol=0, atol=1e-5, msg=name)
    resumed = torch.load(spawn("trainer-resume", tmp_path), weights_only=True)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_trainer_with_gradient_checkpointing_needs_ddp_find_unused_parameters(tmp_path, single_process):
    result = torch.load(spawn("trainer-checkpointing", tmp_path), weights_only=True)
    assert result.keys() == single_process.keys()


@pytest.fixture(scope="module")
def fsdp2_uninterrupted(tmp_path_factory):
    """The whole run on 2 FSDP2 ranks, which every save-and-resume test below continues."""
    return torch.load(spawn("fsdp2", tmp_path_factory.mktemp("uninterrupted")), weights_only=True)


def resumes_on_two_ranks(save: str, load: str, tmp_path, uninterrupted: dict) -> None:
    """Save with mode ``save`` on 2 FSDP2 ranks, resume with ``load`` on 2: within 1e-6 of the uninterrupted run."""
    spawn(save, tmp_path)
    resumed = torch.load(spawn(load, tmp_path), weights_only=True)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_save_on_two_ranks_resume_on_two_and_on_one(tmp_path, single_process, fsdp2_uninterrupted):
    resumes_on_two_ranks("resume-save", "resume-load", tmp_path, fsdp2_uninterrupted)

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # full tensors: loads without a process group
    model = build()
    model.load_state_dict(state["model"])
    optimizer = optimizer_for(model)
    optimizer.load_state_dict(state["optimizer"])
    train(model, model, optimizer, batches(STEPS)[5:])
    for name, value in full_params(model).items():
        torch.testing.assert_close(value, single_process[name], rtol=0, atol=1e-5, msg=name)


def test_per_rank_memory_of_masters_and_solver_state_is_halved(tmp_path):
    one = spawn("memory", tmp_path, world=1)
    two = spawn("memory", tmp_path, world=2)
    single = torch.load(one + ".0", weights_only=True)
    for rank in range(2):
        shard = torch.load(f"{two}.{rank}", weights_only=True)
        assert shard["masters"] * 2 == single["masters"] > 0
        # Adam's step counters are scalars, kept whole on every rank.
        assert (shard["state"] - shard["steps"]) * 2 == single["state"] - single["steps"]


def fake_fsdp1() -> nn.Module:
    """An FSDP1 instance without a process group or accelerator (FSDP1 needs one to wrap for real)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(fsdp1)
    return fsdp1


def test_unsupported_wrappers_are_refused_with_what_to_use(monkeypatch):
    holder = nn.Sequential(nn.Linear(2, 2), fake_fsdp1())  # with or without use_orig_params alike
    with pytest.raises(ValueError, match=r"FSDP1 .*1 module\(s\) wrapped.*FSDP.optim_state_dict.* Accepted: FSDP2"):
        bcd.BAdam(holder)
    # Wrapped after the optimizer was built (the Trainer's order): refused at the first forward, nothing frozen.
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the optimizer waits for a wrapper
    optimizer = bcd.BAdam(model, switch_every=1)
    monkeypatch.delenv("WORLD_SIZE")
    model.append(fake_fsdp1())
    with pytest.raises(ValueError, match=r"FSDP1 .*1 module\(s\) wrapped"):
        model(torch.ones(1, 2))
    assert all(p.requires_grad for p in model.parameters())
    optimizer.close()

    zero3 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    zero3[0].weight.ds_id = 0
    with pytest.raises(ValueError, match=r"DeepSpeed .* Accepted: FSDP2"):
        bcd.BAdam(zero3)

    with pytest.raises(ValueError, match=r"data_parallel=True: torch.distributed is not initialized"):
        bcd.BAdam(build(), data_parallel=True)


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(build())
        with pytest.raises(ValueError, match=r"find_unused_parameters=False; .*'Expected to have finished reduction'"):
            bcd.BAdam(ddp)
    finally:
        dist.destroy_process_group()


def test_parameters_replaced_after_construction_are_a_clear_error(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build()
        optimizer = optimizer_for(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # too late: new parameter objects
        ids = batches(1)[0]
        model(input_ids=ids, labels=ids).loss.backward()
        with pytest.raises(ValueError, match=r"parameters were replaced after the optimizer was built"):
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_several_ranks_without_gradient_averaging_are_refused(tmp_path):
    spawn("unsynced", tmp_path)  # the worker asserts the ValueError; a failure there fails the spawn


def test_world_size_from_the_environment_without_a_process_group_is_refused_at_the_first_step(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's, in a script that never called init_process_group
    model = build()
    optimizer = optimizer_for(model)
    before = full_params(model)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2, but torch.distributed was never initialized"):
        optimizer.step()
    for name, value in full_params(model).items():
        assert torch.equal(value, before[name]), name
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(optimizer.active_block.param_names)


def dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def dcp_resume(model, forward, optimizer, directory: str, rank: int = 0, world: int = 1) -> None:
    """Load the weights and the optimizer from a DCP checkpoint, as the docs say, and train the rest of the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    weights = {"model": get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=directory)
    set_model_state_dict(model, weights["model"])
    bcd.sharded.load(model, optimizer, directory)
    assert optimizer.global_step == 5 and optimizer.step_in_block == 1 and optimizer.solver is not None
    train(model, forward, optimizer, batches(STEPS)[5:], rank, world)


def test_a_dcp_checkpoint_saved_on_two_fsdp2_ranks_resumes_on_two_and_on_one(tmp_path, single_process,
                                                                              fsdp2_uninterrupted):
    """get_optimizer_state_dict + dcp.save mid-visit on 2 ranks; bcd.sharded.load on 2 ranks and on 1 process."""
    resumes_on_two_ranks("dcp-save", "dcp-load", tmp_path, fsdp2_uninterrupted)

    model = build()  # one process, no process group, no FSDP: the shards are read into plain tensors
    optimizer = optimizer_for(model)
    dcp_resume(model, model, optimizer, str(tmp_path / "dcp"))
    for name, value in full_params(model).items():  # as test_two_ranks_match_one_process: reduction order only
        torch.testing.assert_close(value, single_process[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_accelerates_fsdp2_checkpoints_which_the_trainer_writes_resume_exactly(kind, tmp_path, fsdp2_uninterrupted):
    """Saved at a visit boundary: accelerate loads into a fresh optimizer's template (sharded) or hands
    other ranks only its keys (full, from rank 0), so a visit's tensors would not arrive; the position does."""
    resumes_on_two_ranks(f"accelerate-fsdp-{kind}-save", f"accelerate-fsdp-{kind}-load", tmp_path, fsdp2_uninterrupted)


def test_a_bf16_dcp_checkpoint_carries_the_sharded_master_copies(tmp_path):
    """bf16 weights: the fp32 masters and moments, DTensors on 2 ranks, come back whole on 1 process and resharded on 2."""
    uninterrupted = torch.load(spawn("dcp-bf16-uninterrupted", tmp_path), weights_only=True)
    spawn("dcp-bf16-save", tmp_path)
    resumed = torch.load(spawn("dcp-bf16-load", tmp_path), weights_only=True)
    for name, value in uninterrupted.items():  # the same ranks and reduction order: the same bits
        assert torch.equal(resumed[name], value), name

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    directory = str(tmp_path / "dcp-bf16")
    model = build(torch.bfloat16)
    weights = {"model": get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=directory)
    set_model_state_dict(model, weights["model"])
    optimizer = optimizer_for(model)
    bcd.sharded.load(model, optimizer, directory)
    gathered = torch.load(tmp_path / "dcp-bf16" / "gathered.pt", weights_only=True)
    masters = optimizer.master_copies.state_dict()
    assert masters and masters.keys() == gathered["master_copies"].keys()
    for name, master in masters.items():
        assert torch.equal(master, gathered["master_copies"][name]), name
    for index, entry in optimizer.solver.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, gathered["solver_state"]["state"][index][key]), (index, key)
