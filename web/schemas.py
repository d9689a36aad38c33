"""JSON schemas of the core's results, built from their type hints: a field is declared once."""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import datetime
from enum import StrEnum
from typing import Any

from mailpipe.results import Result

SCALARS: dict[object, dict[str, Any]] = {
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    datetime: {"type": "string", "format": "date-time"},
}


def object_schema(
    result: type[Result],
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The schema of a result's `to_json()`: every field required, plus what a view adds.

    `overrides` adds keywords to a field's generated schema (a format, a description); `extra`
    declares the fields a web view adds to the core's result (texts in the reader's language).
    """
    hints = typing.get_type_hints(result)
    properties = {
        field.name: {**type_schema(hints[field.name]), **(overrides or {}).get(field.name, {})}
        for field in dataclasses.fields(result)
    }
    return {
        "type": "object",
        "required": [field.name for field in dataclasses.fields(result)],
        "properties": {**properties, **(extra or {})},
    }


def type_schema(hint: object) -> dict[str, Any]:
    """The schema of one type hint: scalars, enums, optionals, lists, dicts and results."""
    if hint is Any:
        return {}
    if hint in SCALARS:
        return dict(SCALARS[hint])
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return {"type": "string", "enum": [member.value for member in hint]}
    if isinstance(hint, type) and issubclass(hint, Result):
        return object_schema(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return _nullable(type_schema(inner))
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])}
    raise TypeError(f"no JSON schema for {hint!r}")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable
