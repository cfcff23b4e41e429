"""Malformed state dicts: each refused with a ValueError, the model and optimizer left bit-identical.

One table of mutations of a real mid-visit record (bf16 Llama, random order, K = 3, two groups:
what ``state_dict()`` packs in torch's layout, unpacked by ``bcd.layout.unpack``), one of the
packed layout itself, each loaded into the live optimizer; afterwards every model tensor and the
optimizer's own record are compared with before, and training goes on exactly like an untouched twin.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bcd

from conftest import CASES, train

K, SEED = 3, 7


def make(order="random", steps=K + 1):
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    optimizer = bcd.BlockCoordinateOptimizer(
        model, lr=1e-2, switch_every=K, order=order, order_options={"seed": SEED}, solver="adamw",
        solver_options={"weight_decay": 0.1}, no_decay=True,
    )
    train(model, optimizer, case, steps)  # mid-visit: solver state and masters exist
    return model, optimizer


def record(optimizer):
    """The record inside ``optimizer.state_dict()`` (what a dict saved before packing holds, and loads as)."""
    return bcd.layout.unpack(optimizer.state_dict(), optimizer)


def first_master(sd):
    return next(iter(sd["master_copies"]))


def set_in(path, value):
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
        return sd
    return mutate


def drop(*path):
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return sd
    return mutate


def gpt2_partition(sd):
    other = bcd.BlockCoordinateOptimizer(CASES["gpt2"].model(), lr=0.1)
    sd["partition"] = record(other)["partition"]
    return sd


def master(change):
    def mutate(sd):
        name = first_master(sd)
        sd["master_copies"][name] = change(sd["master_copies"][name])
        return sd
    return mutate


def moment(change):
    def mutate(sd):
        entry = sd["solver_state"]["state"][0]
        entry["exp_avg"] = change(entry["exp_avg"])
        return sd
    return mutate


def fewer_solver_params(sd):
    sd["solver_state"]["param_groups"][0]["params"] = sd["solver_state"]["param_groups"][0]["params"][:-1]
    return sd


def more_solver_groups(sd):
    sd["solver_state"]["param_groups"].append(dict(sd["solver_state"]["param_groups"][0], params=[99]))
    return sd


CASES_ = {
    "not a dict": (lambda sd: [sd], r"format 'list'"),
    "another format": (set_in(["format"], "bcd/0"), r"format 'bcd/0'"),
    "a torch optimizer's": (lambda sd: torch.optim.AdamW([torch.zeros(1)]).state_dict(), r"format None"),
    "no schedule": (drop("schedule"), r"no 'schedule'"),
    "no param_groups": (drop("param_groups"), r"no 'param_groups'"),
    "no solver_state": (drop("solver_state"), r"no 'solver_state'"),
    "no master_copies": (drop("master_copies"), r"no 'master_copies'"),
    "no partition": (drop("partition"), r"no 'partition'"),
    "other K": (set_in(["switch_every"], K + 1), r"switch_every=4"),
    "other partitioner": (set_in(["partitioner"], "per-module"), r"partitioner='per-module'"),
    "other ordering": (set_in(["ordering"], "ascending"), r"ordering='ascending'"),
    "other solver": (set_in(["solver"], "sgd"), r"solver='sgd'"),
    "other partitioner options": (set_in(["partitioner_options", "include_head"], False), r"'include_head': False"),
    "schedule not a dict": (set_in(["schedule"], 5), r"schedule is int"),
    "no step_in_block": (drop("schedule", "step_in_block"), r"no 'step_in_block'"),
    "step_in_block = K": (set_in(["schedule", "step_in_block"], K), r"step_in_block is 3; accepted: 0 ... 2"),
    "step_in_block < 0": (set_in(["schedule", "step_in_block"], -1), r"step_in_block is -1"),
    "step_in_block a float": (set_in(["schedule", "step_in_block"], 1.0), r"step_in_block is 1.0"),
    "position -1": (set_in(["schedule", "position"], -1), r"position is -1"),
    "position past the order": (set_in(["schedule", "position"], 99), r"position is 99"),
    "global_step < 0": (set_in(["schedule", "global_step"], -4), r"global_step is -4"),
    "global_step a string": (set_in(["schedule", "global_step"], "4"), r"global_step is '4'"),
    "block_epoch a bool": (set_in(["schedule", "block_epoch"], True), r"block_epoch is True"),
    "block_epoch < 0": (set_in(["schedule", "block_epoch"], -1), r"block_epoch is -1"),
    "another order": (set_in(["schedule", "order"], lambda o: list(reversed(o))), r"saved with order"),
    "order not a list": (set_in(["schedule", "order"], "0123"), r"saved with order '0123'"),
    "another seed": (set_in(["schedule", "ordering_options", "seed"], 111), r"'seed': 111"),
    "a foreign model's partition": (gpt2_partition, r"another partition .*transformer"),
    "partition not a list": (set_in(["partition"], "layers"), r"another partition .*saved blocks 'layers'"),
    "param_groups not a list": (set_in(["param_groups"], {}), r"dict parameter group\(s\)"),
    "a group without params": (drop("param_groups", 0, "params"), r"2 parameter group\(s\) with other members"),
    "groups' members swapped": (lambda sd: {**sd, "param_groups": sd["param_groups"][::-1]}, r"other members"),
    "lr < 0": (set_in(["param_groups", 0, "lr"], -5), r"lr=-5; accepted: a finite number >= 0"),
    "lr a string": (set_in(["param_groups", 0, "lr"], "fast"), r"lr='fast'"),
    "lr NaN": (set_in(["param_groups", 1, "lr"], float("nan")), r"lr=nan"),
    "betas of one": (set_in(["param_groups", 0, "betas"], (0.9,)), r"betas=\(0.9,\)"),
    "eps < 0": (set_in(["param_groups", 0, "eps"], -1e-8), r"eps=-1e-08"),
    "weight_decay a bool": (set_in(["param_groups", 0, "weight_decay"], True), r"weight_decay=True"),
    "amsgrad not a bool": (set_in(["param_groups", 0, "amsgrad"], "no"), r"amsgrad='no'"),
    "master of shape [1]": (master(lambda m: torch.zeros(1)), r"is torch.float32 \(1,\); accepted: torch.float32 \(\d+, 16\)"),
    "master in bf16": (master(lambda m: m.to(torch.bfloat16)), r"torch.bfloat16 .*accepted: torch.float32"),
    "master not a tensor": (master(lambda m: m.tolist()), r"master_copies\[.*\] is \[\["),
    "a master missing": (lambda sd: {**sd, "master_copies": dict(list(sd["master_copies"].items())[1:])},
                         r"master_copies hold"),
    "a master too many": (lambda sd: {**sd, "master_copies": {**sd["master_copies"], "lm_head.weight": torch.zeros(1)}},
                          r"master_copies hold"),
    "masters without solver state": (set_in(["solver_state"], None), r"master_copies are given but solver_state is None"),
    "solver_state not a dict": (set_in(["solver_state"], [1, 2]), r"solver_state is list"),
    "solver_state['state'] not a dict": (set_in(["solver_state", "state"], 3), r"solver_state is dict without 'state'"),
    "a solver parameter fewer": (fewer_solver_params, r"solver_state does not fit .*doesn't match the size"),
    "a solver group more": (more_solver_groups, r"solver_state does not fit"),
    "moment of another shape": (moment(lambda m: m.flatten()[:3].clone()), r"\['exp_avg'\] has shape \(3,\)"),
    "moment of integers": (moment(lambda m: m.to(torch.int64)), r"\['exp_avg'\] has dtype torch.int64"),
    # A fused kernel trusts the shapes: before they were checked in full, these segfaulted or corrupted memory.
    "moment a scalar": (moment(lambda m: torch.zeros(())), r"\['exp_avg'\] has shape \(\); accepted: \(\d+, 16\)"),
    "moment of one element": (moment(lambda m: torch.zeros(1)), r"\['exp_avg'\] has shape \(1,\); accepted: \(\d+"),
    "step of the parameter's shape": (set_in(["solver_state", "state", 0, "step"], lambda s: torch.zeros(5, 16)),
                                      r"\['step'\] has shape \(5, 16\); accepted: \(\), a scalar"),
    "a moment missing": (drop("solver_state", "state", 0, "exp_avg"), r"solver_state\['state'\]\[0\] holds \['exp_avg_sq', 'step'\]"),
    "moment on the meta device": (moment(lambda m: m.to("meta")), r"\['exp_avg'\] is a meta-device tensor"),
    "master on the meta device": (master(lambda m: m.to("meta")), r"on the meta device; accepted: torch.float32"),
    "no solver state mid-visit": (lambda sd: {**sd, "solver_state": None, "master_copies": {}},
                                  r"solver_state is None at step 1 of a visit"),
    "switches < 0": (set_in(["switches"], -1), r"switches is -1; accepted: an integer >= 0"),
    "state for parameter 99": (set_in(["solver_state", "state"], lambda s: {**s, 99: s[0]}), r"has entry 99"),
    "observed not a dict": (set_in(["schedule", "observed"], 3), r"schedule.observed is 3; accepted: a dict"),
    "observed without visits": (drop("schedule", "observed", "visits"), r"schedule.observed is .*accepted: a dict with"),
    "grad_norm of one block": (set_in(["schedule", "observed", "grad_norm"], [None]), r"grad_norm is \[None\]; accepted: 4"),
    "visits a string": (set_in(["schedule", "observed", "visits"], "0000"), r"visits is '0000'; accepted: 4 integers"),
    "a visit without a norm": (set_in(["schedule", "observed", "visits"], [1, 0, 0, 0]), r"disagree"),
    "running NaN": (set_in(["schedule", "observed", "running"], float("nan")), r"running is nan"),
    "running_steps = K": (set_in(["schedule", "observed", "running_steps"], K), r"running_steps is 3; accepted: 0 ... 2"),
}
# An observing ordering (importance): its saved order is the record, checked for range, and its
# observations decide every later order. Cut after block-epoch 0, in a drawn block-epoch.
# The packed layout (torch's, which DCP and the Trainer's FSDP checkpoints carry): mutations of
# ``optimizer.state_dict()`` itself.
def in_record(key, value):
    def mutate(sd):
        sd["param_groups"][0]["bcd"][key] = value(sd["param_groups"][0]["bcd"][key]) if callable(value) else value
        return sd
    return mutate


PACKED_CASES = {
    "header not JSON": (in_record("header", "{schedule"), r"\['header'\] is not JSON"),
    "header a list": (in_record("header", "[1, 2]"), r"accepted: a dict with a 'header' JSON object"),
    "header without a schedule": (in_record("header", lambda h: h.replace('"schedule"', '"plan"')), r"no 'schedule'"),
    "master_copies a list": (in_record("master_copies", lambda m: list(m.values())), r"not a dict"),
    # Absent (torch's full-state load drops empty dicts) means none: mid-visit, that is refused.
    "no solver_state mid-visit": (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "bcd": {
        k: v for k, v in sd["param_groups"][0]["bcd"].items() if k not in ("solver_state", "master_copies")}},
        *sd["param_groups"][1:]]}, r"solver_state is None at step 1 of a visit"),
    "global_step of another step": (in_record("global_step", lambda s: s + 1), r"\['global_step'\] is tensor\(\[5\]\).*equal to the header's schedule.global_step \(4\)"),
    "global_step a float": (in_record("global_step", lambda s: s.double()), r"one-element integer tensor"),
    "per-parameter state": (set_in(["state", 0], {"exp_avg": torch.zeros(1)}), r"'state' holds per-parameter state .*not written by bcd"),
    "a tensor as a parameter's state": (set_in(["state", 0], torch.zeros(3)), r"per-parameter state \{0: 'Tensor'\}"),
    "a member index past the parameters": (set_in(["param_groups", 1, "params"], lambda p: [*p[:-1], 999]), r"other members"),
    "a member a float": (set_in(["param_groups", 1, "params"], lambda p: [*p[:-1], 1.0]), r"holds 1.0; accepted: parameter indices"),
    "groups' members swapped": (lambda sd: {**sd, "param_groups": [
        {**sd["param_groups"][0], "params": sd["param_groups"][1]["params"]},
        {**sd["param_groups"][1], "params": sd["param_groups"][0]["params"]}]}, r"other members"),
    "a moment of another shape": (in_record("solver_state", lambda s: {**s, "state": {**s["state"], 0: {
        **s["state"][0], "exp_avg": torch.zeros(3)}}}), r"\['exp_avg'\] has shape \(3,\)"),
}
IMPORTANCE_CASES = {
    "order past the blocks": (set_in(["schedule", "order"], [0, 4]), r"schedule.order is \[0, 4\]; accepted: a non-empty"),
    "empty order": (set_in(["schedule", "order"], []), r"schedule.order is \[\]"),
    "a negative norm": (set_in(["schedule", "observed", "grad_norm"], lambda g: [-1.0, *g[1:]]), r"grad_norm is \[-1.0"),
    "a norm unobserved": (set_in(["schedule", "observed", "grad_norm"], lambda g: [None, *g[1:]]), r"disagree"),
}


def deep_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_the_table_is_large_enough():
    assert len(CASES_) >= 40


@pytest.mark.parametrize("name", list(CASES_))
def test_a_malformed_state_dict_is_refused_and_changes_nothing(name):
    refused_and_unchanged(*CASES_[name])


@pytest.mark.parametrize("name", list(IMPORTANCE_CASES))
def test_an_observing_orderings_malformed_state_is_refused_and_changes_nothing(name):
    refused_and_unchanged(*IMPORTANCE_CASES[name], order="importance", steps=5 * K + 1)


@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_a_malformed_packed_state_dict_is_refused_and_changes_nothing(name):
    refused_and_unchanged(*PACKED_CASES[name], packed=True)


def test_a_record_saved_before_packing_still_loads():
    """Checkpoints written before the packed layout hold the record at the top level: they load as they did."""
    model, optimizer = make()
    saved, weights = record(optimizer), copy.deepcopy(model.state_dict())
    assert saved["format"] == bcd.state.STATE_FORMAT and "solver_state" in saved
    expected = train(model, optimizer, CASES["llama"], 2 * K, start=K + 1)
    other, other_optimizer = make(steps=0)
    other.load_state_dict(weights)
    other_optimizer.load_state_dict(saved)
    assert train(other, other_optimizer, CASES["llama"], 2 * K, start=K + 1) == expected


def refused_and_unchanged(mutate, match, order="random", steps=K + 1, packed=False):
    model, optimizer = make(order, steps)
    twin_model, twin = make(order, steps)
    saved = copy.deepcopy(optimizer.state_dict() if packed else record(optimizer))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(mutate(copy.deepcopy(saved)))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert deep_equal(optimizer.state_dict() if packed else record(optimizer), saved)
    # ... and training goes on exactly like an optimizer that never saw the bad dict.
    case = CASES["llama"]
    assert train(model, optimizer, case, 2 * K, start=steps) == train(twin_model, twin, case, 2 * K, start=steps)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


def test_a_state_dict_is_a_copy_that_later_steps_and_loads_leave_alone():
    """bcd keeps a visit's moments and masters in buffers it reuses: the state dict must not be views of them."""
    model, optimizer = make()
    saved = optimizer.state_dict()
    kept = copy.deepcopy(saved)
    train(model, optimizer, CASES["llama"], 2 * K, start=K + 1)  # into the next visit: the buffers are reused
    assert deep_equal(saved, kept)
    optimizer.load_state_dict(saved)
    assert deep_equal(optimizer.state_dict(), kept)
    moments = optimizer.solver.state_dict()["state"][0]["exp_avg"]
    assert moments.abs().sum() > 0  # o.load_state_dict(o.state_dict()) once zeroed Adam's moments


class _Wrapper(torch.nn.Module):
    """What DDP and accelerate add to every name: ``module.``; torch.compile's ``_orig_mod.`` alike."""

    def __init__(self, model, attribute="module"):
        super().__init__()
        setattr(self, attribute, model)

    def forward(self, *args, **kwargs):
        return next(self.children())(*args, **kwargs)


@pytest.mark.parametrize("saved_under, loaded_under", [("module", None), (None, "module"), ("_orig_mod", "module")])
def test_a_state_dict_saved_under_a_wrapper_loads_into_the_bare_model_and_back(saved_under, loaded_under):
    case = CASES["llama"]

    def make(attribute):
        model = case.model(dtype=torch.bfloat16)
        driven = _Wrapper(model, attribute) if attribute else model
        return model, bcd.BlockCoordinateOptimizer(driven, lr=1e-2, switch_every=K, order="random",
                                                   order_options={"seed": SEED}, no_decay=True)

    model, optimizer = make(saved_under)
    train(model, optimizer, case, K + 1)  # mid-visit: masters and solver state in the dict
    saved, weights = optimizer.state_dict(), copy.deepcopy(model.state_dict())
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in saved["param_groups"][0]["bcd"]["master_copies"])
    expected = train(model, optimizer, case, 2 * K, start=K + 1)
    other, other_optimizer = make(loaded_under)
    other.load_state_dict(weights)
    other_optimizer.load_state_dict(saved)
    assert train(other, other_optimizer, case, 2 * K, start=K + 1) == expected
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_a_state_dict_saved_under_real_ddp_loads_into_the_bare_model(tmp_path):
    """DDP on one gloo process names every parameter module.*: the dict still loads into the bare model."""
    import torch.distributed as dist

    from bcd.testing import free_port

    case = CASES["llama"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = case.model(dtype=torch.bfloat16)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = bcd.BlockCoordinateOptimizer(wrapped, lr=1e-2, switch_every=K, order="random",
                                                 order_options={"seed": SEED})
        for step in range(K + 1):  # mid-visit
            case.loss(wrapped, step).backward()
            optimizer.step()
            optimizer.zero_grad()
        saved, weights = optimizer.state_dict(), copy.deepcopy(model.state_dict())
        optimizer.close()
    finally:
        dist.destroy_process_group()
    assert "module." not in saved["param_groups"][0]["bcd"]["header"]
    bare = case.model(dtype=torch.bfloat16)
    bare.load_state_dict(weights)
    bare_optimizer = bcd.BlockCoordinateOptimizer(bare, lr=1e-2, switch_every=K, order="random", order_options={"seed": SEED})
    bare_optimizer.load_state_dict(saved)
    assert bare_optimizer.step_in_block == 1 and bare_optimizer.solver is not None
