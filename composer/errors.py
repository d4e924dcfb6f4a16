"""Errors a user sees. Each says what is wrong and what to do; the CLI prints them without a traceback."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class ComposerError(Exception):
    """Base class of every error composer raises on purpose."""


class RegistryError(ComposerError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Problem:
    """One problem in a config: its dotted key, the value given, and what is allowed."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = repr(self.value) if not isinstance(self.value, str) else f"'{self.value}'"
        return f"{self.key} = {shown}: {self.message}"


class ConfigError(ComposerError):
    """Every problem found in one config, reported together."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def one_line(self) -> str:
        """The first problem, and how many more: what a non-zero torchrun rank prints (rank 0 prints them all)."""
        more = len(self.problems) - 1
        return f"config problem: {self.problems[0]}" + (f" (+{more} more)" if more > 0 else "")

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        n = len(self.problems)
        head = f"invalid composer config{where}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


class TileConfigError(ConfigError, ValueError):
    """A tile-config JSON file (shipped, in $COMPOSER_KERNEL_CONFIGS or add_config_dir) that cannot be used: a config
    problem (exit 2) that names the file."""

    def __init__(self, path: Any, message: str):
        super().__init__([Problem("tile config file", str(path), message)])


class WeightLoadError(ComposerError):
    """A checkpoint tensor that does not fit the parameter it is loaded into."""
