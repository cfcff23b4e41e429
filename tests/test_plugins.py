"""The plugin manager: entry points, lookup by name, in-process registration, the example package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bcd
from bcd import plugins

from conftest import MLP

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_come_from_the_bcd_entry_points():
    names = {(r.kind, r.name): r.source for r in plugins.list_plugins()}
    for key in [("partitioner", "layer"), ("ordering", "random"), ("solver", "adamw")]:
        assert names[key].startswith("bcd "), names[key]


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"Unknown ordering: 'zigzag'; registered orderings: ascending, descending, fixed, importance, random"):
        plugins.lookup("ordering", "zigzag")
    with pytest.raises(ValueError, match=r"Unknown plugin kind: 'loss'"):
        plugins.lookup("loss", "x")


class Throwaway:
    """A plugin registered in-process, as a script would."""

    @bcd.hookimpl
    def register_orderings(self, register):
        register("backwards-twice", lambda: None)


def test_in_process_registration_and_unregistration():
    plugin = Throwaway()
    plugins.register(plugin)
    try:
        registration = plugins.lookup("ordering", "backwards-twice")
        assert registration.source == "Throwaway (in-process)"
    finally:
        plugins.unregister(plugin)
    with pytest.raises(ValueError, match="Unknown ordering"):
        plugins.lookup("ordering", "backwards-twice")


class Impostor:
    @bcd.hookimpl
    def register_solvers(self, register):
        register("adamw", object)


def test_a_duplicate_name_is_refused_and_not_registered():
    with pytest.raises(ValueError, match=r"Duplicate solver name 'adamw': registered by .* and again by Impostor"):
        plugins.register(Impostor())
    assert plugins.lookup("solver", "adamw").source.startswith("bcd ")
    assert not any(isinstance(p, Impostor) for p in plugins.pm.get_plugins())


def test_third_party_package_installed_is_found_by_name(tmp_path):
    """The example package, really installed (into a target dir), used by name in a new process."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(ROOT / "examples" / "bcd-halves")],
        check=True,
    )
    script = (
        "import torch, bcd\n"
        "from bcd import plugins\n"
        "print(plugins.lookup('partitioner', 'halves').source)\n"
        "model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])\n"
        "opt = bcd.BlockCoordinateOptimizer(model, partitioner='halves', lr=0.1)\n"
        "print([b.name for b in opt.blocks], [len(b.param_names) for b in opt.blocks])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    for allowed in (None, "bcd-halves", "bcd_halves, other"):
        if allowed is None:
            env.pop("BCD_LOAD_PLUGINS", None)
        else:
            env["BCD_LOAD_PLUGINS"] = allowed
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.splitlines() == ["bcd-halves 0.1.0", "['lower', 'upper'] [4, 4]"], allowed
    # Restricted to none but bcd's own, the installed plugin is not loaded.
    env["BCD_LOAD_PLUGINS"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "Unknown partitioner: 'halves'" in result.stderr
    # The package's own tests, written with bcd.testing, pass against this bcd.
    tests = ROOT / "examples" / "bcd-halves" / "tests"
    env["BCD_LOAD_PLUGINS"] = "bcd-halves"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                         env=env, capture_output=True, text=True, cwd=tests)
    assert run.returncode == 0, run.stdout[-2000:]


class EveryOther:
    """A throwaway partitioner plugin: parameters alternate between two blocks."""

    @bcd.hookimpl
    def register_partitioners(self, register):
        class Alternate:
            dynamic = False

            def partition(self, model, params, epoch):
                names = list(params)
                return bcd.Partition.from_groups({"even": names[::2], "odd": names[1::2]})

        register("every-other", Alternate)


def test_in_process_partitioner_used_by_name():
    from conftest import MLP

    plugin = EveryOther()
    plugins.register(plugin)
    try:
        optimizer = bcd.BlockCoordinateOptimizer(MLP(), partitioner="every-other", lr=0.1)
    finally:
        plugins.unregister(plugin)
    assert [b.name for b in optimizer.blocks] == ["even", "odd"]
    assert optimizer.blocks[0].param_names[:2] == ("inp.weight", "layers.0.weight")


class Misspelt:
    @bcd.hookimpl
    def register_partitioner(self, register):  # the hook is register_partitioners
        register("never", object)


def test_a_misspelt_hook_is_refused_and_not_registered():
    with pytest.raises(ValueError, match=r"Invalid plugin Misspelt \(in-process\): unknown hook 'register_partitioner'.*"
                                         r"accepted hook names: register_orderings, register_partitioners, register_solvers"):
        plugins.register(Misspelt())
    assert not any(isinstance(p, Misspelt) for p in plugins.pm.get_plugins())


@pytest.mark.parametrize("hook", ["register_partitioners", "register_orderings", "register_solvers"])
def test_every_register_hook_adds_to_the_registry(hook):
    kind = {"register_partitioners": "partitioner", "register_orderings": "ordering", "register_solvers": "solver"}[hook]
    factory = object()

    class Plugin:
        pass

    def implementation(self, register):
        register("throwaway", lambda **options: factory)

    setattr(Plugin, hook, bcd.hookimpl(implementation))
    plugin = Plugin()
    plugins.register(plugin)
    try:
        assert plugins.create(kind, "throwaway") is factory
    finally:
        plugins.unregister(plugin)
    with pytest.raises(ValueError, match=f"Unknown {kind}: 'throwaway'"):
        plugins.lookup(kind, "throwaway")


class Raises:
    @bcd.hookimpl
    def register_orderings(self, register):
        register("half-done", lambda: None)
        raise RuntimeError("the plugin's own bug")


class WrongArguments:
    @bcd.hookimpl
    def register_orderings(self, add):  # the spec's argument is `register`
        add("never", object)


@pytest.mark.parametrize("plugin, match", [
    (Raises(), r"Cannot register plugin Raises \(in-process\): its register hook raised RuntimeError: the plugin's own bug"),
    (WrongArguments(), r"Cannot register plugin WrongArguments \(in-process\): .*\{'add'\} are declared in the hookimpl .*register_partitioners\(register\)"),
])
def test_a_plugin_that_fails_to_register_is_not_left_registered(plugin, match):
    """Registration is a transaction: a plugin whose hook raised once broke every later construction."""
    with pytest.raises(ValueError, match=match):
        plugins.register(plugin)
    assert not any(p is plugin for p in plugins.pm.get_plugins())
    with pytest.raises(ValueError, match="Unknown ordering: 'half-done'"):
        plugins.lookup("ordering", "half-done")
    bcd.BlockCoordinateOptimizer(MLP(), lr=0.1)  # the registry still works


def test_unregistering_a_plugin_never_registered_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Cannot unregister plugin .*Throwaway.*: it is not registered"):
        plugins.unregister(Throwaway())
