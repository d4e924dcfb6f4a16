"""How fast can one kernel stream a weight matrix with a given tile shape? (GPU; an experiment, not a test.)

The int4 decode GEMVs stream their weights at about 1.7 TB/s where the bf16 decode reaches 2.9
(docs/performance.md). This kernel does nothing but read: each program owns ``rows`` consecutive rows of an
int32 matrix and walks along them ``words`` int32 at a time (a ``[rows, words]`` tile per step, pipelined
``stages`` deep the way the GEMV's ``loop_stages`` is), adding the words up. Varying the tile, the row stride
and the order of the K steps (``rot``: program p starts at tile ``p * rot``) separates what the memory system
gives a tile shape from what the GEMV's arithmetic costs.

    python3 scripts/stream_probe.py            # mixtral's int4 gemm1: 57344 rows of 2048 bytes

``read_alone_us`` times the weights of one experts call read this way, one launch per GEMM with its fastest tile
(``decode_probe.py --read-floor``): what two launches cost before they compute anything.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _stream(w_ptr, out_ptr, n_words, stride_row, ROWS: tl.constexpr, WORDS: tl.constexpr, ROT: tl.constexpr,
            STAGES: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    ptrs = w_ptr + r[:, None].to(tl.int64) * stride_row + tl.arange(0, WORDS)[None, :]
    n_t = n_words // WORDS
    rot = (pid * ROT) % n_t
    acc = tl.full((ROWS, WORDS), 0, tl.int32)
    for it in tl.range(0, n_t, num_stages=STAGES):
        if ROT != 0:
            kk = (it + rot) % n_t
        else:
            kk = it
        acc += tl.load(ptrs + kk * WORDS)
    # (tl.reduce and tl.full, not tl.sum and tl.zeros: jit helpers, which the CPU test could not interpret)
    tl.store(out_ptr + r, tl.reduce(acc, 1, tl.standard._sum_combine))


# (rows per program, int32 words per step) tried by read_alone_us: the GEMVs' tile shapes and a few longer rows
READ_TILES = ((64, 16), (32, 32), (16, 64), (64, 32), (32, 64), (8, 128), (16, 128), (8, 256), (4, 512))


def fitting_tiles(rows: int, row_bytes: int, tiles=READ_TILES) -> list[tuple[int, int]]:
    """The tiles that cover a ``rows x row_bytes`` matrix exactly (the kernel skips a partial tile or row group, which
    would leave bytes unread and the time too short)."""
    if row_bytes % 4:
        raise ValueError(f"rows of {row_bytes} bytes: the read-only kernel reads int32 words, so a row must be a "
                         f"multiple of 4 bytes")
    words = row_bytes // 4
    fit = [(r, w) for r, w in tiles if rows % r == 0 and words % w == 0]
    if not fit:
        raise ValueError(f"no tile of {list(tiles)} (rows per program, words per step) divides {rows} rows x "
                         f"{words} words")
    return fit


def read_alone_us(matrices: list[tuple[int, int]], device: torch.device, time_call: Callable[[Callable], float],
                  tiles=READ_TILES, stages: int = 3, warps: int = 4) -> tuple[float, list[tuple[float, tuple[int, int]]]]:
    """(µs per call, [(µs, tile) per launch]) of reading ``matrices`` (``(rows, row_bytes)`` each, one launch each, in
    order) and nothing else. Each launch gets the fastest of its ``fitting_tiles``, timed alone; then the launches
    are timed together as one call. ``time_call(fn)`` times a call of ``fn`` (decode_probe: as task=bench does).
    Every launch's row sums are checked after the timing, so a time never covers fewer bytes than asked."""
    bufs = [torch.randint(-2**31, 2**31 - 1, (rows, row_bytes // 4), dtype=torch.int32, device=device)
            for rows, row_bytes in matrices]
    outs = [torch.empty(b.shape[0], dtype=torch.int32, device=device) for b in bufs]

    def launch(i: int, tile: tuple[int, int]) -> None:
        b = bufs[i]
        _stream[(b.shape[0] // tile[0],)](b, outs[i], b.shape[1], b.stride(0), ROWS=tile[0], WORDS=tile[1], ROT=0,
                                          STAGES=stages, num_warps=warps)

    per_launch = []
    for i, (rows, row_bytes) in enumerate(matrices):
        timed = [(time_call(lambda t=t: launch(i, t)), t) for t in fitting_tiles(rows, row_bytes, tiles)]
        per_launch.append(min(timed, key=lambda r: r[0]))

    def call() -> None:
        for i, (_, tile) in enumerate(per_launch):
            launch(i, tile)

    us = time_call(call)
    for i, (b, o) in enumerate(zip(bufs, outs)):  # (int32 sums wrap in the kernel as they do after the cast here)
        if not torch.equal(o, b.sum(1).to(torch.int32)):
            raise RuntimeError(f"read_alone_us: launch {i} with tile {per_launch[i][1]} did not read every word")
    return us, per_launch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=57344, help="rows of the matrix (mixtral gemm1: 2 x 28672)")
    ap.add_argument("--only", default="", help="rows x words cases to run, e.g. 64x16,8x128 (default: all)")
    ap.add_argument("--row-bytes", type=int, default=2048, help="bytes of one row (int4 K = 4096: 2048)")
    ap.add_argument("--regions", type=int, default=4, help="copies of the matrix, read in turn (L2 stays cold)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    words = args.row_bytes // 4
    cases = []  # (rows per program, words per step, rot, stages, warps, padded stride)
    for rows, w in ((64, 16), (32, 32), (16, 64), (8, 128), (64, 32), (32, 64), (16, 128), (32, 128), (8, 256),
                    (16, 256), (4, 512)):
        for stages in (3, 4):
            cases.append((rows, w, 0, stages, 4, 0))
    cases += [(64, 16, 7, 3, 4, 0), (64, 16, 0, 3, 8, 0), (32, 128, 0, 3, 8, 0), (64, 16, 0, 3, 4, 32),
              (64, 16, 0, 3, 2, 0), (64, 32, 0, 3, 2, 0), (32, 32, 0, 3, 2, 0), (128, 32, 0, 3, 4, 0)]
    print(f"{torch.cuda.get_device_name()}  {args.rows} rows x {args.row_bytes} B = "
          f"{args.rows * args.row_bytes / 1e6:.1f} MB per read")
    for pad in sorted({c[5] for c in cases}):
        stride = words + pad
        buf = torch.randint(-2**31, 2**31 - 1, (args.regions, args.rows, stride), dtype=torch.int32, device=dev)
        out = torch.empty(args.rows, dtype=torch.int32, device=dev)
        for rows, w, rot, stages, warps, p in cases:
            if p != pad or args.only and f"{rows}x{w}" not in args.only.split(","):
                continue
            grid = (args.rows // rows,)
            state = {"i": 0}

            def run() -> None:
                state["i"] = (state["i"] + 1) % args.regions
                _stream[grid](buf[state["i"]], out, words, stride, ROWS=rows, WORDS=w, ROT=rot, STAGES=stages,
                              num_warps=warps)

            graph = torch.cuda.CUDAGraph()  # back-to-back launches: no host launch gap inside the timing
            run()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for _ in range(2 * args.regions):
                    run()
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(15):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / (2 * args.regions))
            us = sorted(times)[len(times) // 2]
            tbs = args.rows * args.row_bytes / us / 1e6
            print(f"rows {rows:4d}  bytes/row/step {4 * w:4d}  rot {rot}  stages {stages}  warps {warps}  "
                  f"stride pad {4 * pad:4d} B  programs {grid[0]:6d}: {us:7.1f} us  {tbs:5.2f} TB/s")
        del buf
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
