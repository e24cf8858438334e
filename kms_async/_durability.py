"""Durable before use: a new key version is used only once a standby has it.

A key version lost in a failover takes every ciphertext made with it along:
nobody can unwrap them again. With ``durability="replicated"`` (PostgreSQL)
each key write first checks that a standby is streaming (otherwise nothing
is written), and then:

- with synchronous standbys configured (``synchronous_standby_names``), the
  key transaction commits with ``synchronous_commit = on``: COMMIT returns,
  and the new versions become visible to any session (so to any instance),
  only once a synchronous standby has flushed them. At the timeout the
  connection is closed without cancelling the wait, so the transaction stays
  invisible on the primary until a standby has it (or dies with the
  primary); this instance's loads then wait as below;
- without, the write waits after COMMIT until a standby reports a flush
  position at or past the primary's WAL position taken after the commit.
  Meanwhile, and after a write whose confirmation failed, every cold load of
  this instance waits the same way before its rows enter the cache, so no
  version this instance wrote is used to encrypt before a standby has it.

A write inside the caller's transaction (``conn=``) cannot wait for a commit
it does not make. With synchronous standbys it sets ``synchronous_commit =
on`` for the caller's transaction, so the caller's COMMIT waits. Without,
its new version ids are remembered, and the first load that reads one of
them waits until a standby has everything the primary had at that read
(which includes the caller's commit). The ids of a caller's transaction
that rolls back stay remembered (a few bytes each) and cost nothing more.

The hot path is untouched: all of this happens in writes and cold loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ._errors import DurabilityTimeoutError, KMSError, OutcomeUnknownError
from ._sql import Database

__all__ = ["Durability", "Ticket"]


@dataclasses.dataclass(slots=True)
class Ticket:
    """One key write under a durability mode."""

    durability: Durability
    #: For ``Database.transaction(replicated=...)``: with synchronous standbys only.
    timeout: float | None = None
    #: The caller's transaction: the versions are confirmed when first loaded.
    caller: bool = False
    #: Synchronous standbys configured: COMMIT itself confirms.
    synchronous: bool = False

    def created(self, version_ids: Iterable[str]) -> None:
        """Note the versions a write creates (before it commits)."""
        if self.caller and not self.synchronous:
            self.durability.unconfirmed.update(version_ids)


class Durability:
    """The durability mode of one KMS, and the state its cold loads check."""

    def __init__(self, database: Database, mode: str, timeout: float) -> None:
        self._db = database
        self.replicated = mode == "replicated"
        self.timeout = timeout
        # This instance's own key writes committing or waiting for a standby.
        self._writes = 0
        # Non-zero after a write whose confirmation failed or is unknown: the
        # next load waits for a standby (numbered, so that a later failure is
        # not cleared by a load that started before it).
        self._behind = 0
        self._failures = 0
        # Versions written in callers' transactions, not yet seen on a standby.
        self.unconfirmed: set[str] = set()

    @contextlib.asynccontextmanager
    async def write(self, conn: Any) -> AsyncIterator[Ticket]:
        """Around one key write's transaction: a standby first, its confirmation after.

        Raises:
            DurabilityTimeoutError: no standby (nothing written), or none
                confirmed the commit within the timeout.
        """
        if not self.replicated:
            yield Ticket(self)
            return
        synchronous = await self._db.check_standbys()
        # Only a synchronous COMMIT waits (bounded by the timeout); without
        # synchronous standbys the wait comes after it.
        ticket = Ticket(self, self.timeout if synchronous else None, conn is not None, synchronous)
        if conn is not None or synchronous:
            try:
                yield ticket
            except BaseException as exc:
                if conn is None and _maybe_committed(exc):
                    self._fell_behind()
                raise
            return
        self._writes += 1
        try:
            try:
                yield ticket
            except BaseException as exc:
                if _maybe_committed(exc):
                    self._fell_behind()
                raise
            try:
                await self._db.wait_replicated(self.timeout)
            except BaseException as exc:
                self._fell_behind()
                if isinstance(exc, KMSError) and not isinstance(exc, DurabilityTimeoutError):
                    raise DurabilityTimeoutError(
                        f"the key write committed on the primary, but its replication could "
                        f"not be confirmed ({exc}); do not repeat it: the new versions are "
                        "used once a standby has them",
                        committed=True,
                    ) from exc
                raise
        finally:
            self._writes -= 1

    def _fell_behind(self) -> None:
        self._failures += 1
        self._behind = self._failures

    async def admit(self, version_ids: Iterable[str]) -> None:
        """Before a cold load's rows enter the cache: wait for a standby if they may
        hold a version this instance wrote and no standby has confirmed yet.

        Raises:
            DurabilityTimeoutError: no standby got there within the timeout.
        """
        if not self.replicated:
            return
        pending = self.unconfirmed.intersection(version_ids) if self.unconfirmed else set()
        if not (self._writes or self._behind or pending):
            return
        behind = self._behind
        await self._db.wait_replicated(self.timeout)
        if behind and self._behind == behind:
            self._behind = 0
        self.unconfirmed -= pending


def _maybe_committed(exc: BaseException) -> bool:
    """Whether a key write that raised ``exc`` may have committed.

    Library errors other than these leave nothing behind (a rollback);
    a cancellation or anything unexpected may have come during COMMIT.
    """
    if isinstance(exc, (OutcomeUnknownError, DurabilityTimeoutError)):
        return True
    return not isinstance(exc, KMSError)
