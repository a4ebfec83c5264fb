"""Finding, loading and calling plugins — and surviving broken ones.

Plugins come from the ``adapterkit`` entry-point group (the built-ins too) and from
``ADAPTERKIT_LOAD_PLUGINS`` (comma-separated ``.py`` files, folders or module names). Plugins named
in ``ADAPTERKIT_DISABLE_PLUGINS`` (comma-separated; ``*`` for all entry-point plugins) are not
loaded at all.

Fault isolation is the point of this module: a plugin that fails to import, declares a hook that
does not exist, or raises in a hook — ``SystemExit`` from ``sys.exit()`` included, as anything but
``KeyboardInterrupt`` — produces one warning naming it, and every other plugin — and every
command, including the one that would uninstall it — keeps working. That is why registration
hooks are called one implementation at a time instead of through pluggy's all-or-nothing
``pm.hook.register_x(...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from adapterkit.errors import PluginError
from adapterkit.plugin_api import hookspecs
from adapterkit.plugin_api.registry import (
    AdapterMethod,
    DataFormat,
    MergeStrategy,
    Registry,
    Scorer,
    Trainer,
)

ENTRY_POINT_GROUP = "adapterkit"
LOAD_ENV = "ADAPTERKIT_LOAD_PLUGINS"
DISABLE_ENV = "ADAPTERKIT_DISABLE_PLUGINS"


class PluginWarning(UserWarning):
    """A plugin was skipped or one of its hooks failed; everything else keeps working."""


@dataclass
class PluginInfo:
    """What ``adapterkit plugins`` reports about one plugin."""

    name: str
    version: str | None
    source: str
    hooks: list[str] = field(default_factory=list)
    registers: dict[str, list[str]] = field(default_factory=dict)
    hook_version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "hook_version": self.hook_version,
            "hooks": self.hooks,
            "registers": self.registers,
        }


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


#: Each registration hook, and the :class:`PluginManager` registry it fills.
REGISTRATION_HOOKS = {"register_methods": "methods", "register_trainers": "trainers",
                      "register_merge_strategies": "merge_strategies",
                      "register_data_formats": "data_formats", "register_scorers": "scorers"}


class PluginManager:
    """The loaded plugins and everything they registered.

    Build one with :func:`get_plugin_manager`; tests build fresh ones and register inline plugins
    with :meth:`add`.
    """

    def __init__(self) -> None:
        self.pluggy = pluggy.PluginManager("adapterkit")
        self.pluggy.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.methods: Registry[AdapterMethod] = Registry("method", AdapterMethod)
        self.trainers: Registry[Trainer] = Registry("trainer", Trainer)
        self.merge_strategies: Registry[MergeStrategy] = Registry("merge strategy", MergeStrategy)
        self.data_formats: Registry[DataFormat] = Registry("data format", DataFormat)
        self.scorers: Registry[Scorer] = Registry("scorer", Scorer)

    # -- loading -----------------------------------------------------------------------------

    def add(self, plugin: object, name: str, *, version: str | None = None,
            source: str = "inline") -> bool:
        """Register one plugin object/module and run its registration hooks.

        Returns False (after a warning) when the plugin is unusable; never raises for it.
        """
        declared = getattr(plugin, "ADAPTERKIT_HOOK_VERSION", None)
        if declared is not None and declared != hookspecs.HOOK_VERSION:
            _warn(
                f"plugin {name!r} was written for adapterkit hook version {declared}, this "
                f"adapterkit has version {hookspecs.HOOK_VERSION}; skipped it. Upgrade the "
                f"plugin (or adapterkit), or disable it with {DISABLE_ENV}={name}"
            )
            return False
        if self.pluggy.has_plugin(name):  # (pluggy's own error lists every module loaded)
            first = self.info.get(name)
            where = f" (from {first.source})" if first and first.source else ""
            _warn(f"plugin {name!r} from {source} was not loaded: a plugin of that name is "
                  f"loaded already{where}, and that one is used; rename one of them (e.g. a "
                  "development copy) to load both")
            return False
        try:
            self.pluggy.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # pluggy.PluginValidationError, ValueError (duplicate name)
            _warn(f"plugin {name!r} could not be registered: {_describe(exc)}")
            return False
        unknown = [
            impl.function.__name__
            for caller in vars(self.pluggy.hook).values()
            if isinstance(caller, pluggy.HookCaller)
            for impl in caller.get_hookimpls()
            if impl.plugin_name == name and not caller.has_spec()
        ]
        if unknown:
            self.pluggy.unregister(name=name)
            _warn(
                f"plugin {name!r} declares unknown hook(s) {', '.join(sorted(set(unknown)))}; "
                f"skipped it. Known hooks: {', '.join(self.hook_names())}"
            )
            return False
        unmarked = [hook for hook in self.hook_names()
                    if callable(getattr(plugin, hook, None))
                    and not hasattr(getattr(plugin, hook), "adapterkit_impl")]
        if unmarked:  # pluggy skips them without a word: the plugin would do nothing
            _warn(f"plugin {name!r} defines {', '.join(unmarked)} without @hookimpl, so "
                  "adapterkit never calls it: decorate it with @adapterkit.hookimpl")
        info = PluginInfo(name=name, version=version, source=source, hook_version=declared)
        info.hooks = sorted(
            hook for hook in self.hook_names()
            if any(i.plugin_name == name for i in getattr(self.pluggy.hook, hook).get_hookimpls())
        )
        self.info[name] = info
        self._register_from(name)
        return True

    def plugin_at_fault(self, tb: Any) -> tuple[str, str] | None:
        """``(plugin name, "file.py:line")`` of the third-party plugin whose code raised the
        exception of traceback ``tb``, itself or through a library it called: its innermost
        frame, where no frame of adapterkit lies deeper. None otherwise — adapterkit's own
        code raised (called back from a plugin's trainer, say: a callback, the guard), or no
        plugin is on the traceback; the built-in plugins are adapterkit's own code."""
        owners: dict[str, str] = {}  # top-level package of a plugin's module → plugin name
        for name, plugin in self.pluggy.list_name_plugin():
            module = plugin.__name__ if isinstance(plugin, ModuleType) \
                else type(plugin).__module__
            top = module.split(".")[0]
            if top not in ("adapterkit", "adapterkit_plugins", "builtins"):
                owners.setdefault(top, name)
        found = None
        while tb is not None:
            module = str(tb.tb_frame.f_globals.get("__name__", ""))
            top = module.split(".")[0]
            if top in owners:
                found = owners[top], f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            elif top in ("adapterkit", "adapterkit_plugins") and \
                    (module, tb.tb_frame.f_code.co_name) not in _PASS_THROUGH:
                found = None  # ours, deeper than the plugin's last frame so far
            tb = tb.tb_next
        return found

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "adapterkit_spec"))

    def _impls(self, hook: str, plugin: str | None = None) -> list[pluggy.HookImpl]:
        impls = getattr(self.pluggy.hook, hook).get_hookimpls()
        return [i for i in impls if plugin is None or i.plugin_name == plugin]

    def registry_of(self, hook: str) -> Registry[Any] | None:
        """The registry the registration hook ``hook`` fills (None for another hook)."""
        attribute = REGISTRATION_HOOKS.get(hook)
        return getattr(self, attribute) if attribute else None

    def _register_from(self, plugin: str) -> None:
        for hook, attribute in REGISTRATION_HOOKS.items():
            registry: Registry[Any] = getattr(self, attribute)
            for impl in self._impls(hook, plugin):
                def register(item: Any, _registry: Registry = registry) -> None:
                    try:
                        _registry.add(item, plugin)
                    except PluginError as exc:
                        _warn(str(exc))
                        return
                    self.info[plugin].registers.setdefault(_registry.kind, []).append(item.name)

                self._call(impl, register=register)

    def _call(self, impl: pluggy.HookImpl, **kwargs: Any) -> Any:
        """Call one hook implementation with the keyword arguments it asks for; warn on failure."""
        try:
            return impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except KeyboardInterrupt:  # Ctrl-C is the user's; anything else is the plugin's bug
            raise
        except BaseException as exc:
            _warn(
                f"plugin {impl.plugin_name!r} failed in hook {impl.function.__name__}: "
                f"{_describe(exc)}"
            )
            return None

    # -- calling -----------------------------------------------------------------------------

    def call_each(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of ``hook`` in isolation (lifecycle hooks)."""
        return [result for _, result in self.call_one_by_one(hook, **kwargs)]

    def call_one_by_one(self, hook: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call every implementation of ``hook`` in isolation, yielding ``(plugin, result)``
        after each, so the caller can check what that one plugin did before the next runs
        (``build_cli`` keeps a plugin from replacing another's command this way)."""
        for impl in self._impls(hook):
            yield impl.plugin_name, self._call(impl, **kwargs)

    def method(self, name: str) -> AdapterMethod:
        return self.methods.get(name)

    def trainer(self, name: str) -> Trainer:
        return self.trainers.get(name)


#: adapterkit's frames that only hand a plugin's trainer its own work on (the forgetting
#: guard's wrappers around a trainer's loss): what raises beneath them is not adapterkit's.
_PASS_THROUGH = {("adapterkit.training.guard", "compute_loss"),
                 ("adapterkit.training.guard", "training_step"),
                 ("adapterkit.training.guard", "with_task")}

#: Libraries a plugin must not import when it loads (docs/plugins.md, "Start-up is cheap").
HEAVY_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes",
                 "accelerate")


def _heavy() -> set[str]:
    return {m for m in HEAVY_MODULES if m in sys.modules}


def _warn_heavy(name: str, before: set[str], started: float) -> None:
    """Name the plugin whose loading (import and registration hooks) imported a heavy library:
    every command, ``--help`` included, pays for it, and without this adapterkit looks slow.
    The time is this load's, measured from ``started`` (a ``time.perf_counter()``)."""
    new = _heavy() - before
    if new:
        took = time.perf_counter() - started
        _warn(f"plugin {name!r} imports {', '.join(sorted(new))} when it loads, which took "
              f"{took:.2g} s here and is paid by every adapterkit command (--help included); "
              "its author should import them inside the methods of what it registers "
              f"(docs/plugins.md, 'Start-up is cheap'). {DISABLE_ENV}={name} skips it")


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _load_entry_points(manager: PluginManager, disabled: set[str],
                       given: dict[str, object] | None = None) -> set[str]:
    """Load the entry-point plugins not ``disabled``; returns every entry-point name found."""
    from importlib.metadata import entry_points

    given = given or {}
    loaded_from: dict[str, str] = {}  # entry-point name → the distribution whose plugin it is
    # the built-ins first: where a plugin reuses a built-in's name for a trainer, strategy...,
    # the built-in keeps it on every machine, whatever order the distributions are found in
    found = sorted(entry_points(group=ENTRY_POINT_GROUP),
                   key=lambda ep: ep.dist is None or _normalized(ep.dist.name) != "adapterkit")
    for ep in found:
        if ep.name in disabled or "*" in disabled:
            continue
        # name the distribution as `adapterkit uninstall` takes it: that is what pip calls it,
        # and it differs from the plugin's name (shout → adapterkit-shout)
        dist = (ep.dist.name if ep.dist is not None else None) or ep.name
        if ep.name in given:  # the caller registers its own plugin under this name
            continue
        if ep.name in manager.info:
            if ep.name in loaded_from:  # two installed distributions claim one name
                _warn_duplicate(ep.name, dist, loaded_from[ep.name])
            continue
        version = ep.dist.version if ep.dist is not None else None
        before, started = _heavy(), time.perf_counter()
        try:
            module = ep.load()
        except KeyboardInterrupt:  # Ctrl-C is the user's; anything else is the plugin's bug
            raise
        except BaseException as exc:
            _warn(
                f"plugin {ep.name!r} failed to import ({_describe(exc)}); it is skipped. "
                f"Fix it, uninstall it with `adapterkit uninstall {dist}`, or disable it with "
                f"{DISABLE_ENV}={ep.name}"
            )
            continue
        if any(module is plugin for plugin in given.values()):
            continue  # the caller registers this very module under another name
        if manager.add(module, ep.name, version=version, source=f"entry point {ep.value}"):
            loaded_from[ep.name] = dist
        _warn_heavy(ep.name, before, started)
    return {ep.name for ep in found}


def _warn_duplicate(name: str, dist: str, first: str) -> None:
    """Two distributions whose plugins share a name: the first found on ``sys.path`` stays
    (as pluggy can hold one plugin per name); the user is told which, and how to choose."""
    removable = [d for d in (dist, first) if _normalized(d) != "adapterkit"]
    how = " or ".join(f"`adapterkit uninstall {d}`" for d in removable)
    _warn(f"the plugin of {dist} defines its name as {name!r} but that name is already used by "
          f"the plugin of {first}, which stays; {dist}'s is skipped. Uninstall the one you do "
          f"not want ({how})")


def installed_plugins() -> dict[str, str]:
    """Entry-point name → the distribution that installs it, for every installed plugin (the
    built-ins too), read from package metadata only: no plugin's code runs."""
    from importlib.metadata import entry_points

    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):  # the first on sys.path is the one loaded
        found.setdefault(ep.name, (ep.dist.name if ep.dist is not None else None) or ep.name)
    return found


def _import_path(spec: str) -> list[tuple[str, ModuleType]]:
    """Import ``spec``: a ``.py`` file, a folder (package, or a folder of ``.py`` files) or a module."""
    path = Path(spec).expanduser()
    if path.suffix == ".py" and path.is_file():
        return [(path.stem, _import_file(path.stem, path))]
    if path.is_dir():
        if (path / "__init__.py").is_file():
            return [(path.name, _import_file(path.name, path / "__init__.py"))]
        return [(p.stem, _import_file(p.stem, p)) for p in sorted(path.glob("*.py"))]
    if os.sep in spec or spec.endswith(".py"):
        raise FileNotFoundError(f"no such plugin file or folder: {spec}")
    return [(spec, importlib.import_module(spec))]


def _import_file(name: str, path: Path) -> ModuleType:
    module_name = f"adapterkit_loaded_plugin_{name}"
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)]
        if path.name == "__init__.py" else None,
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _load_env_plugins(manager: PluginManager, disabled: set[str]) -> set[str]:
    """Load the ``ADAPTERKIT_LOAD_PLUGINS`` plugins not ``disabled``; returns their names."""
    names: set[str] = set()  # (with "" for a spec that failed to load: its names are unknown)
    for spec in (s.strip() for s in os.environ.get(LOAD_ENV, "").split(",")):
        if not spec:
            continue
        before, started = _heavy(), time.perf_counter()
        try:
            modules = _import_path(spec)
        except KeyboardInterrupt:  # Ctrl-C is the user's; anything else is the plugin's bug
            raise
        except BaseException as exc:
            _warn(f"plugin {spec!r} from {LOAD_ENV} failed to load ({_describe(exc)}); skipped")
            names.add("")
            continue
        for name, module in modules:
            names.add(name)
            if manager.pluggy.is_registered(module):  # installed too (pip install -e): loaded
                continue
            if name not in disabled:
                manager.add(module, name, source=f"{LOAD_ENV}: {spec}")
        _warn_heavy(",".join(name for name, _ in modules) or spec, before, started)
    return names


def _normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Adapterkit_Shout`` = ``adapterkit-shout``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def uninstall_name(name: str) -> str:
    """The installed distribution ``adapterkit uninstall NAME`` removes, as pip names it.

    ``name`` may be a plugin's entry-point name (``shout``), its distribution name
    (``adapterkit-shout``), or that without the ``adapterkit-`` prefix. Only package metadata is
    read, never a plugin's code, so a plugin that fails to import — or whose editable folder was
    deleted — resolves too. A name that is no plugin but an installed distribution comes back as
    given: ``install`` takes any package, and so does ``uninstall``.

    Raises :class:`PluginError` for adapterkit itself and its built-in plugins, for a name two
    plugins answer to, and for a name nothing installed has (listing the installed plugins).
    """
    from importlib.metadata import distributions

    plugins: dict[str, tuple[str, list[str]]] = {}  # normalized → (name, entry-point names)
    others: set[str] = set()
    for dist in distributions():
        dist_name = dist.metadata["Name"]
        if not dist_name:  # unreadable metadata: pip cannot name it either
            continue
        eps = [ep.name for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if eps:  # the first found on sys.path is the one imported, and the one pip removes
            plugins.setdefault(_normalized(dist_name), (dist_name, eps))
        else:
            others.add(_normalized(dist_name))
    prefixed = _normalized(f"adapterkit-{name}")
    for found in (
        [d for key, (d, _) in plugins.items() if key == _normalized(name)],
        [d for d, eps in plugins.values() if name in eps],
        [d for key, (d, _) in plugins.items() if key == prefixed],
    ):
        if len(found) > 1:
            raise PluginError(f"{name!r} names plugins of several distributions "
                              f"({', '.join(sorted(found))}); uninstall one by that name")
        if found and _normalized(found[0]) == "adapterkit":
            raise PluginError(
                f"{name!r} is part of adapterkit itself; disable a built-in plugin with "
                f"{DISABLE_ENV}=NAME, or remove adapterkit with `pip uninstall adapterkit`")
        if found:
            return found[0]
    if _normalized(name) in others:
        return name
    installed = ", ".join(f"{d} (plugin {', '.join(eps)})" for key, (d, eps)
                          in sorted(plugins.items()) if key != "adapterkit") or "none"
    raise PluginError(f"no installed adapterkit plugin or package is called {name!r}; "
                      f"installed plugins: {installed}")


def get_plugin_manager(*, entry_points: bool = True, env: bool = True,
                       plugins: dict[str, object] | None = None) -> PluginManager:
    """Build a plugin manager with the installed plugins loaded and their registrations done.

    :param entry_points: load plugins from the ``adapterkit`` entry-point group (built-ins too).
    :param env: honour ``ADAPTERKIT_LOAD_PLUGINS`` and ``ADAPTERKIT_DISABLE_PLUGINS``.
    :param plugins: extra ``{name: plugin}`` objects (tests, embedding apps), registered after
        the installed ones as an installed third-party plugin would be, so that a name one of
        them shares with a built-in resolves as it will for users (the built-in keeps it); an
        installed plugin of the same name, or whose module is one of them, is not loaded.
    """
    manager = PluginManager()
    given = dict(plugins or {})
    disabled = _disabled() if env else set()
    names: set[str] = set()  # what the variable can disable (never the plugins given here)
    if entry_points:
        names |= _load_entry_points(manager, disabled, given)
    for name, plugin in given.items():
        manager.add(plugin, name)
    if env:
        names |= _load_env_plugins(manager, disabled)
    unknown = sorted(disabled - names - set(given) - {"*"})
    if unknown and entry_points and "" not in names:  # a typo would leave the plugin it
        # meant loaded, unsaid (unless a plugin failed to load: it may have been that one)
        _warn(f"{DISABLE_ENV} names {', '.join(map(repr, unknown))}, but no plugin is called "
              f"that, so it disabled nothing; plugins: {', '.join(sorted(names))}")
    return manager


_default: PluginManager | None = None


def default_plugin_manager() -> PluginManager:
    """The process-wide plugin manager used by the Python API when none is passed."""
    global _default
    if _default is None:
        _default = get_plugin_manager()
    return _default

