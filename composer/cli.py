"""The ``composer`` command: a Hydra app. Config problems exit 2 without a traceback
(HYDRA_FULL_ERROR=1 shows it); a task that finds a failure exits 1; sweeps (-m) run every job and
record failed ones in their results.json instead of stopping."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape  # (messages quote values such as [1, 2] and paths such as d/[a].yaml)

from .api import CONF_DIR, GROUPS, choice_problems, closest_option, group_options, sweep_values, validate_composed
from .config import to_plain
from .errors import ComposerError, ConfigError, Problem
from .launchers import launcher_problems, overlay_sweeps
from .registry import TASKS
from .results import write_results

log = logging.getLogger("composer")
_err = Console(stderr=True, width=160 if not sys.stderr.isatty() else None)


def _console() -> Console:
    """Wide enough for the tables when output is piped (rich would assume 80 columns)."""
    import shutil

    return Console() if sys.stdout.isatty() else Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160))
_failures: list[int] = []  # exit codes of failed jobs in this process (for sweeps)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _lead_rank() -> bool:
    """False on torchrun's ranks other than 0. A config problem found before the ranks join is usually the same on
    every rank, so rank 0 reports it in full (and writes results.json); the others print it in one line (it may be
    theirs alone) and exit with the same code."""
    from .distributed.runtime import env_rank

    return env_rank()[0] == 0


def _under_torchrun() -> bool:
    from .distributed.runtime import env_rank

    return env_rank()[1] > 1


def _multirun(argv: list[str]) -> bool:
    """Whether Hydra will sweep: -m / --multirun (or a prefix argparse accepts) or hydra.mode=MULTIRUN."""
    from hydra._internal.utils import get_args_parser

    try:
        known, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # (Hydra reports its own usage errors)
        return True
    return bool(known.multirun) or any(a.replace(" ", "") in ("hydra.mode=MULTIRUN", "hydra.mode=multirun")
                                       for a in argv)


def _precheck(argv: list[str]) -> None:
    """Unknown group choices (``quant=fp9``) get composer's message and exit code 2, before Hydra runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    args = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~")) and not a.startswith("hydra")]
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(args)
    except Exception:  # Hydra's syntax error, as a config problem (exit 2) naming each override it cannot read
        bad = []
        for arg in args:
            try:
                parser.parse_overrides([arg])
            except Exception as exc:  # noqa: BLE001 - (Hydra raises several types)
                said = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip() and "hydra.cc" not in ln)
                bad.append(Problem("override", arg, f"{said} (Hydra's override grammar: https://hydra.cc/docs/"
                                   "advanced/override_grammar/basic; quote a value that holds brackets or commas)"))
        if not bad:
            return  # (let Hydra say it)
        _exit_config(ConfigError(bad, "command line"))
    multirun = _multirun(argv)
    if multirun and _under_torchrun():
        problems.append(Problem("-m", f"under torchrun (WORLD_SIZE={os.environ.get('WORLD_SIZE')})", "a sweep under torchrun is not supported (the ranks "
                                "would fall out of step between jobs); run one torchrun per job, e.g. a shell loop "
                                "over the swept values"))
    overlays: dict[str, list[str]] = {}
    for o in overrides:
        if o.is_add() and (CONF_DIR / o.key_or_group).is_dir():
            overlays.setdefault(o.key_or_group, []).append(str(o.value()))
    for name in overlays.get("experiment", []) if not multirun else []:  # (without -m Hydra runs one job and
        # ignores the experiment's sweep, silently)
        params = overlay_sweeps("experiment", name)
        if params:
            problems.append(Problem("+experiment", name, f"this experiment sweeps {', '.join(params)}: add -m "
                                    f"(composer -m +experiment={name}) to run its jobs"))
    for key, values in overlays.items():  # (Hydra: "Multiple values for deploy", exit 1)
        if len(values) > 1:
            problems.append(Problem(f"+{key}", values, f"one +{key}= per run: its files each set a whole "
                                    f"deployment; pick one and override single keys on top of it"))
    choices = []
    for o in overrides:
        try:
            values = sweep_values(o) if o.is_sweep_override() else [o.value()]
        except ConfigError as err:  # (interval(), or glob() of a plain key: Hydra's traceback before any job)
            problems += err.problems
            continue
        key = o.get_key_element()  # (with its + or ++: the command to write must keep it)
        if o.is_sweep_override() and not values:  # (Hydra launches 0 jobs and exits 0)
            problems.append(Problem(key, o.input_line.partition("=")[2], _no_values(o)))
            continue
        if o.is_sweep_override() and not multirun and not o.key_or_group.startswith("hydra"):
            shown = ",".join(values)
            problems.append(Problem(key, shown, f"a sweep (several values, range() or glob()) needs -m: composer -m "
                                    f"{key}={shown} ... runs one job each"))
            continue
        if (o.key_or_group in GROUPS or o.key_or_group == "model.name") and o.package is None and not o.is_delete():
            choices.append((o.key_or_group, values))
    problems += choice_problems(choices)
    problems += launcher_problems(_globs_listed(argv, args, overrides))  # +deploy=typo, or hydra/launcher=slurm
    # without its plugin installed
    if not problems:
        problems = _unknown_keys(overrides)
    elif any(p.key in GROUPS for p in problems):
        problems += _other_problems(overrides, problems)
    if problems:
        _exit_config(ConfigError(problems, "command line"))


def _other_problems(overrides: list[Any], found: list[Problem]) -> list[Problem]:
    """With a group choice refused (``kernel=tritn``), the problems of the rest of the command line too, found with
    each refused group at its closest option (``kernel=triton``), which the problems name: every problem at once, not
    the typo first. Checks that depend on a group (a group size dividing the model's sizes) would be false against
    any other option, so where an option is not close (or anything else fails) the typo is reported alone."""
    guesses = {}
    for p in found:
        if p.key in GROUPS:
            close = closest_option(p.key, p.value)
            if close is None:
                return []
            guesses[p.key] = close
    reported = {p.key.lstrip("+") for p in found}
    rest = [o for o in overrides if o.key_or_group not in guesses and o.key_or_group not in reported
            and not any(o.key_or_group.startswith(g + ".") for g in guesses)]
    args = [f"{g}={v}" for g, v in guesses.items()]
    try:
        args += [f"{o.get_key_element()}={sweep_values(o)[0]}" if o.is_sweep_override() else o.input_line
                 for o in rest]
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from .api import _compose

        more = _unknown_keys(OverridesParser.create().parse_overrides(args))
        if not more:
            validate_composed(_compose("config", args), args)
    except ConfigError as exc:
        more = exc.problems
    except Exception:  # noqa: BLE001 - (the refused choice is still reported)
        return []
    said = ", ".join(f"{g}={v}" for g, v in guesses.items())
    seen = {(p.key, p.message) for p in found}
    return [Problem(p.key, p.value, f"{p.message} (checked with {said}, the closest option)") for p in more
            if (p.key, p.message) not in seen and not any(p.key == g or p.key.startswith(g + ".") for g in guesses)]


def _globs_listed(argv: list[str], args: list[str], overrides: list[Any]) -> list[str]:
    """``argv`` with each config group's glob() written as the list it stands for (+deploy=glob(h100*) ->
    +deploy=h100_bf16,h100_fp8), for checks that read the values from the arguments."""
    from hydra.core.override_parser.types import ValueType

    listed = {}
    for a, o in zip(args, overrides):
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP and (CONF_DIR / o.key_or_group).is_dir():
            listed[a] = f"{o.get_key_element()}={','.join(sweep_values(o))}"
    return [listed.get(a, a) for a in argv]


def _no_values(o: Any) -> str:
    """Why a sweep that enumerates nothing is refused, and what to give instead."""
    from hydra.core.override_parser.types import ValueType

    if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return (f"this glob matches none of the {o.key_or_group} configs, so no job would run; they are: "
                f"{', '.join(group_options(o.key_or_group))}")
    return ("this sweep has no values, so no job would run; give at least one (e.g. range(1,5) is 1..4: the end is "
            "left out)")


def _exit_config(err: ConfigError) -> None:
    """A config problem found before Hydra runs: composer's message (rank 0 in full, other ranks in one line: usually
    rank 0 prints the same problems; never silent), or the traceback with HYDRA_FULL_ERROR=1; exit 2."""
    if not _lead_rank():
        _err.print(f"[red]error[/red] (rank {os.environ.get('RANK')}): {escape(err.one_line())}", highlight=False)
        sys.exit(2)
    if _full_error():
        import traceback

        try:
            raise err
        except ConfigError:
            traceback.print_exc()
        sys.exit(2)
    _err.print(f"[red]error[/red]: {escape(str(err))}", highlight=False)
    sys.exit(2)


def _unknown_keys(overrides: list[Any]) -> list[Any]:
    """Hydra refuses a key the config lacks, and a '+' for a key or group the config has, with its own terse error
    (exit 1); report them (and every other problem of that config) the composer way: exit 2, the allowed keys and a
    did-you-mean, or the override to write instead."""
    from omegaconf import OmegaConf

    from .api import _compose

    def first(o: Any) -> str:
        v = sweep_values(o)[0] if o.is_sweep_override() else o.value()
        return f"{o.key_or_group}={v}"

    def shown(o: Any) -> str:
        return ",".join(sweep_values(o)) if o.is_sweep_override() else str(o.value())

    deleted = {o.key_or_group for o in overrides if o.is_delete()}  # (~model +model={...}: a deploy file's own model)
    chosen = [Problem(f"+{o.key_or_group}", shown(o), f"the defaults already choose a {o.key_or_group}: pick another "
                      f"with {o.key_or_group}={shown(o)} (no '+')")
              for o in overrides if o.is_add() and o.key_or_group in GROUPS and o.package is None
              and o.key_or_group not in deleted]
    if chosen:  # (Hydra: "Multiple values for quant", exit 1)
        return chosen
    groups = [first(o) for o in overrides if o.key_or_group in GROUPS and o.package is None and not o.is_delete()]
    # overlays (+experiment=..., +deploy=...) choose groups and add keys of their own: compose with them
    groups += [f"+{first(o)}" for o in overrides if o.is_add() and (CONF_DIR / o.key_or_group).is_dir()]
    plain = [o for o in overrides if o.key_or_group not in GROUPS and not o.is_add() and not o.is_force_add()
             and not o.is_delete()]
    try:
        base = OmegaConf.create(_compose("config", groups))
    except ConfigError:
        return []
    present = [Problem(f"+{o.key_or_group}", shown(o), f"{o.key_or_group} is already in the config: '+' adds a key "
                       f"it lacks; set this one with {o.key_or_group}=... (or ++{o.key_or_group}=... to add or set)")
               for o in overrides if o.is_add() and o.package is None and not (CONF_DIR / o.key_or_group).is_dir()
               and not any(o.key_or_group == d or o.key_or_group.startswith(d + ".") for d in deleted)
               and not isinstance(o.value(), (dict, list))  # (Hydra merges a dict or list into the key)
               and OmegaConf.select(base, o.key_or_group, default=None) is not None]  # (Hydra sets a null key)
    if present:  # (Hydra: "Could not append to config. An item is already at ...", exit 1)
        return present
    shape = [Problem(o.key_or_group, shown(o), f"must be a {'list' if want else 'mapping'} "
                     f"({o.key_or_group}={'[...]' if want else '{...}'}), got a {'mapping' if want else 'list'}")
             for o in plain if not o.is_sweep_override() and isinstance(o.value(), (dict, list))
             and (want := _is_list(OmegaConf.select(base, o.key_or_group, default=None))) is not None
             and want != isinstance(o.value(), list)]
    if shape:  # (Hydra: "Cannot merge DictConfig with ListConfig", exit 1)
        return shape
    missing = [o for o in plain if OmegaConf.select(base, o.key_or_group, default=_MISSING) is _MISSING]
    if not missing:
        return []
    forced = groups + [f"++{first(o)}" for o in plain]
    try:
        validate_composed(_compose("config", forced), forced)
    except ConfigError as exc:
        return exc.problems
    # a key the schema takes but the composed config lacks (model.hf_overrides.<name>): Hydra's rule is '+' to add it
    return [Problem(o.key_or_group, shown(o), f"not in the config: add it with +{o.key_or_group}={shown(o)}")
            for o in missing]


_MISSING = object()


def _is_list(node: Any) -> bool | None:
    """True for a list node of the config, False for a mapping, None for anything else (a value, absent)."""
    from omegaconf import ListConfig

    return True if isinstance(node, ListConfig) else False if isinstance(node, DictConfig) else None


def run_job(dcfg: DictConfig) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    overrides = list(OmegaConf.to_container(hc.overrides.task, resolve=False))  # (as typed: ${...} unresolved)
    raw = OmegaConf.to_container(dcfg, resolve=False)  # (what results.json records if resolving fails)
    task_name = raw.get("task", {}).get("name") if isinstance(raw.get("task"), dict) else None
    cfg = None
    job = None  # several ranks (torchrun / parallel.ep_size > 1): composer.distributed.runtime.Job
    try:
        raw = to_plain(dcfg)  # (an interpolation that cannot be resolved: a ConfigError, recorded below)
        cfg = validate_composed(raw, overrides)  # (an overlay's keys for a group the command line chose again: dropped)
        from .distributed.runtime import Job

        job = Job.start(cfg)
        from .tasks import TaskContext

        console = _console() if job is None or job.rank == 0 else Console(quiet=True)  # rank 0 prints
        metrics = TASKS.get(cfg.task.name)().run(cfg, TaskContext(run_dir=run_dir, console=console))
        if job is not None:
            metrics = job.finish(metrics)  # raises if another rank failed
            if job.rank != 0:  # rank 0 writes results.json for the whole job
                return metrics
        (run_dir / "config.resolved.yaml").write_text(_yaml(cfg.to_dict()))
        write_results(run_dir, status="ok", task=cfg.task.name, metrics=metrics, config=cfg.to_dict(),
                      config_hash=cfg.config_hash(), overrides=overrides, device=cfg.device,
                      resolved=cfg.resolved())
        return metrics
    except (KeyboardInterrupt, SystemExit) as exc:
        if job is not None:
            job.fail(exc)
        lead = job.rank == 0 if job is not None else _lead_rank()
        if isinstance(exc, KeyboardInterrupt) and lead:  # (recorded, so that a report tells it from a crash)
            write_results(run_dir, status="interrupted", task=task_name, metrics=None,
                          config=cfg.to_dict() if cfg else raw, config_hash=cfg.config_hash() if cfg else None,
                          overrides=overrides, error="interrupted (Ctrl-C) before the task finished",
                          device=cfg.device if cfg else "cpu")
            _err.print(f"[red]interrupted[/red]: recorded in {escape(str(run_dir / 'results.json'))}", highlight=False)
            sys.exit(130)  # (a sweep stops here too: its remaining jobs do not run)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded in results.json
        composer_error = isinstance(exc, ComposerError)
        oom = None if composer_error else out_of_memory(exc, cfg)
        code = 2 if isinstance(exc, ConfigError) else 1
        message = str(exc) if composer_error else oom or f"{type(exc).__name__}: {exc}"
        if job is not None:  # one rank failed: stop the others at once
            job.fail(exc)
        lead = job.rank == 0 if job is not None else _lead_rank()
        if lead:
            write_results(run_dir, status="failed", task=task_name, metrics=getattr(exc, "metrics", None),
                          config=cfg.to_dict() if cfg else raw, config_hash=cfg.config_hash() if cfg else None,
                          overrides=overrides, error=message, device=cfg.device if cfg else "cpu",
                          **({"resolved": cfg.resolved()} if cfg else {}))  # (report rows name what ran)
        unexpected = not composer_error and oom is None  # a bug or an environment problem: its traceback matters
        # rank 0 reports a config problem in full (usually the same on every rank; the others print one line, as it
        # may be theirs alone); anything else, such as a DistributedError from joining the job, prints here in full
        quiet = job is None and not lead and isinstance(exc, ConfigError)
        if not quiet and (unexpected or _full_error()):
            import traceback

            traceback.print_exc()
        if _full_error() and not sweeping:  # (a sweep still runs its other jobs, each failure with its traceback)
            sys.exit(code)
        rank = f" (rank {job.rank})" if job is not None else "" if lead else f" (rank {os.environ.get('RANK')})"
        if quiet:  # one line: rank 0 prints the same problems in full when it finds them (a rank's own, too)
            _err.print(f"[red]error[/red]{rank}: {escape(exc.one_line())}", highlight=False)
        elif unexpected:
            where = f"recorded in {run_dir / 'results.json'}" if lead else "rank 0 writes results.json"
            _err.print(f"[red]error[/red]{rank}: unexpected {type(exc).__name__} (above; {escape(where)})",
                       highlight=False)
        else:
            _err.print(f"[red]error[/red]{rank}: {escape(message)}", highlight=False)
        if sweeping:  # the other jobs still run; the sweep exits with the worst code at the end
            _failures.append(code)
            return None
        sys.exit(code)


def out_of_memory(exc: BaseException, cfg: Any) -> str | None:
    """What to tell a user whose run ran out of memory (host or GPU), or None for any other error."""
    import torch

    text = str(exc)
    host = isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text
    gpu = isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in text
    if not (host or gpu):
        return None
    size = ""
    if cfg is not None:
        m = cfg.model
        experts = 3 * m.hidden_size * m.intermediate_size * m.num_experts * m.num_layers
        size = (f" {cfg.model.name} at these sizes holds about {experts / 1e9:.1f}B expert parameters "
                f"({experts * torch.empty((), dtype=m.torch_dtype).element_size() / 2**30:.1f} GiB in {m.dtype}).")
    return (f"out of {'GPU' if gpu else 'host'} memory ({text.splitlines()[0][:200] if text else type(exc).__name__})."
            f"{size} Shrink the model (e.g. model.num_layers=1, fewer model.num_experts), use fewer task.tokens, or run "
            "on a machine with more memory; task=show shows the full-size graph without allocating its weights.")


def _yaml(d: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> Any:
    return run_job(dcfg)


def main() -> None:
    """Console-script entry point: ``composer [--deploy-file F] [overrides] [-m] [--cfg job] ...``."""
    from .deploy_file import file_overrides, split_flag

    try:
        path, argv = split_flag(sys.argv[1:])
        if path is not None:  # the file's keys as overrides before the command line's (composer/deploy_file.py),
            # next to them (argparse takes Hydra's overrides as one run of positionals)
            at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), 0)
            argv = argv[:at] + file_overrides(path, argv) + argv[at:]
    except ConfigError as err:
        _exit_config(err)
    # -m anywhere: argparse reads Hydra's overrides as one run of positionals, so `composer a=1 -m b=2` would fail
    # with "unrecognized arguments: b=2"; the flag means the same wherever it is written
    flags = [a for a in argv if a == "-m" or len(a) > 3 and "--multirun".startswith(a)]  # (argparse: any prefix)
    sys.argv = sys.argv[:1] + flags + [a for a in argv if a not in flags]
    from .distributed.runtime import env_rank

    try:  # (a malformed torchrun variable, said once here, not from inside a failing job's error report)
        env_rank()
    except ComposerError as err:
        _err.print(f"[red]error[/red]: {escape(str(err))}", highlight=False)
        sys.exit(2)
    _precheck(sys.argv[1:])
    _hydra_main()
    if _failures:
        _err.print(f"[red]{len(_failures)} job(s) of the sweep failed[/red]; see their results.json")
        sys.exit(max(_failures))


if __name__ == "__main__":
    main()
