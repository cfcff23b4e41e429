"""The plugin manager and the registries of partitioners, orderings and solvers.

Plugins come from the ``bcd`` entry-point group (the built-ins in ``bcd_plugins`` are found there
too; ``BCD_LOAD_PLUGINS=dist1,dist2`` restricts which other distributions load, empty for none)
or are registered in-process with :func:`register` — handy in scripts and tests::

    class MyPlugin:
        @bcd.hookimpl
        def register_partitioners(self, register):
            register("halves", Halves)

    bcd.plugins.register(MyPlugin())      # ... and bcd.plugins.unregister(...) when done
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pluggy

from bcd import hookspecs

ENTRY_POINT_GROUP = "bcd"
KINDS = ("partitioner", "ordering", "solver")

pm = pluggy.PluginManager("bcd")
pm.add_hookspecs(hookspecs)
_entry_points_loaded = False
_distributions: list[tuple[object, str]] = []
LOAD_ENV = "BCD_LOAD_PLUGINS"
_registry: dict[str, dict[str, Registration]] | None = None


@attrs.frozen(kw_only=True)
class Registration:
    """One registered plugin factory.

    Attributes:
        kind: ``"partitioner"``, ``"ordering"`` or ``"solver"``.
        name: the name it is looked up by.
        factory: the callable registered.
        source: where it came from: ``"<distribution> <version>"`` for an installed package,
            otherwise the plugin's module or class name marked ``(in-process)``.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def allowed_distributions() -> set[str] | None:
    """The distributions whose entry points load (besides bcd's own): None for all.

    ``BCD_LOAD_PLUGINS`` restricts them: a comma-separated list of distribution names, or empty
    for none but bcd's built-ins (the test suite sets it, so installed plugins cannot change its
    results).
    """
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {_normalized(n.strip()) for n in value.split(",") if n.strip()}


def _ensure_loaded() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    allowed = allowed_distributions()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        dist_name = _normalized(dist.name) if dist is not None else ""
        if dist_name != "bcd" and allowed is not None and dist_name not in allowed:
            continue
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        plugin = entry_point.load()
        pm.register(plugin, name=entry_point.name)
        if dist is not None:
            _distributions.append((plugin, f"{dist.name} {dist.version}"))
    _entry_points_loaded = True
    _check_pending()


def _check_pending() -> None:
    """Refuse a hook implementation whose name matches no hook (a misspelt ``register_partitioner``)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        hooks = ", ".join(sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "bcd_spec")))
        raise ValueError(f"Invalid plugin {_source_of(error.plugin)}: {error}; accepted hook names: {hooks}.") from error


def _source_of(plugin: object) -> str:
    for loaded, source in _distributions:
        if loaded is plugin:
            return source
    label = getattr(plugin, "__name__", None) or type(plugin).__qualname__
    return f"{label} (in-process)"


def _build_registry() -> dict[str, dict[str, Registration]]:
    registry: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
    hooks = {
        "partitioner": "register_partitioners",
        "ordering": "register_orderings",
        "solver": "register_solvers",
    }
    for kind, hook_name in hooks.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            source = _source_of(impl.plugin)

            def register(name: str, factory: Callable[..., Any], *, _kind: str = kind, _source: str = source) -> None:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"Invalid {_kind} name from {_source}: {name!r}; a name is a non-empty string.")
                if not callable(factory):
                    raise ValueError(f"Invalid {_kind} {name!r} from {_source}: {factory!r} is not callable.")
                taken = registry[_kind].get(name)
                if taken is not None:
                    raise ValueError(
                        f"Duplicate {_kind} name {name!r}: registered by {taken.source} and again by {_source}; "
                        "names must be unique — unregister one of the plugins or rename."
                    )
                registry[_kind][name] = Registration(kind=_kind, name=name, factory=factory, source=_source)

            impl.function(register=register)
    return registry


def registry() -> dict[str, dict[str, Registration]]:
    """Every registration by kind and name, built on first use and after each (un)registration."""
    global _registry
    _ensure_loaded()
    if _registry is None:
        _registry = _build_registry()
    return _registry


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin object in-process (no installation needed).

    Transactional: a plugin that is refused, or whose register hook raises, is not left
    registered, and the registry is as before.

    Raises:
        ValueError: the plugin is already registered, a hook is misnamed or mistyped, one of its
            names is taken, or its register hook raised (the error names the plugin and the cause).
    """
    global _registry
    _ensure_loaded()
    try:
        pm.register(plugin, name=name)
    except ValueError as error:
        raise ValueError(f"Cannot register plugin {plugin!r}: {error}") from error
    except pluggy.PluginValidationError as error:  # a hook's arguments are not the spec's
        if pm.get_name(plugin) is not None:  # pluggy keeps the name of a plugin it refused
            pm.unregister(plugin)
        raise ValueError(f"Cannot register plugin {_source_of(plugin)}: {' '.join(str(error).split())}; accepted: "
                         "hooks taking the spec's arguments, e.g. register_partitioners(register).") from error
    _registry = None
    try:
        _check_pending()
        registry()
    except Exception as error:
        pm.unregister(plugin)
        _registry = None
        if isinstance(error, ValueError):
            raise
        raise ValueError(
            f"Cannot register plugin {_source_of(plugin)}: its register hook raised {type(error).__name__}: {error}; "
            "it is not registered."
        ) from error


def unregister(plugin: object) -> None:
    """Unregister a plugin registered with :func:`register` (or by entry point).

    Raises:
        ValueError: the plugin is not registered.
    """
    global _registry
    if pm.get_name(plugin) is None:
        raise ValueError(f"Cannot unregister plugin {plugin!r}: it is not registered; accepted: a plugin object "
                         "given to bcd.plugins.register (or loaded by entry point).")
    pm.unregister(plugin)
    _registry = None


def lookup(kind: str, name: str) -> Registration:
    """The registration of ``name`` among plugins of ``kind``.

    Raises:
        ValueError: unknown kind, or no plugin of that kind has that name (the message lists the
            registered names).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown plugin kind: {kind!r}; accepted: {', '.join(KINDS)}.")
    entries = registry()[kind]
    if name not in entries:
        known = ", ".join(sorted(entries)) or "(none: is bcd installed? its built-ins load by entry point)"
        raise ValueError(f"Unknown {kind}: {name!r}; registered {kind}s: {known}.")
    return entries[name]


def create(kind: str, name: str, options: dict[str, Any] | None = None, *args: Any) -> Any:
    """Look up ``name`` and call its factory with ``*args`` and ``**options`` (see :func:`call`)."""
    return call(lookup(kind, name).factory, options, *args, label=f"{kind} {name!r}")


def call(factory: Callable[..., Any], options: Mapping[str, Any] | None, *args: Any, label: str) -> Any:
    """``factory(*args, **options)``, with every option mistake a ``ValueError`` naming ``label``.

    Options the factory does not accept, and required ones missing, are refused with the list of
    accepted ones rather than surfacing as a bare ``TypeError`` from deep inside; a ``TypeError``
    or ``IndexError`` the factory raises on a bad value becomes a ``ValueError`` too.
    """
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"Invalid options for {label}: {options!r}; accepted: a dict of keyword options.")
    options = dict(options or {})
    accepted, required = _signature_options(factory)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for {label}; accepted: {', '.join(sorted(accepted)) or '(none)'}."
            )
    missing = sorted(required - set(options))
    if missing:
        raise ValueError(f"Missing option(s) {missing} for {label}: required, no default; received {options!r}.")
    try:
        return factory(*args, **options)
    except (TypeError, IndexError) as error:
        raise ValueError(f"Invalid options for {label}: {options!r}: {error}") from error


def _signature_options(factory: Callable[..., Any]) -> tuple[set[str] | None, set[str]]:
    """Keyword names ``factory`` accepts (None when it takes ``**kwargs`` or has no signature), and the required ones."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None, set()
    names: set[str] = set()
    required: set[str] = set()
    takes_any = False
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            takes_any = True
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(param.name)
            if param.default is inspect.Parameter.empty:
                required.add(param.name)
    # Solvers take their parameters positionally first; that slot is not an option.
    names.discard("params")
    required.discard("params")
    return (None if takes_any else names), required


def list_plugins() -> list[Registration]:
    """Every registration, sorted by kind then name."""
    entries = registry()
    return [entries[kind][name] for kind in KINDS for name in sorted(entries[kind])]
