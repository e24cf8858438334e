"""Value objects returned by the public API."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Literal

__all__ = [
    "ROOT_PURPOSE",
    "Key",
    "KeyVersion",
    "KeyVersionInfo",
    "ReplicaReads",
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
