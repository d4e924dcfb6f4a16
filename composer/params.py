"""The base of every config schema (sections, task / quant / layer params): pydantic with one rule added.

pydantic's lax mode reads ``true`` as 1 for an integer field, so ``model.top_k=true`` silently ran with top_k = 1.
A boolean given for an integer key is refused here, with the key named; everything else is pydantic's."""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def _takes_int_not_bool(annotation: Any) -> bool:
    """int, int | None, Annotated[int, ...] (but not a field that also takes bool)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _takes_int_not_bool(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_takes_int_not_bool(a) for a in args)
    return annotation is int


class Params(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields \
                and _takes_int_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be an integer, got {value} (a boolean)")
        return value
