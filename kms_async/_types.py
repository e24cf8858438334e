"""Value objects returned by the public API."""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Literal

from ._errors import InvalidParameterError

__all__ = [
    "ROOT_PURPOSE",
    "CensusRow",
    "Key",
    "KeyVersion",
    "KeyVersionInfo",
    "ReplicaReads",
    "RotationPolicy",
    "Scope",
    "VersionReference",
]

#: The purpose reserved for a scope's root key (key-encryption key).
ROOT_PURPOSE = "rootKey"


@dataclasses.dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a key: its id, its number (1, 2, ...) and when it was made.

    ``suspended``: decryption under this data key version is refused until it
    is resumed (see :meth:`KMS.suspend_key_version`). ``unusable``: why this
    KMS's root wrapper cannot unwrap the version (it was written under another
    root key), or ``None`` when it can or was not asked (``list_keys(...,
    verify=False)``). ``bound``: whether the version has a binding to its
    place (see SECURITY.md); ``False`` for versions written by the Go package
    or before binding (``bind_keys`` binds them), ``None`` on a database
    without the binding tables. Whether a binding *matches* shows on use.
    """

    id: str
    version: int
    create_time: datetime.datetime
    suspended: bool = False
    unusable: str | None = None
    bound: bool | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """A root key (``type == "kek"``) or a data key (``type == "dek"``) of a scope.

    ``versions`` are in ascending version order.
    """

    id: str
    scope: str
    type: Literal["kek", "dek"]
    purpose: str
    create_time: datetime.datetime
    versions: tuple[KeyVersion, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    """A scope that has keys: its root key and the root key's newest version.

    ``create_time`` is when the scope's keys were created and
    ``newest_root_version.create_time`` when they were last rotated, both by
    the database's clock (see :meth:`KMS.database_time`).
    """

    id: str
    root_key_id: str
    create_time: datetime.datetime
    newest_root_version: KeyVersion


@dataclasses.dataclass(frozen=True, slots=True)
class VersionReference:
    """Rows of one table whose foreign key column names a key version."""

    table: str
    column: str
    rows: int


@dataclasses.dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """One key version and what still references it: what revoking it would delete.

    ``purpose`` is ``"rootKey"`` for a root key version. ``references``
    counts, for a data key version, the rows of every table with a foreign
    key to the data key version table (those
    :meth:`KMS.list_data_key_version_referencers` finds) that name it; for a
    root key version, the data key versions it wraps.
    """

    id: str
    scope: str
    purpose: str
    version: int
    create_time: datetime.datetime
    #: The newest version of its key, which cannot be revoked.
    newest: bool
    references: tuple[VersionReference, ...]

    @property
    def rows(self) -> int:
        """Every referencing row, across the tables."""
        return sum(r.rows for r in self.references)


@dataclasses.dataclass(frozen=True, slots=True)
class CensusRow:
    """One data key version in a census (:meth:`KMS.census`).

    ``encryptions`` is what every instance counted under the version and has
    flushed (``None`` on a database without the usage table, schema file
    07); counts made in the last flush interval are not in it yet.
    ``referencing_rows`` counts the rows of every table with a foreign key to
    the data key version table that name the version (``None`` unless asked
    for: it scans those tables). ``newest``: new data of the pair is
    encrypted under it.
    """

    scope: str
    purpose: str
    key_id: str
    version: int
    key_version_id: str
    create_time: datetime.datetime
    encryptions: int | None
    referencing_rows: int | None
    suspended: bool
    newest: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When a scope is due for rotation (:meth:`KMS.rotate_due`).

    A scope is due when the newest version of any of its data keys is at
    least ``max_age`` old (a ``timedelta`` or seconds, by the database's
    clock) or has more than ``max_encryptions`` encryptions counted (summed
    over every instance, as flushed to the usage table). ``None`` leaves a
    criterion out; at least one must be given.

    Raises:
        InvalidParameterError: both are ``None``, ``max_age`` is not a
            positive duration, or ``max_encryptions`` not a whole number of
            at least 0.
    """

    max_age: datetime.timedelta | float | None = None
    max_encryptions: int | None = None

    def __post_init__(self) -> None:
        age = self.max_age
        if age is not None:
            if isinstance(age, datetime.timedelta):
                seconds = age.total_seconds()
            elif isinstance(age, (int, float)) and not isinstance(age, bool):
                seconds = float(age)
            else:
                raise InvalidParameterError(
                    f"max_age must be a timedelta, a number of seconds or None, not {age!r}"
                )
            if not (math.isfinite(seconds) and seconds > 0):
                raise InvalidParameterError(f"max_age must be more than 0, not {age!r}")
            object.__setattr__(self, "max_age", datetime.timedelta(seconds=seconds))
        count = self.max_encryptions
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2**63
        ):
            raise InvalidParameterError(
                f"max_encryptions must be a whole number of at least 0, or None, not {count!r}"
            )
        if age is None and count is None:
            raise InvalidParameterError(
                "give max_age, max_encryptions or both: a policy without either rotates nothing"
            )

    @property
    def max_age_seconds(self) -> float | None:
        """``max_age`` in seconds (``None`` if not given)."""
        age = self.max_age
        return None if age is None else float(age.total_seconds())  # type: ignore[union-attr]


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaReads:
    """Where this instance's cold loads went, with ``read_dsn`` (all zero without).

    ``replica`` loads were answered by the replica; the others went to the
    primary because the replica had not yet replayed a key change this
    instance knows of (``behind``), did not have the pair (``missing``: a
    pair created elsewhere moments ago, or none at all), or failed or could
    not be reached (``failed``).
    """

    replica: int = 0
    behind: int = 0
    missing: int = 0
    failed: int = 0
