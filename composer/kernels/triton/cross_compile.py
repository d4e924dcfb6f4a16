"""Compile composer's Triton kernels for an H100 (sm_90) on a machine without a GPU (tests and scripts only).

The interpreter runs kernel code as Python, so it misses what only the compiler checks: a name given two types
across an ``if`` (Triton keeps one type per name), a constexpr where a tensor is needed, a layout the backend
cannot lower. Triton's front end, LLVM and the ``ptxas`` bundled with the wheel need no GPU: ``recorded_launches``
catches the launches a wrapper makes (without running them) and ``compile_sm90`` compiles each one for sm_90 with
its real arguments, constexprs and launch options, specialized as a launch would be (16-byte aligned
pointers and ints divisible by 16 marked so, ints equal to 1 made constants); ``registers`` reads the registers
and spill bytes ``ptxas`` reports for the result (``scripts/table_registers.py`` lists them for every shipped
tile config).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
import tempfile
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget

from ._jit import LazyKernel

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                  torch.float8_e4m3fn: "fp8e4nv", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


@contextlib.contextmanager
def _compiled_mode() -> Iterator[None]:
    """TRITON_INTERPRET off inside (the lazily jitted kernels then bind their compiled form)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[tuple[LazyKernel, tuple, dict]]]:
    """Inside, every ``kernel[grid](*args, **kwargs)`` of a composer kernel is recorded, not run (outputs stay
    uninitialized); the compiled (not interpreted) kernels are the ones recorded."""
    calls: list[tuple[LazyKernel, tuple, dict]] = []
    real = LazyKernel.__getitem__

    def record(self: LazyKernel, grid: Any):
        return lambda *args, **kwargs: calls.append((self, args, kwargs))

    LazyKernel.__getitem__ = record
    try:
        with _compiled_mode():
            yield calls
    finally:
        LazyKernel.__getitem__ = real


def compile_sm90(kernel: LazyKernel, args: tuple, kwargs: dict) -> Any:
    """Triton's CompiledKernel for sm_90 (its ``asm`` holds ttir / ttgir / llir / ptx / cubin)."""
    with _compiled_mode():
        fn = kernel.jitted()
    params = list(inspect.signature(fn.fn).parameters)
    const = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    sig: dict[str, str] = {}
    aligned = []  # what a launch specializes on: pointers and ints divisible by 16 (ints equal to 1 become constexprs)
    for name, value in zip(params, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int) and value == 1:
            sig[name], const[name] = "constexpr", 1
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif type(value).__name__ == "TensorDescriptor":  # a host TMA descriptor (triton.tools.tensor_descriptor)
            shape = ", ".join(str(b) for b in value.block_shape)
            sig[name] = f"tensordesc<{_TRITON_DTYPES[value.base.dtype]}[{shape}]>"
        elif value is None:  # (an unused descriptor or pointer: Triton makes None a constexpr)
            sig[name], const[name] = "constexpr", None
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} = {value!r} has no Triton type here")
    for name in params[len(args):]:
        if name not in const:
            raise TypeError(f"{kernel.__name__}: parameter {name} was not passed")
        sig[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={(params.index(k),): v for k, v in const.items()},
                                    attrs={(params.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={k: kwargs[k] for k in _OPTIONS if k in kwargs})


def registers(compiled: Any) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of a ``compile_sm90`` result, as ``ptxas -v`` reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", ptx, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return int(regs.group(1)) if regs else 0, int(spills.group(1)) if spills else 0
