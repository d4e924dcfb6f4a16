"""Lazy ``triton.jit``: kernels are compiled (or interpreted) according to TRITON_INTERPRET at first use.

``triton.jit`` decides at decoration time whether a function runs in the interpreter. Decorating at
import would freeze that choice, so a test that sets ``TRITON_INTERPRET=1`` after something imported
this package would still get compiled kernels. Here each kernel is decorated on its first launch, once
per interpreter setting.

Device helpers shared by several kernels are marked ``@lazy_helper``. When a kernel is jitted, the helpers it
names (and the helpers they name) are bound for that mode: ``triton.jit`` functions for compiled kernels, the
plain Python functions for the interpreter (which runs kernel code as Python and refuses to call a jitted
function). The kernel is rebuilt over a copy of its module's globals with those bindings, so the module itself
keeps the markers.
"""
from __future__ import annotations

import os
import types
from typing import Any, Callable


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. (``triton.cdiv`` is a constexpr function in recent Triton: about 10 µs a call, at
    about a dozen calls per experts call, a third of the launch path's Python on the host.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host (as ``triton.next_power_of_2``, without its cost)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class LazyHelper:
    """A ``@triton.jit`` device function bound per interpreter mode by the kernels that call it."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = fn.__name__
        self._bound: dict[bool, Any] = {}

    def bound(self, mode: bool) -> Any:
        b = self._bound.get(mode)
        if b is None:
            fn = _with_helpers(self.fn, mode)
            if mode:
                b = fn
            else:
                import triton

                b = triton.jit(fn)
            self._bound[mode] = b
        return b

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.__name__} is a device helper: call it from a kernel decorated with @lazy_jit")


def _with_helpers(fn: Callable[..., Any], mode: bool) -> Callable[..., Any]:
    """``fn`` over globals in which every LazyHelper it names is bound for ``mode`` (``fn`` itself if none)."""
    names = [n for n in fn.__code__.co_names if isinstance(fn.__globals__.get(n), LazyHelper)]
    if not names:
        return fn
    g = dict(fn.__globals__)
    g.update({n: fn.__globals__[n].bound(mode) for n in names})
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    new.__annotations__ = fn.__annotations__  # (inspect.getsource reads the code object: the same source)
    return new


class LazyKernel:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = fn.__name__
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        mode = interpreting()
        k = self._jitted.get(mode)
        if k is None:
            import triton

            k = self._jitted[mode] = triton.jit(_with_helpers(self.fn, mode))
        return k

    def __getitem__(self, grid: Any) -> Any:
        return self.jitted()[grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    return LazyKernel(fn)


def lazy_helper(fn: Callable[..., Any]) -> LazyHelper:
    return LazyHelper(fn)
