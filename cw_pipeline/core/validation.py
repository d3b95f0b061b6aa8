"""Settings models validated once (pydantic v2), with messages that name the field.

Every settings object of the library (``ExtractionConfig``, ``RuntimeConfig``,
``SearchParams``, ``RerankConfig``) derives from :class:`Settings`: frozen, unknown fields
rejected, no silent coercion (``'10'`` is not an integer, ``true`` is not one either).
:func:`error_message` turns one pydantic error into the sentence the YAML loader shows, e.g.
``n_pca must be >= 1, got 0`` or ``unknown key 'resise'; did you mean 'resize'? (allowed: …)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

__all__ = ["Settings", "bounded_int", "error_key", "error_message"]


class Settings(BaseModel):
    """Base of the settings models: frozen, strict, unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` (``dataclasses.replace`` for settings)."""
        return type(self).model_validate({**self.model_dump(), **changes})


def bounded_int(minimum: int, maximum: int | None = None) -> Any:
    """An ``int`` type whose errors read ``<field> must be >= 1, got 0`` (or ``in 1..1000``)."""

    def check(value: int, info: ValidationInfo) -> int:
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise ValueError(f"{info.field_name} must be {bound}, got {value}")
        return value

    return Annotated[int, AfterValidator(check)]


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def error_key(error: dict[str, Any]) -> str | None:
    """The field an error is about: the last name in its location (None at the top)."""
    names = [p for p in error.get("loc", ()) if isinstance(p, str)]
    return names[-1] if names else None


def error_message(
    error: dict[str, Any], allowed: Iterable[str] = (), names: dict[str, str] | None = None
) -> str:
    """One pydantic error as a sentence naming the field (``allowed``: the keys an unknown one
    is compared with; ``names``: how a field is called in messages, e.g. generate→generator)."""
    key = error_key(error) or "value"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = tuple(allowed)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {key!r}{hint}{listed}"
    if kind == "missing":
        return f"missing {key!r}"
    if kind == "literal_error":
        expected = error["ctx"]["expected"].replace(" or ", ", ").replace("'", "")
        return f"unknown {(names or {}).get(key, key)} {value!r} (expected one of {expected})"
    if kind in _TYPE_WORDS:
        return f"{key} must be {_TYPE_WORDS[kind]}, got {value!r}"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    return f"{key}: {error['msg']} (got {value!r})"
