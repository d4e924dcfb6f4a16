"""Registers and spills of every tile config in the shipped tables, compiled for an H100 (sm_90) on this machine.

No GPU needed: each entry's experts call is run with its kernel launches recorded (not executed), and every GEMM /
GEMV launch is compiled for sm_90 with its real arguments (composer/kernels/triton/cross_compile.py); ``ptxas``
reports registers per thread and spilled bytes. A config that spills is a candidate for retuning (a spill is not an
error: it may still be the fastest tile measured). The registers come from the installed Triton, which may differ
from the GPU machine's.

Usage (repo root): ``python3 scripts/table_registers.py [--dir DIR] [--only-spills]``
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer.kernels.triton.configs import PACKAGE_DIR, validate_entry  # noqa: E402
from composer.kernels.triton.cross_compile import compile_sm90, recorded_launches, registers  # noqa: E402
from composer.kernels.triton.fused import fused_experts, fused_experts_quant  # noqa: E402
from composer.kernels.triton.tune import QUANT_TUNE_METHODS  # noqa: E402
from composer.tasks.bench import Shape, make_weights, quantize_weights  # noqa: E402

GEMMS = ("_gemv_kernel", "_gemm1_kernel", "_gemm2_kernel")
EXPERTS = 2  # the experts' count changes no compiled kernel (only stride values, whose alignment stays)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(PACKAGE_DIR), help="folder of tile config files (default: the shipped ones)")
    ap.add_argument("--only-spills", action="store_true", help="print only the entries that spill")
    args = ap.parse_args()
    params = dict(QUANT_TUNE_METHODS)
    spilled = 0
    for path in sorted(glob.glob(os.path.join(args.dir, "E=*.json"))):
        m = re.match(r"E=(\d+),N=(\d+),K=(\d+),device_name=(.+),dtype=(.+)\.json", os.path.basename(path))
        if not m:
            continue
        _, I, H, device, dtype = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
        method = None if dtype in ("bfloat16", "float16", "float32") else dtype
        model_dtype = getattr(torch, dtype) if method is None else torch.bfloat16
        shape = Shape("table", EXPERTS, 2, H, I, model_dtype)
        w = make_weights(shape, torch.device("cpu"), torch.Generator().manual_seed(0))
        if method is not None:
            shape.quant, shape.quant_params = method, params.get(method, {})
            w = quantize_weights(shape, w)
        print(f"# {os.path.basename(path)}")
        for key, entry in json.load(open(path)).items():
            if key.startswith("_"):
                continue
            T = int(key)
            cfg = validate_entry({k: v for k, v in entry.items() if not k.startswith("_")}, f"{path} [T={T}]")
            x = torch.randn(T, H).to(model_dtype)
            tw, ids = torch.rand(T, 2), torch.arange(2 * T, dtype=torch.int32).view(T, 2) % EXPERTS
            with recorded_launches() as calls:
                if method is None:
                    fused_experts(x, tw, ids, w.w13, w.w2, config=cfg)
                else:
                    ex = w.extra or {}
                    fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", method, w.w13_scale, w.w2_scale,
                                        w.a13_scale, w.a2_scale, w.w13_zero, w.w2_zero,
                                        ex.get("granularity", "per_token_channel"),
                                        *ex.get("block_shape", (128, 128)), config=cfg)
            cells = []
            spills = False
            for n, (kernel, a, kw) in enumerate(c for c in calls if c[0].__name__ in GEMMS):
                regs, spill = registers(compile_sm90(kernel, a, kw))
                spills |= spill > 0
                cells.append(f"{'gemm1' if n == 0 else 'gemm2'} {regs} regs" + (f", {spill} B spilled" if spill else ""))
            spilled += spills
            if spills or not args.only_spills:
                print(f"T={T:<5} {'; '.join(cells)}" + ("   <- spills" if spills else ""), flush=True)
    print(f"# {spilled} entries spill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
