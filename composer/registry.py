"""Name registries, PluggableLayer, CustomOp and plugins: the few stable extension points.

The names registered here are the names in ``conf/``, in error messages and in benchmark tables.
Model code never branches on a backend: it asks a registry for the class behind a name.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
from torch import nn

from .errors import RegistryError, did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")


_REGISTRIES: list["Registry[Any]"] = []  # every registry, so a plugin that fails halfway can be undone


class Registry(Generic[T]):
    """A name -> object table. Duplicate names are refused; unknown names suggest the closest one.

    An *internal* name (``mark_internal``) stays gettable, for the code that builds it, but is no user choice:
    ``names()`` leaves it out, so config validation, choice lists and did-you-means never offer it."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = (), replace_hint: str = ""):
        self.kind = kind
        self.reserved = reserved  # names the config gives a meaning of its own (kernel=auto, custom_ops all/none)
        self.replace_hint = replace_hint  # how to replace an in-tree implementation of this kind, if one can
        self._items: dict[str, T] = {}
        self._internal: dict[str, str] = {}  # name -> why it is no user choice
        _REGISTRIES.append(self)

    def register(self, name: str, obj: T | None = None) -> Any:
        def add(o: T) -> T:
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise RegistryError(f"a {self.kind} name is what a config writes ({self.kind.split()[-1]}=NAME): "
                                    f"letters, digits and _, not starting with a digit; got {name!r}")
            if name in self.reserved:
                raise RegistryError(f"{self.kind} '{name}' is a name the config reserves (it means something of its "
                                    f"own there, so this registration could never be chosen); pick another name")
            if name in self._items and self._items[name] is not o:
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered by {_qualname(self._items[name])}; "
                    f"pick another name{self.replace_hint}"
                )
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(self.names()) or '(none)'}."
                + did_you_mean(name, self.names())
            ) from None

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._items

    def names(self) -> list[str]:
        """The names a user may choose (internal ones left out)."""
        load_plugins()
        return sorted(n for n in self._items if n not in self._internal)

    def mark_internal(self, name: str, why: str) -> None:
        """Keep ``name`` out of the user's choices: a class only other code builds (``why`` says which, and what
        to choose instead; it ends the error for a config that names it)."""
        self._internal[name] = why

    def internal(self, name: object) -> str | None:
        """Why ``name`` is no user choice, or None for a name a user may choose (or an unknown one)."""
        load_plugins()
        return self._internal.get(name) if isinstance(name, str) and name in self._items else None

    def unregister(self, name: str) -> None:
        """For tests and plugin reloads."""
        self._items.pop(name, None)


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # (a registry name is a config name: group=NAME, kernel.name=NAME)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# The registries. Each kind lives in exactly one table; conf/<group>/ holds one yaml per name.
LAYERS: Registry[type] = Registry("layer", replace_hint=", or replace the in-tree layer with register_oot "
                                  "(@FusedMoE.register_oot)")
CUSTOM_OPS: Registry[type] = Registry("custom op", reserved=("all", "none"))
QUANT_METHODS: Registry[type] = Registry("quant method")
ALL2ALL: Registry[type] = Registry("all2all backend")
KERNELS: Registry[type] = Registry("experts kernel", reserved=("auto",))
TASKS: Registry[Any] = Registry("task")


# ----------------------------------------------------------------------------------------------
# Settings active while a graph is built (like vLLM's set_current_vllm_config): which custom ops
# are enabled, and for which device platform their implementation is chosen.


@dataclass
class BuildSettings:
    custom_ops: list[str] = field(default_factory=lambda: ["all"])
    platform: str = "cpu"  # "cuda" or "cpu": chooses forward_cuda / forward_cpu


_settings = BuildSettings()


@contextlib.contextmanager
def build_settings(custom_ops: list[str] | None = None, platform: str | None = None) -> Iterator[BuildSettings]:
    global _settings
    old = _settings
    _settings = BuildSettings(
        custom_ops=list(custom_ops) if custom_ops is not None else list(old.custom_ops),
        platform=platform or old.platform,
    )
    try:
        yield _settings
    finally:
        _settings = old


def current_settings() -> BuildSettings:
    return _settings


def check_custom_ops(entries: list[str]) -> list[str]:
    """Problems with a ``custom_ops`` list, with vLLM's rules: 'all' or 'none' once, then +name/-name."""
    problems: list[str] = []
    names = CUSTOM_OPS.names()
    if "all" in entries and "none" in entries:
        problems.append("'all' and 'none' cannot both be given")
    seen: dict[str, str] = {}
    for e in entries:
        if e in ("all", "none"):
            continue
        if not isinstance(e, str) or len(e) < 2 or e[0] not in "+-":
            problems.append(f"entry {e!r} must be 'all', 'none', '+name' or '-name'")
            continue
        sign, name = e[0], e[1:]
        if name not in names:
            problems.append(
                f"unknown custom op '{name}' in {e!r}; custom ops: {', '.join(names)}." + did_you_mean(name, names)
            )
        elif name in seen and seen[name] != sign:
            problems.append(f"custom op '{name}' is both enabled and disabled")
        seen[name] = sign
    return problems


def custom_op_enabled(name: str, entries: list[str] | None = None) -> bool:
    entries = _settings.custom_ops if entries is None else entries
    if f"+{name}" in entries:
        return True
    if f"-{name}" in entries:
        return False
    return "none" not in entries


# ----------------------------------------------------------------------------------------------
# PluggableLayer: a whole layer, swapped by name at construction time.


class PluggableLayer(nn.Module):
    """A layer with an explicit ``forward`` that an out-of-tree class can replace wholesale.

    ``@PluggableLayer.register("fused_moe")`` names an in-tree class. ``@FusedMoE.register_oot``
    (or ``register_oot(name="fused_moe")``) registers a subclass that replaces it: from then on
    ``FusedMoE(...)`` constructs the replacement (``__new__`` swap), so model code never changes.
    """

    layer_name: str = ""
    _oot: dict[type, type] = {}

    @classmethod
    def register(cls, name: str) -> Callable[[type], type]:
        def deco(layer_cls: type) -> type:
            if not (isinstance(layer_cls, type) and issubclass(layer_cls, PluggableLayer)):
                raise RegistryError(f"layer '{name}': {_qualname(layer_cls)} must subclass PluggableLayer")
            LAYERS.register(name, layer_cls)
            layer_cls.layer_name = name
            return layer_cls

        return deco

    @classmethod
    def register_oot(cls, oot_cls: type | None = None, *, name: str | None = None) -> Any:
        target = LAYERS.get(name) if name is not None else cls  # an unknown name fails here, at once

        def deco(replacement: type) -> type:
            if target is PluggableLayer:
                raise RegistryError("register_oot needs a registered layer: use FusedMoE.register_oot or name=...")
            if not (isinstance(replacement, type) and issubclass(replacement, target)):
                raise RegistryError(
                    f"out-of-tree layer {_qualname(replacement)} must subclass {_qualname(target)} "
                    f"(the layer '{target.layer_name}' it replaces), so its constructor and weights stay compatible"
                )
            previous = PluggableLayer._oot.get(target)
            if previous is not None and previous is not replacement:  # (as for a name: the later one would win)
                raise RegistryError(f"layer '{target.layer_name}' is already replaced by out-of-tree "
                                    f"{_qualname(previous)}; one replacement per layer: list one of the two plugins, "
                                    f"or call {target.__name__}.unregister_oot() first")
            PluggableLayer._oot[target] = replacement
            return replacement

        return deco(oot_cls) if oot_cls is not None else deco

    @classmethod
    def unregister_oot(cls) -> None:
        PluggableLayer._oot.pop(cls, None)

    @classmethod
    def resolve(cls) -> type:
        """The class that ``cls(...)`` will construct."""
        load_plugins()
        return PluggableLayer._oot.get(cls, cls)

    def __new__(cls, *args: Any, **kwargs: Any) -> "PluggableLayer":
        return super().__new__(cls.resolve())

    @property
    def is_oot(self) -> bool:
        return not type(self).__module__.startswith("composer.")

    def implementation(self) -> str:
        """How this slot was filled, for tables and ``task=show``."""
        t = type(self)
        if self.is_oot:
            return f"{_qualname(t)} (out-of-tree)"
        return t.__name__


# ----------------------------------------------------------------------------------------------
# CustomOp: one op, one implementation per platform, chosen once at construction.


class CustomOp(nn.Module):
    """``forward_native`` is the reference; ``forward_cuda``/``forward_cpu`` default to it.

    Whether the op is enabled follows the ``custom_ops`` list active during the build; a disabled
    op always runs ``forward_native``.
    """

    op_name: str = ""

    @classmethod
    def register(cls, name: str) -> Callable[[type], type]:
        def deco(op_cls: type) -> type:
            CUSTOM_OPS.register(name, op_cls)
            op_cls.op_name = name
            return op_cls

        return deco

    def __init__(self) -> None:
        super().__init__()
        self.enabled = custom_op_enabled(self.op_name)
        self.platform = current_settings().platform
        self._forward_method = self.dispatch_forward()

    def dispatch_forward(self) -> Callable[..., Any]:
        if not self.enabled:
            return self.forward_native
        if self.platform == "cuda":
            return self.forward_cuda
        return self.forward_cpu

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_method(*args, **kwargs)

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def forward_cpu(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def implementation(self) -> str:
        chosen = getattr(self._forward_method, "__name__", "?")
        return f"{type(self).__name__}.{chosen}"


# ----------------------------------------------------------------------------------------------
# Plugins: the `composer.plugins` entry-point group, and an explicit `plugins:` list.

_PLUGINS_LOADED = False
_loaded_plugin_names: list[str] = []
_ENTRY_POINT_VALUES: set[str] = set()  # ("module" or "module:function") of the installed entry points
# what each `plugins:` entry registered when it was first loaded: (registry, name, object) and (replaced layer, its
# out-of-tree class); a config's plugins are the ones whose registrations are in place (load_plugins(modules))
_PLUGIN_REGISTERED: dict[str, tuple[list[tuple["Registry[Any]", str, Any]], dict[type, type]]] = {}


def load_plugins(modules: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Import in-tree implementations and entry-point plugins (once); with ``modules`` (a config's ``plugins:``),
    also make exactly those the active plugins.

    An entry point may name a module or a callable; a callable is called with no arguments. A ``plugins:`` entry is a
    module that registers implementations when imported, or ``module:function`` (the function is called once, after
    the import). What each entry registered is recorded; ``modules`` puts in place what the listed entries own and
    takes out the rest of what entries registered, so that in one process (a sweep's jobs, several load_config
    calls) each config runs with its own plugins. An entry owns what its import or call registered and what was
    defined in its module (a plugin imported by another plugin first). Entry points, and anything registered outside
    a plugins: entry, stay in place.
    """
    global _PLUGINS_LOADED
    if not _PLUGINS_LOADED:
        _PLUGINS_LOADED = True  # (set first: the modules imported below look names up, which calls this again)
        importlib.import_module("composer.builtin")
        from importlib.metadata import entry_points

        for ep in entry_points(group="composer.plugins"):
            if f"{ep.name} (entry point)" in _loaded_plugin_names:
                continue
            try:
                with _all_or_nothing():
                    obj = ep.load()
                    if callable(obj) and not isinstance(obj, type):
                        obj()
            except Exception as exc:  # a broken plugin must say which one it is, every time it is looked up
                _PLUGINS_LOADED = False
                raise RegistryError(f"plugin entry point '{ep.name}' ({ep.value}) failed to load: "
                                    f"{type(exc).__name__}: {exc}. Fix or uninstall that package") from exc
            _loaded_plugin_names.append(f"{ep.name} (entry point)")
            _ENTRY_POINT_VALUES.add(ep.value.replace(" ", ""))
    if modules is None:
        return list(_loaded_plugin_names)
    known = [mod for mod in modules if mod in _PLUGIN_REGISTERED]
    owned = {(id(r), n, id(o)) for m in known for r, n, o in _owned(m)[0]}
    owned_oot = {(t, c) for m in known for t, c in _owned(m)[1].items()}
    for entries, oot in _PLUGIN_REGISTERED.values():  # out first: what no listed entry owns (a listed plugin may
        for r, name, obj in entries:  # take a name an unlisted one had)
            if (id(r), name, id(obj)) not in owned and r._items.get(name) is obj:
                del r._items[name]
        for target, repl in oot.items():
            if (target, repl) not in owned_oot and PluggableLayer._oot.get(target) is repl:
                del PluggableLayer._oot[target]
    for mod in modules:  # then the listed entries not loaded yet, recorded
        if mod not in _PLUGIN_REGISTERED and mod not in _ENTRY_POINT_VALUES:  # (an entry point ran it already)
            _PLUGIN_REGISTERED[mod] = _import_plugin(mod)
            _loaded_plugin_names.append(mod)
    wanted = [mod for mod in modules if mod in _PLUGIN_REGISTERED]
    for mod in wanted:  # in: what the listed ones own (a clash between two of them is refused, naming both)
        entries, oot = _owned(mod)
        for r, name, obj in entries:
            r.register(name, obj)
        for target, repl in oot.items():
            PluggableLayer.register_oot(repl, name=target.layer_name)
    return list(_loaded_plugin_names)


def _owned(spec: str) -> tuple[list[tuple["Registry[Any]", str, Any]], dict[type, type]]:
    """What plugins: entry ``spec`` owns: what its import (or call) registered, and what any entry registered that
    was defined in its module (``spec``'s module imported first by another plugin)."""
    mod = spec.partition(":")[0]
    entries, oot = list(_PLUGIN_REGISTERED[spec][0]), dict(_PLUGIN_REGISTERED[spec][1])

    def mine(obj: Any) -> bool:
        m = getattr(obj, "__module__", None) or ""
        return m == mod or m.startswith(mod + ".")

    for other, (es, oo) in _PLUGIN_REGISTERED.items():
        if other != spec:
            entries += [e for e in es if mine(e[2]) and e not in entries]
            oot.update({t: c for t, c in oo.items() if mine(c)})
    return entries, oot


def _import_plugin(spec: str) -> tuple[list[tuple["Registry[Any]", str, Any]], dict[type, type]]:
    """Import ``module`` (or ``module:function`` and call the function) and return what it registered."""
    import sys

    mod, _, fn = spec.partition(":")
    fresh = mod not in sys.modules
    before = {(id(r), n): o for r in _REGISTRIES for n, o in r._items.items()}
    oot_before = dict(PluggableLayer._oot)
    try:
        with _all_or_nothing():
            module = importlib.import_module(mod)
            if fn:
                func = getattr(module, fn, None)
                if not callable(func):
                    raise RegistryError(f"plugins: '{spec}': module {mod} has no function {fn}; write "
                                        "'module' or 'module:function'")
                func()
    except RegistryError:
        raise
    except ImportError as exc:
        raise RegistryError(
            f"plugins: cannot import '{mod}': {exc}. Install the plugin package, or remove it from `plugins:`"
        ) from exc
    except Exception as exc:  # its own code failed: what it registered before that is undone
        raise RegistryError(f"plugins: importing '{spec}' failed: {type(exc).__name__}: {exc}. Fix the "
                            "module, or remove it from `plugins:`") from exc
    entries = [(r, n, o) for r in _REGISTRIES for n, o in r._items.items() if before.get((id(r), n)) is not o]
    oot = {t: c for t, c in PluggableLayer._oot.items() if oot_before.get(t) is not c}
    if not entries and not oot and fresh and not fn and callable(getattr(module, "register", None)):
        # (a plugin may only add tile configs, say; but a module whose register() an entry point would call
        # registers nothing when merely imported)
        log.warning("plugins: '%s' registered no implementation when imported; it has a register() function, "
                    "which an installed entry point calls: list it as '%s:register' to call it here", spec, mod)
    return entries, oot


@contextlib.contextmanager
def _all_or_nothing() -> Iterator[None]:
    """Undo every registration made inside if it raises, so that a plugin failing halfway through its import
    leaves no half of itself behind (a retry would otherwise find its names taken)."""
    saved = [(r, dict(r._items)) for r in _REGISTRIES]
    oot = dict(PluggableLayer._oot)
    try:
        yield
    except BaseException:
        for r, items in saved:
            r._items.clear()
            r._items.update(items)
        PluggableLayer._oot.clear()
        PluggableLayer._oot.update(oot)
        raise


def default_platform() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
