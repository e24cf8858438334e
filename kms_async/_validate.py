"""Argument checks: limits, and one definition of each kind of id.

Every public method validates with these before it touches the cache or the
database, so a bad argument is an :class:`InvalidParameterError` that says
what to fix, never a driver error from deeper down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from ._errors import InvalidParameterError
from ._ids import DATA_KEY_VERSION_PREFIX, ID_LENGTH, ROOT_KEY_VERSION_PREFIX, is_id
from ._types import ROOT_PURPOSE

__all__ = [
    "MAX_PURPOSE_BYTES",
    "MAX_SCOPE_BYTES",
    "check_data_purpose",
    "check_key_version_id",
    "check_known_purpose",
    "check_open_purposes",
    "check_page_size",
    "check_purpose_list",
    "check_scope",
    "check_scope_list",
    "check_seconds",
    "check_text",
    "show",
]

#: Longest scope id accepted, in UTF-8 bytes (PostgreSQL's btree limit is ~2.7 kB).
MAX_SCOPE_BYTES = 1024
#: Longest purpose accepted, in UTF-8 bytes.
MAX_PURPOSE_BYTES = 256


def show(value: object, limit: int = 80) -> str:
    """repr() of an id for messages, shortened so hostile input stays readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_text(name: str, value: object, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidParameterError(f"{name} must be a str, not {type(value).__name__}")
    if not value or not value.strip():
        raise InvalidParameterError(f"missing {name}: it must not be empty or blank")
    if "\x00" in value:
        raise InvalidParameterError(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidParameterError(f"{name} is not valid Unicode text") from None
    if size > max_bytes:
        raise InvalidParameterError(f"{name} is {size} bytes long; the limit is {max_bytes}")
    return value


def check_scope(scope_id: object) -> str:
    return check_text("scope id", scope_id, MAX_SCOPE_BYTES)


def check_list(name: str, values: object, one: str) -> list[object]:
    """The items of a list argument; one string, or something that is no list, is refused."""
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        raise InvalidParameterError(
            f"{name} must be a list of {one}s, not one string; write [{one.replace(' ', '_')}]"
        )
    if not isinstance(values, Iterable):
        raise InvalidParameterError(f"{name} must be a list of {one}s, not {type(values).__name__}")
    try:
        return list(values)
    except TypeError:
        raise InvalidParameterError(
            f"{name} must be a list of {one}s, not {type(values).__name__}"
        ) from None


def check_scope_list(scope_ids: Iterable[str]) -> list[str]:
    scopes = [check_scope(s) for s in check_list("scope_ids", scope_ids, "scope id")]
    if not scopes:
        raise InvalidParameterError("missing scope ids")
    return scopes


def _check_purpose_name(purpose: object) -> str:
    text = check_text("purpose", purpose, MAX_PURPOSE_BYTES)
    if text.strip() != text:
        raise InvalidParameterError(f"purpose {show(text)} has surrounding whitespace")
    return text


def check_open_purposes(purposes: Iterable[str]) -> tuple[str, ...]:
    """The data key purposes a KMS is opened with, de-duplicated, in order."""
    if isinstance(purposes, str):
        raise InvalidParameterError(
            "purposes must be a list of purposes, not one string; write purposes=[...]"
        )
    try:
        given = list(purposes)
    except TypeError:
        raise InvalidParameterError(
            f"purposes must be a list of purposes, not {type(purposes).__name__}"
        ) from None
    checked: list[str] = []
    for purpose in given:
        _check_purpose_name(purpose)
        if purpose == ROOT_PURPOSE:
            raise InvalidParameterError(
                f"{ROOT_PURPOSE!r} is reserved for root keys and cannot be a data key purpose"
            )
        if purpose not in checked:
            checked.append(purpose)
    return tuple(checked)


def check_known_purpose(purpose: object, known: tuple[str, ...]) -> str:
    """A purpose the KMS was opened with, or ``rootKey``."""
    if not isinstance(purpose, str) or not purpose:
        raise InvalidParameterError("missing purpose")
    if purpose != ROOT_PURPOSE and purpose not in known:
        raise InvalidParameterError(
            f"{show(purpose)} is not a supported key purpose; this KMS was opened with "
            f"purposes={list(known)!r}"
        )
    return purpose


def check_data_purpose(purpose: object, known: tuple[str, ...]) -> str:
    """A purpose the KMS was opened with, not ``rootKey``."""
    checked = check_known_purpose(purpose, known)
    if checked == ROOT_PURPOSE:
        raise InvalidParameterError(
            f"{ROOT_PURPOSE!r} keys only wrap other keys; use a data key purpose"
        )
    return checked


def check_purpose_list(purposes: Iterable[str] | None, known: tuple[str, ...]) -> list[str]:
    """The purposes a write names (default: all the KMS knows), each once."""
    if purposes is None:
        return list(known)
    checked: list[str] = []
    for purpose in check_list("purposes", purposes, "purpose"):
        if purpose == ROOT_PURPOSE:
            raise InvalidParameterError(
                f"{ROOT_PURPOSE!r} is a reserved key purpose; root keys are made implicitly"
            )
        name = check_data_purpose(purpose, known)
        if name in checked:
            raise InvalidParameterError(f"duplicate key purpose {name!r}")
        checked.append(name)
    return checked


def check_key_version_id(value: object) -> Literal["root", "data"]:
    """Whether ``value`` is a root or a data key version id; InvalidParameterError if neither."""
    if not isinstance(value, str) or not value:
        raise InvalidParameterError("missing key version id")
    if is_id(value, ROOT_KEY_VERSION_PREFIX):
        return "root"
    if is_id(value, DATA_KEY_VERSION_PREFIX):
        return "data"
    raise InvalidParameterError(
        f"{show(value)} is not a valid key version id: it must be {ROOT_KEY_VERSION_PREFIX}_ "
        f"or {DATA_KEY_VERSION_PREFIX}_ followed by {ID_LENGTH} letters and digits"
    )


def check_page_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise InvalidParameterError(f"{name} must be a whole number from 1 to 10000, not {value!r}")
    return value


def check_seconds(name: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    """A finite number of seconds: positive (or 0 with ``zero``, None with ``none``)."""
    if value is None and none:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
        and value < 10**9
    )
    if not ok:
        what = "a number of seconds, 0 or more" if zero else "a positive number of seconds"
        raise InvalidParameterError(f"{name} must be {what}" + (" or None" if none else ""))
