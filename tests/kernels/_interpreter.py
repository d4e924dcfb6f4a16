"""Switch the Triton interpreter on (or off) for the kernels launched inside; kernels are jitted lazily
per mode, so this works however triton was imported earlier in the session."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def interpreter(on: bool = True):
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
