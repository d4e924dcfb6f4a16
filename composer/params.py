"""The base of every config schema (sections, task / quant / layer params): pydantic with one rule added.

pydantic's lax mode reads ``true`` as 1 for a numeric field, so ``model.top_k=true`` silently ran with top_k = 1 and
``task.tolerance=true`` checked against 100%. A boolean given for a number (or inside a list of numbers) is refused
here, with the key named; everything else is pydantic's."""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def _number_not_bool(annotation: Any) -> str | None:
    """'an integer' / 'a number' for int / float fields (also inside Optional / Annotated), None for a field that
    takes bool or anything else."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _number_not_bool(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if bool in args:
            return None
        kinds = [k for k in map(_number_not_bool, args) if k]
        return kinds[0] if kinds else None
    return {int: "an integer", float: "a number"}.get(annotation)


def _items(annotation: Any) -> Any:
    """The item type of list[X] / tuple[X, ...] / tuple[X, Y] (first), also inside Optional / Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated or origin in (typing.Union, types.UnionType):
        for a in typing.get_args(annotation):
            item = _items(a)
            if item is not None:
                return item
        return None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return args[0] if args else None
    return None


class Params(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if field is None:
            return value
        if isinstance(value, bool):
            kind = _number_not_bool(field.annotation)
            if kind:
                raise ValueError(f"must be {kind}, got {value} (a boolean)")
        elif isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            kind = _number_not_bool(_items(field.annotation))
            if kind:
                raise ValueError(f"must be a list of {'integers' if kind == 'an integer' else 'numbers'}, got "
                                 f"{list(value)} (with a boolean)")
        return value
