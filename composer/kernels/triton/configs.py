"""Tile configs: tuned JSON files per (device, E, N=I, K=H, dtype), with a heuristic fallback.

A file is named ``E={E},N={I},K={H},device_name={device},dtype={dtype}.json`` (device as
``torch.cuda.get_device_name()`` with spaces replaced by ``_``) and maps a token count ``T`` to::

    {"BLOCK_M": 64, "decode": false, "reduce": "atomic",
     "gemm1": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4, "tma": false},
     "gemm2": {...}}

``decode``: false (expert-sorted blocks), true (one pair per program, tl.dot), or ``"gemv"`` (one pair per
program, FMA GEMVs in registers, ``gemv.py``; there ``BLOCK_N`` may be as small as 4 and both GEMMs take
``SPLIT_K``, the number of programs that share one tile's K range (GEMM1's then leave fp32 partial sums that GEMM2
activates as it loads them); ``mma: true`` runs the GEMV's products on
tensor cores with the weights as the MMA's A operand (at least 16 rows: gemm1 BLOCK_N >= 8, gemm2 BLOCK_N >= 16, and
BLOCK_K >= 32); ``int4_read``: how the GEMV unpacks int4, one of
``"words"``, ``"planes"``, ``"subnormal"``, ``"chain"``, ``"bytes"``, ``"words_4d"``, gemv.py; ``reduce_once: true``
(float, int8 and fp8 GEMVs without mma): products summed per 8 K columns in registers, reduced across threads once
after the K loop; ``x_vec: true`` (with the planes or
subnormal read): a word column's eight activations come in one 16-byte load, split in registers, instead of eight
2-byte loads (faster for some tiles, slower for others: measured per entry); ``unroll``: K-loop iterations
the GEMV unrolls, so one warp has several weight loads in flight; ``loop_stages``: software-pipeline stages of that
loop, ``tl.range(num_stages=...)``, which pipelines every load of the loop through shared memory, where the kernel's
``num_stages`` only pipelines ``tl.dot`` operands; ``prefetch``: 0-2, with the planes or subnormal read, K tiles
loaded into registers that many steps ahead of the one being multiplied). ``fp8_promote`` (fp8 per-tensor / per-channel): K tiles
accumulated in the tensor core between additions to the fp32 accumulator (default ``gemm.FP8_PROMOTE_TILES``).
``pdl: true`` (decode ``"gemv"``): GEMM2's launch is a programmatic dependent of GEMM1's (Hopper and later; ignored
before sm_90 and under the interpreter): its programs start while GEMM1 runs, ask L2 for their weight slices and
wait for GEMM1's results (gemv.py).

For a run with T tokens the entry with the nearest key is used (as vLLM does), except that a T = 1 entry with
``decode`` set serves T = 1 only (T = 2 takes the nearest other key, or the heuristic): one pair per program
re-reads an expert's weights for each of its pairs, so a table says where that still pays with a ``decode``
entry at that T (the H200's int4 GEMVs up to T = 8-64, where the expert-sorted int4 ``tl.dot`` is bound by its
dequantize).
Folders searched, first
match wins: ``$COMPOSER_KERNEL_CONFIGS`` (a folder, or several joined by ``:``), folders added with
``add_config_dir`` (Python API), then the files shipped in ``composer/kernels/configs``.

A GPU with no file of its own name takes a file tuned on another GPU of the same compute capability (the file's
``"_capability"`` key, e.g. ``"9.0"``, which ``task=tune`` writes): the same shared memory, registers and
instructions, so every tile is valid, and on an H200 an H100's tiles start far closer than the heuristic. The
config's ``source`` names the file (``task=bench`` prints it under its table); tune your own GPU to do better.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from ...errors import ConfigError, Problem, TileConfigError, did_you_mean

ENV_VAR = "COMPOSER_KERNEL_CONFIGS"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "configs"
_extra_dirs: list[Path] = []

# an entry's own keys ("source" is where get_config found it)
ENTRY_KEYS = ("BLOCK_M", "decode", "reduce", "gemm1", "gemm2", "pdl", "source")
GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "tma", "SPLIT_K", "mma", "fp8_promote",
             "int4_read", "x_vec", "unroll", "loop_stages", "prefetch", "swap", "reduce_once")
# gemv.INT4_READS: their codes in this order
INT4_READ_NAMES = ("bytes", "words_4d", "words", "planes", "subnormal", "chain")


def add_config_dir(path: str | os.PathLike) -> None:
    p = Path(path)
    if p not in _extra_dirs:
        _extra_dirs.append(p)
        clear_cache()


def config_dirs() -> list[Path]:
    return list(_config_dirs(os.environ.get(ENV_VAR, ""), tuple(_extra_dirs)))


@functools.lru_cache(maxsize=64)
def _config_dirs(env: str, extra: tuple[Path, ...]) -> tuple[Path, ...]:
    dirs = tuple(Path(d) for d in env.split(os.pathsep) if d)
    for d in dirs:  # (a file or a typo was passed over silently: the shipped tables ran instead of the user's)
        if not d.is_dir():
            hint = (f"point it at the folder that holds it ({d.parent})" if d.is_file() else
                    "create it (composer task=tune task.output_dir=... writes one) or fix the path")
            raise ConfigError([Problem(ENV_VAR, str(d), f"{'is a file' if d.is_file() else 'does not exist'}; it "
                                       f"names folders of tile-config files: {hint}")], "the environment")
    return dirs + extra + (PACKAGE_DIR,)


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _cuda_index(device: Any) -> int | None:
    """The CUDA device index ``device`` names (None: the current one), or None off CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    d = device if isinstance(device, torch.device) else torch.device(device)
    if d.type != "cuda":
        return None
    return d.index if d.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int, get_name: Any, get_capability: Any) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``index``, read once (about 10 µs a call on the host otherwise, per
    experts call); keyed by the torch functions too, so a test that swaps them in is not answered from the cache."""
    return get_name(index).replace(" ", "_"), "{}.{}".format(*get_capability(index))


def device_name(device: Any = None) -> str:
    import torch

    index = _cuda_index(device)
    return "cpu" if index is None else _cuda_props(index, torch.cuda.get_device_name,
                                                   torch.cuda.get_device_capability)[0]


def device_capability(device: Any = None) -> str | None:
    """``"major.minor"`` of a CUDA device (the ``_capability`` of the tables tuned on it); None off CUDA."""
    import torch

    index = _cuda_index(device)
    return None if index is None else _cuda_props(index, torch.cuda.get_device_name,
                                                  torch.cuda.get_device_capability)[1]


def config_file_name(E: int, N: int, K: int, device: str, dtype: str) -> str:
    return f"E={E},N={N},K={K},device_name={device},dtype={dtype}.json"


def validate_entry(entry: dict[str, Any], where: str = "config") -> dict[str, Any]:
    problems = []
    bm = entry.get("BLOCK_M")
    if not isinstance(bm, int) or bm < 16 or bm & (bm - 1):
        problems.append(f"BLOCK_M must be a power of two >= 16, got {bm!r}")
    decode = entry.get("decode", False)
    if decode not in (True, False, "gemv"):
        problems.append(f"decode must be true, false or \"gemv\", got {decode!r}")
    gemv = decode == "gemv"
    for g in ("gemm1", "gemm2"):
        sub = entry.get(g)
        if not isinstance(sub, dict):
            problems.append(f"{g} must be an object with {', '.join(GEMM_KEYS)}")
            continue
        for key in ("BLOCK_N", "BLOCK_K"):
            v = sub.get(key)
            least = 4 if gemv and key == "BLOCK_N" else 16
            if not isinstance(v, int) or v < least or v & (v - 1):
                problems.append(f"{g}.{key} must be a power of two >= {least}, got {v!r}")
        gm = sub.get("GROUP_M", 1)
        if not isinstance(gm, int) or isinstance(gm, bool) or gm < 1:
            problems.append(f"{g}.GROUP_M must be an integer >= 1 (row blocks grouped per weight tile), got {gm!r}")
        warps = sub.get("num_warps", 4)
        if not isinstance(warps, int) or isinstance(warps, bool) or warps not in (1, 2, 4, 8, 16, 32):
            problems.append(f"{g}.num_warps must be 1, 2, 4, 8, 16 or 32, got {warps!r}")
        st = sub.get("num_stages", 2)
        if not isinstance(st, int) or isinstance(st, bool) or st < 1:
            problems.append(f"{g}.num_stages must be an integer >= 1, got {st!r}")
        promote = sub.get("fp8_promote", 1)
        if not isinstance(promote, int) or isinstance(promote, bool) or promote < 1:
            problems.append(f"{g}.fp8_promote must be an integer >= 1 (K tiles per fp32 promotion), got {promote!r}")
        split = sub.get("SPLIT_K", 1)
        if not isinstance(split, int) or isinstance(split, bool) or split < 1 or (split > 1 and not gemv):
            problems.append(f"{g}.SPLIT_K must be an integer >= 1, and > 1 only with decode 'gemv'; got {split!r}")
        for key in ("tma", "mma", "swap", "reduce_once"):
            if not isinstance(sub.get(key, False), bool):
                problems.append(f"{g}.{key} must be true or false, got {sub.get(key)!r}")
        if sub.get("mma") and not gemv:
            problems.append(f"{g}.mma applies to decode \"gemv\" tiles only")
        elif sub.get("mma") and isinstance(sub.get("BLOCK_N"), int) and isinstance(sub.get("BLOCK_K"), int) and (
                sub["BLOCK_N"] * (2 if g == "gemm1" else 1) < 16 or sub["BLOCK_K"] < 32):
            problems.append(f"{g}.mma needs at least 16 rows on the tensor core (gemm1: BLOCK_N >= 8, its gate and up "
                            f"rows; gemm2: BLOCK_N >= 16) and BLOCK_K >= 32; got BLOCK_N={sub['BLOCK_N']}, "
                            f"BLOCK_K={sub['BLOCK_K']}")
        if sub.get("reduce_once") and (not gemv or sub.get("mma") or "int4_read" in sub):
            problems.append(f"{g}.reduce_once applies to decode \"gemv\" tiles without mma or int4_read (the FMA GEMV "
                            f"of float, int8 and fp8 weights; the int4 reads sum their own way)")
        if sub.get("int4_read") == "chain" and isinstance(sub.get("BLOCK_K"), int) and sub["BLOCK_K"] % 32:
            problems.append(f"{g}.int4_read \"chain\" needs BLOCK_K a multiple of 32 (a thread reads 32 elements of "
                            f"K), got BLOCK_K={sub.get('BLOCK_K')!r}")
        if "swap" in sub and gemv:
            problems.append(f"{g}.swap (int8_w8a16's W x A^T product, gemm.SWAP_AB) applies to tl.dot tiles, not to "
                            f"decode \"gemv\" ones")
        unroll = sub.get("unroll", 1)
        if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1 or (unroll > 1 and not gemv):
            problems.append(f"{g}.unroll must be an integer >= 1 (K-loop iterations unrolled), > 1 only in a decode "
                            f"\"gemv\" tile; got {unroll!r}")
        stages = sub.get("loop_stages", 1)
        if (not isinstance(stages, int) or isinstance(stages, bool) or stages < 1
                or ("loop_stages" in sub and not gemv)):
            problems.append(f"{g}.loop_stages must be an integer >= 1 (software-pipeline stages of the GEMV's K loop), "
                            f"in a decode \"gemv\" tile only; got {stages!r}")
        if "int4_read" in sub and (not gemv or sub["int4_read"] not in INT4_READ_NAMES):
            problems.append(f"{g}.int4_read must be one of {', '.join(INT4_READ_NAMES)} in a decode \"gemv\" tile, "
                            f"got {sub['int4_read']!r}" + ("" if gemv else " with decode " + repr(decode)))
        if not isinstance(sub.get("x_vec", False), bool) or sub.get("x_vec") and (
                not gemv or sub.get("int4_read") not in ("planes", "subnormal")):
            problems.append(f"{g}.x_vec must be true or false, and true only in a decode \"gemv\" tile with int4_read "
                            f"\"planes\" or \"subnormal\" (the reads it feeds); got {sub.get('x_vec')!r} with "
                            f"int4_read {sub.get('int4_read')!r}")
        ahead = sub.get("prefetch", 0)
        if (not isinstance(ahead, int) or isinstance(ahead, bool) or not 0 <= ahead <= 2
                or ahead and (not gemv or sub.get("int4_read") not in ("planes", "subnormal"))):
            problems.append(f"{g}.prefetch must be 0, 1 or 2 (K tiles loaded into registers ahead of the one being "
                            f"multiplied), > 0 only in a decode \"gemv\" tile with int4_read \"planes\" or "
                            f"\"subnormal\"; got {ahead!r} with int4_read {sub.get('int4_read')!r}")
        unknown = set(sub) - set(GEMM_KEYS)
        if unknown:
            problems.append(f"{g}: unknown keys {sorted(unknown)}; allowed: {', '.join(GEMM_KEYS)}")
    if not isinstance(entry.get("pdl", False), bool) or entry.get("pdl") and not gemv:
        problems.append(f"pdl must be true or false, and true only with decode \"gemv\" (GEMM2's GEMV launched as a "
                        f"programmatic dependent of GEMM1's); got {entry.get('pdl')!r} with decode {decode!r}")
    unknown = {k for k in entry if not str(k).startswith("_")} - set(ENTRY_KEYS)
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}; allowed: {', '.join(ENTRY_KEYS)} (and notes starting with _)"
                        + did_you_mean(sorted(unknown)[0], ENTRY_KEYS))
    if entry.get("reduce", "atomic") not in ("atomic", "buffer"):
        problems.append(f"reduce must be 'atomic' or 'buffer', got {entry.get('reduce')!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return entry


def _capability_of(raw: dict[str, Any], f: Path) -> str | None:
    """A file's ``_capability`` ("major.minor", as ``device_capability`` gives it), refused if it is anything else:
    a mistyped one would silently keep the file from the GPUs it was meant for."""
    cap = raw.get("_capability")
    if cap is not None and not (isinstance(cap, str) and re.fullmatch(r"\d+\.\d+", cap)):
        raise TileConfigError(f, f"_capability must be a string \"major.minor\" such as \"9.0\" (the compute "
                                 f"capability of the GPU it was tuned on), got {cap!r}")
    return cap


def _read_json(f: Path) -> dict[str, Any]:
    """A tile-config file's JSON object; anything else is a TileConfigError naming the file."""
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # (json's errors are ValueErrors)
        raise TileConfigError(f, f"cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TileConfigError(f, f"must be a JSON object of token counts to entries ({{\"1\": {{...}}, \"16\": "
                                 f"{{...}}}}), got a {type(raw).__name__}")
    return raw


@functools.lru_cache(maxsize=None)
def _load_file(name: str, dirs: tuple[Path, ...]) -> tuple[str, dict[int, dict[str, Any]]] | None:
    for d in dirs:
        f = d / name
        if f.is_file():
            raw = _read_json(f)
            _capability_of(raw, f)
            table = {}
            for k, v in raw.items():
                if k.startswith("_"):  # (notes: _note, _capability)
                    continue
                if not k.isdigit():
                    raise TileConfigError(f, f"key {k!r} must be a token count such as \"16\" (notes start with _)")
                if not isinstance(v, dict):
                    raise TileConfigError(f, f"[T={k}] must be an object with BLOCK_M, gemm1, gemm2, ..., got {v!r}")
                try:
                    table[int(k)] = validate_entry(v, f"[T={k}]")
                except ValueError as exc:
                    raise TileConfigError(f, str(exc)) from None
            return str(f), table
    return None


@functools.lru_cache(maxsize=None)
def _same_capability_file(E: int, N: int, K: int, dtype: str, capability: str,
                          dirs: tuple[Path, ...]) -> tuple[str, dict[int, dict[str, Any]]] | None:
    """The first file (folder order, then name) for this shape and dtype whose ``_capability`` is ours."""
    pattern = config_file_name(E, N, K, "*", dtype)
    for d in dirs:
        for f in sorted(d.glob(pattern)) if d.is_dir() else ():
            if _capability_of(_read_json(f), f) == capability:
                return _load_file(f.name, (d,))
    return None


def _find_table(E: int, N: int, K: int, device: str, dtype: str, capability: str | None,
                dirs: tuple[Path, ...]) -> tuple[str, dict[int, dict[str, Any]]] | None:
    found = _load_file(config_file_name(E, N, K, device, dtype), dirs)
    if found is None and capability is not None:
        found = _same_capability_file(E, N, K, dtype, capability, dirs)
    return found


def tuned_table(E: int, N: int, K: int, device: str, dtype: str,
                capability: str | None = None) -> tuple[str, dict[int, dict[str, Any]]] | None:
    """The file tuned on ``device``, else (given ``capability``) one tuned on a GPU of that capability."""
    return _find_table(E, N, K, device, dtype, capability, tuple(config_dirs()))


def heuristic_config(T: int, E: int, N: int, K: int, top_k: int) -> dict[str, Any]:
    """A sound default from the average number of rows per expert (the M of each expert's GEMM)."""
    pairs = T * top_k
    per_expert = pairs / max(1, min(E, pairs) if pairs else 1)
    if T <= 1:
        # Decode: memory bound, one pair per program; narrow N tiles to spread the weights over the SMs.
        g = {"BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 16, "decode": True, "reduce": "atomic", "gemm1": dict(g), "gemm2": dict(g)}
    if per_expert <= 16:
        g = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 16, "decode": False, "reduce": "atomic", "gemm1": dict(g), "gemm2": dict(g)}
    if per_expert <= 64:
        g = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_M": 32, "decode": False, "reduce": "atomic", "gemm1": dict(g), "gemm2": dict(g)}
    if per_expert <= 256:
        g1 = {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
        g2 = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 64, "decode": False, "reduce": "atomic", "gemm1": g1, "gemm2": g2}
    g1 = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    g2 = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    return {"BLOCK_M": 128, "decode": False, "reduce": "atomic", "gemm1": g1, "gemm2": g2}


def nearest_entry(table: dict[int, dict[str, Any]], T: int) -> tuple[int, dict[str, Any]] | None:
    """(key, entry) a run with T tokens takes from a table: the nearest key (as vLLM), except that a T = 1 entry with
    ``decode`` set serves T = 1 only (its tiles were measured for one pair per program, not for expert-sorted
    blocks); None for an empty table."""
    if T > 1:
        table = {m: e for m, e in table.items() if m > 1 or not e.get("decode", False)}
    if not table:
        return None
    key = min(table, key=lambda m: abs(m - T))
    return key, table[key]


def get_config(T: int, E: int, N: int, K: int, top_k: int, dtype: Any, device: Any = None) -> dict[str, Any]:
    """The tile config for T tokens: the nearest tuned entry if a file matches, else the heuristic."""
    return _get_config(T, E, N, K, top_k, dtype_name(dtype), device_name(device), device_capability(device),
                       tuple(config_dirs()))


@functools.lru_cache(maxsize=4096)
def _get_config(T: int, E: int, N: int, K: int, top_k: int, dtype: str, device: str, capability: str | None,
                dirs: tuple[Path, ...]) -> dict[str, Any]:
    found = _find_table(E, N, K, device, dtype, capability, dirs)
    hit = nearest_entry(found[1], T) if found else None
    if hit:
        key, cfg = hit[0], dict(hit[1])
        cfg["source"] = f"{found[0]} [T={key}]"
    else:
        cfg = heuristic_config(T, E, N, K, top_k)
        cfg["source"] = "heuristic"
    cfg.setdefault("decode", False)
    cfg.setdefault("reduce", "atomic")
    return cfg


SMEM_LIMIT = 220 * 1024  # bytes of shared memory a program may use (H100: 227 KB; leave room for the epilogue)


def smem_bytes(block_m: int, g: dict[str, Any], elt: int, gemm: int) -> int:
    """Shared memory of the software pipeline: num_stages copies of the A tile and the B tile(s)."""
    b_tiles = 2 if gemm == 1 else 1
    return g.get("num_stages", 3) * (block_m * g["BLOCK_K"] + b_tiles * g["BLOCK_K"] * g["BLOCK_N"]) * elt


def fit_smem(cfg: dict[str, Any], elt: int, limit: int = SMEM_LIMIT) -> dict[str, Any]:
    """Shrink num_stages, then BLOCK_K, until each GEMM's pipeline fits (fp32 doubles the bytes of a tile)."""
    out = dict(cfg)
    for name, gemm in (("gemm1", 1), ("gemm2", 2)):
        g = dict(cfg[name])
        while smem_bytes(cfg["BLOCK_M"], g, elt, gemm) > limit:
            if g.get("num_stages", 3) > 2:
                g["num_stages"] = g.get("num_stages", 3) - 1
            elif g["BLOCK_K"] > 16:
                g["BLOCK_K"] //= 2
            elif g["BLOCK_N"] > 16:
                g["BLOCK_N"] //= 2
            else:
                break
        out[name] = g
    return out


def clear_cache() -> None:
    _load_file.cache_clear()
    _same_capability_file.cache_clear()
    _get_config.cache_clear()
