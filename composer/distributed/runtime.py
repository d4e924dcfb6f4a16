"""The torch.distributed runtime: process groups from torchrun's environment, checks at start-up, teardown.

One small API, shared by expert parallelism and (later) tensor parallelism::

    state = init_from_env(cfg)      # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (set by torchrun)
    ...                             # build(cfg) picks state.ep_rank / state.ep_group up by itself
    teardown(state)

* Backend: ``nccl`` when ``cfg.device == "cuda"`` (each rank on ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
  Beside the device group there is always a gloo *metadata* group on the host (the same group on CPU):
  the all2all backends exchange token counts over it without synchronizing the GPU with the host.
* Timeout: ``parallel.timeout_s`` bounds every collective; a rank that fails makes the others stop
  with a ``DistributedError`` within that time instead of hanging (the failing rank also aborts its
  process group so peers see a closed connection at once, and torchrun stops the remaining workers).
  On GPUs a stuck NCCL collective is caught by PyTorch's NCCL watchdog after the same timeout, which
  tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING); the token-count exchanges on the gloo group
  fail first with a readable DistributedError naming the step.
* Start-up checks: the world size must equal ``parallel.ep_size`` (message says what to launch), and
  every rank must run the same config: the ``config_hash()`` of each rank is compared and a mismatch
  raises naming the ranks, their hashes and the keys that differ.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from ..errors import ComposerError, ConfigError, Problem

log = logging.getLogger("composer.distributed")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ComposerError):
    """A multi-rank run that cannot go on: a peer failed or timed out, or ranks disagree."""


@dataclass
class DistState:
    """This process's place in the job. ``ep_group`` is the process group the all2all backends use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None
    tp_rank: int = 0      # tensor parallelism (composer.distributed.tp): this rank's slice of every expert
    tp_size: int = 1
    tp_group: Any = None  # the group the partial expert outputs are all-reduced over
    sequence_parallel: bool = False  # tensor parallelism with each rank holding its own tokens
    cpu_group: Any = None  # gloo group for host-side metadata (token counts, config check)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    timeout_s: float = 120.0
    owns_process_group: bool = False  # True when init_from_env created it (teardown destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_STATE: DistState | None = None
_CPU_GROUPS: dict[Any, Any] = {}  # device group -> its gloo twin for metadata


def current() -> DistState | None:
    """The state ``init_from_env`` set up in this process, or None."""
    return _STATE


def metadata_group(group: Any) -> Any:
    """The host (gloo) group to exchange small metadata for ``group``: its registered twin, or itself."""
    return _CPU_GROUPS.get(group, group)


def is_distributed_launch(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1") or 1) > 1


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    v = env.get(key)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {key}={v!r} must be an integer (torchrun sets it)") from None


def init_from_env(cfg: Any, env: Mapping[str, str] | None = None) -> DistState:
    """Join (or create) the process group that torchrun's environment describes and check the job.

    Raises ConfigError when ``parallel.ep_size`` does not match the world size, DistributedError when
    the ranks run different configs or a peer does not show up within ``parallel.timeout_s``.
    """
    global _STATE
    env = os.environ if env is None else env
    par = cfg.parallel
    timeout_s = float(getattr(par, "timeout_s", 120.0))
    already = dist.is_available() and dist.is_initialized()
    if already:
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int(env, "LOCAL_RANK", rank)
    else:
        world = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        local_rank = _env_int(env, "LOCAL_RANK", 0)
    tp_size = int(getattr(par, "tp_size", 1))
    if tp_size > 1 and world != par.ep_size * tp_size:
        raise ConfigError([Problem("parallel.tp_size", tp_size, _tp_world_message(tp_size, par.ep_size, world))])
    if tp_size == 1 and world != par.ep_size:
        raise ConfigError([Problem("parallel.ep_size", par.ep_size, _world_message(par.ep_size, world))])
    if cfg.parallel.ep_size > 1 and (cfg.compile or cfg.cuda_graph):
        key = "compile" if cfg.compile else "cuda_graph"
        raise ConfigError([Problem(key, True, "expert parallelism exchanges token counts on the host, which "
                                   "torch.compile(fullgraph) and CUDA graphs cannot capture; set compile=false "
                                   "cuda_graph=false with parallel.ep_size > 1")])
    if tp_size > 1 and (cfg.compile or cfg.cuda_graph):
        key = "compile" if cfg.compile else "cuda_graph"
        raise ConfigError([Problem(key, True, "tensor parallelism's all-reduce is not set up for "
                                   "torch.compile(fullgraph) or CUDA-graph capture yet; set compile=false "
                                   "cuda_graph=false with parallel.tp_size > 1")])

    device = torch.device("cpu")
    backend = "gloo"
    if cfg.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                                   f"CUDA device(s) are visible; launch at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"

    if world == 1:
        _STATE = DistState(device=device, backend=backend, timeout_s=timeout_s)
        return _STATE

    timeout = _dt.timedelta(seconds=timeout_s)
    owns = False
    if not already:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                                   f"`torchrun --nproc-per-node {world} -m composer ...`")
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        with collective("joining the process group (init_process_group)", timeout_s):
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    init_method="env://", **kwargs)
        owns = True
    group = dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        cpu_group = group
    else:
        with collective("creating the gloo metadata group", timeout_s):
            cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        _CPU_GROUPS[group] = cpu_group
    if tp_size > 1:  # tensor parallelism over every rank (validation refuses it together with ep_size > 1)
        _STATE = DistState(rank=rank, world_size=world, local_rank=local_rank, ep_rank=0, ep_size=1, ep_group=None,
                           tp_rank=dist.get_rank(group), tp_size=world, tp_group=group, cpu_group=cpu_group,
                           sequence_parallel=bool(getattr(par, "sequence_parallel", False)),
                           device=device, backend=backend, timeout_s=timeout_s, owns_process_group=owns)
    else:
        _STATE = DistState(rank=rank, world_size=world, local_rank=local_rank, ep_rank=dist.get_rank(group),
                           ep_size=world, ep_group=group, cpu_group=cpu_group, device=device, backend=backend,
                           timeout_s=timeout_s, owns_process_group=owns)
    check_same_config(cfg, _STATE)
    return _STATE


def _world_message(ep_size: int, world: int) -> str:
    if world == 1:
        return (f"needs {ep_size} processes but this is a single process; launch "
                f"`torchrun --nproc-per-node {ep_size} -m composer parallel.ep_size={ep_size} ...`")
    return (f"must equal the number of processes (WORLD_SIZE={world}); set parallel.ep_size={world} "
            f"or launch with `torchrun --nproc-per-node {ep_size}`")


def _tp_world_message(tp_size: int, ep_size: int, world: int) -> str:
    n = tp_size * ep_size
    if world == 1:
        return (f"needs {n} processes but this is a single process; launch "
                f"`torchrun --nproc-per-node {n} -m composer parallel.tp_size={tp_size} ...`")
    return (f"parallel.ep_size x parallel.tp_size = {n} must equal the number of processes (WORLD_SIZE={world}); "
            f"set parallel.tp_size={world // max(ep_size, 1)} or launch with `torchrun --nproc-per-node {n}`")


def check_same_config(cfg: Any, state: DistState) -> None:
    """Every rank must run the same resolved config: compare hashes, name the differing keys."""
    mine = (state.rank, cfg.config_hash(), _flatten(cfg.to_dict()))
    gathered: list[Any] = [None] * state.world_size
    with collective("comparing the config across ranks", state.timeout_s):
        dist.all_gather_object(gathered, mine, group=state.cpu_group)
    hashes = {r: h for r, h, _ in gathered}
    if len(set(hashes.values())) == 1:
        return
    ref_rank, _, ref = gathered[0]
    lines = []
    for r, h, flat in gathered[1:]:
        if h == hashes[ref_rank]:
            continue
        keys = sorted(k for k in set(ref) | set(flat) if ref.get(k) != flat.get(k))
        diffs = ", ".join(f"{k}: {ref.get(k)!r} vs {flat.get(k)!r}" for k in keys[:8])
        lines.append(f"rank {ref_rank} (hash {hashes[ref_rank]}) and rank {r} (hash {h}) differ in {diffs}")
    raise DistributedError("the ranks run different configs; launch every rank with the same config and "
                           "overrides:\n  " + "\n  ".join(lines))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@contextlib.contextmanager
def collective(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a failed or timed-out collective into a DistributedError that says what was going on."""
    try:
        yield
    except ComposerError:
        raise
    except (RuntimeError, ValueError, TimeoutError) as exc:  # DistBackendError / DistNetworkError subclass RuntimeError
        if isinstance(exc, ValueError) and "group" not in str(exc).lower():
            raise
        state = _STATE
        rank = f"rank {state.rank}" if state is not None else "this rank"
        t = timeout_s if timeout_s is not None else (state.timeout_s if state is not None else None)
        limit = f" or is more than parallel.timeout_s={t:g} s late" if t is not None else ""
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"{rank}: {what} failed: another rank has probably failed (see its error){limit}. "
                               f"(cause: {type(exc).__name__}: {first})") from exc


def abort(state: DistState | None = None) -> None:
    """After an error on this rank: drop the process group so that peers blocked in a collective fail
    at once (closed connection) instead of waiting for the timeout."""
    global _STATE
    state = state or _STATE
    if state is None or not state.distributed or not dist.is_initialized():
        _STATE = None
        return
    try:
        from torch.distributed import distributed_c10d as c10d

        if state.backend == "nccl" and hasattr(c10d, "_abort_process_group"):  # pragma: no cover - GPU only
            c10d._abort_process_group()  # NCCL: destroy could block on pending work; abort does not
        else:
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort while already failing
        log.debug("abort: %s", exc)
    _CPU_GROUPS.clear()
    _STATE = None


def teardown(state: DistState | None = None, *, barrier: bool = True) -> None:
    """Wait for every rank (a monitored barrier names the ones that do not arrive), then destroy the
    process group if ``init_from_env`` created it."""
    global _STATE
    state = state or _STATE
    if state is None:
        return
    try:
        if state.distributed and dist.is_initialized() and barrier:
            with collective("the final barrier (teardown)", state.timeout_s):
                dist.monitored_barrier(state.cpu_group, timeout=_dt.timedelta(seconds=state.timeout_s),
                                       wait_all_ranks=True)
    finally:
        if state.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        _CPU_GROUPS.clear()
        _STATE = None


def rank_zero() -> bool:
    """True on the rank that prints and writes shared outputs (rank 0, or a single process)."""
    return _STATE is None or _STATE.rank == 0


class Job:
    """One CLI job on several ranks: start-up (init + checks), then every rank's outcome, then teardown.

    Outputs: rank 0 prints the tables and writes ``results.json`` for the whole job; other ranks print
    only their own errors (prefixed ``rank N``). A check that fails on any rank fails the job on every
    rank, and rank 0 records which rank failed and why.
    """

    def __init__(self, state: DistState):
        self.state = state
        self.rank = state.rank
        self.done = False

    @classmethod
    def start(cls, cfg: Any, env: Mapping[str, str] | None = None) -> "Job | None":
        """Init from torchrun's environment when WORLD_SIZE > 1 or parallel.ep_size > 1; None on one rank."""
        if not is_distributed_launch(env) and cfg.parallel.ep_size == 1 and getattr(cfg.parallel, "tp_size", 1) == 1:
            return None
        return cls(init_from_env(cfg, env))

    def finish(self, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
        """This rank succeeded: learn whether the others did; raises DistributedError if one failed."""
        failed = self._exchange(None)
        if failed:
            raise DistributedError("the job failed on another rank:\n  " + "\n  ".join(
                f"rank {r}: {m}" for r, m in failed))
        if metrics is not None and self.rank == 0:
            metrics = {**metrics, "world_size": self.state.world_size, "ep_size": self.state.ep_size,
                       "tp_size": self.state.tp_size}
        return metrics

    def fail(self, exc: BaseException) -> None:
        """This rank failed. After a clean task failure (all collectives done) tell the others; after
        anything else abort the process group so peers blocked in a collective stop at once."""
        if self.done:
            return
        from ..tasks import TaskFailed

        if isinstance(exc, TaskFailed):
            try:
                self._exchange(f"{type(exc).__name__}: {exc}")
                return
            except DistributedError:
                pass
        self.done = True
        abort(self.state)

    def _exchange(self, error: str | None) -> list[tuple[int, str]]:
        st = self.state
        gathered: list[Any] = [None] * st.world_size
        try:
            with collective("collecting every rank's outcome", st.timeout_s):
                dist.all_gather_object(gathered, (st.rank, error), group=st.cpu_group)
        except DistributedError:
            self.done = True
            abort(st)
            raise
        self.done = True
        # every rank is alive here: a final barrier keeps one rank from tearing its gloo connections down (and
        # exiting) while a peer is still finishing the exchange (suspected cause of a rare abort at exit,
        # "terminate called without an active exception", seen once in the 2-rank CPU tests)
        teardown(st, barrier=True)
        return [(r, m) for r, m in gathered if m is not None and r != st.rank]


def env_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun, and rank 0 whenever the world is one
    process (a stray RANK alone does not make a rank)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    return (_env_int(env, "RANK", 0) if world > 1 else 0), world


def run_script(main: Any) -> int:
    """Run a torchrun script's ``main`` (the EP / TP benches) with the CLI's error handling: a composer error prints
    as a message, not a traceback; a config problem in full on rank 0 and in one line on the other ranks (exit 2),
    anything else composer raises with its rank (exit 1)."""
    import sys

    try:
        return main()
    except ComposerError as exc:
        rank, world = env_rank()
        tag = f" (rank {rank})" if world > 1 else ""
        if isinstance(exc, ConfigError):
            print(f"error{tag}: {exc if rank == 0 else exc.one_line()}", file=sys.stderr, flush=True)
            return 2
        print(f"error{tag}: {exc}", file=sys.stderr, flush=True)
        return 1
