"""Lazy ``triton.jit``: kernels are compiled (or interpreted) according to TRITON_INTERPRET at first use.

``triton.jit`` decides at decoration time whether a function runs in the interpreter. Decorating at
import would freeze that choice, so a test that sets ``TRITON_INTERPRET=1`` after something imported
this package would still get compiled kernels. Here each kernel is decorated on its first launch, once
per interpreter setting.
"""
from __future__ import annotations

import os
from typing import Any, Callable


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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

            k = self._jitted[mode] = triton.jit(self.fn)
        return k

    def __getitem__(self, grid: Any) -> Any:
        return self.jitted()[grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    return LazyKernel(fn)
