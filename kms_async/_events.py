"""Audit events: key changes made through one KMS, and refused decryptions.

A KMS opened with ``on_event=callback`` hands the callback a frozen
:class:`KeyEvent` for every key change it commits (one per scope, or per
(scope, purpose) where the change is that narrow) and a
:class:`DecryptionRefused` for every decryption it refuses. Events name ids
and reasons, never key material. The callback may be a plain function,
called inline right after the commit, or a coroutine function, whose calls
run one after another in a task of their own so that the operation never
waits for them. A callback that raises is logged and forgotten: auditing
must not break the operation it reports.

Every change is also counted here (by kind, and refusals by reason), with or
without a callback: the metrics (``_metrics``) read the counts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import getpass
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal

from ._errors import (
    DecryptionError,
    KeyIntegrityError,
    KeyNotFoundError,
    KeySuspendedError,
    KeyUnusableError,
    UnknownKeyVersionError,
    WrapperError,
)
from ._validate import show

__all__ = [
    "Actor",
    "DecryptionRefused",
    "EventKind",
    "Events",
    "KeyEvent",
    "RefusalReason",
    "refusal_reason",
]

logger = logging.getLogger("kms_async")

EventKind = Literal[
    "created",
    "rotated",
    "rewrapped",
    "bound",
    "suspended",
    "resumed",
    "revoked",
    "destroyed",
    "root_wrapper_added",
    "root_wrapper_replaced",
    "decryption_refused",
]

RefusalReason = Literal[
    "suspended",
    "unusable",
    "integrity",
    "unknown_version",
    "authentication",
    "malformed",
    "no_keys",
]

#: Every kind of key change, in the order the docs list them (metrics report each).
CHANGE_KINDS: tuple[str, ...] = EventKind.__args__[:-1]  # type: ignore[attr-defined]
#: Every refusal reason.
REFUSAL_REASONS: tuple[str, ...] = RefusalReason.__args__  # type: ignore[attr-defined]

#: Seconds aclose() waits for an async callback to take the events still queued.
DRAIN_SECONDS = 5.0
#: Deliveries an async callback may fall behind by; later ones are dropped (and counted).
MAX_QUEUED = 100_000

Callback = Callable[["KeyEvent"], object]


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: this process, and the name the application gave (``actor=``).

    ``user`` is the operating system's login name of the process (``None``
    when it cannot be told), ``host`` the machine's host name, ``pid`` the
    process id; ``name`` is the ``actor`` passed to :meth:`KMS.open
    <kms_async.KMS.open>`, such as a service name. The library cannot know
    which end user of the application asked for a change: log that beside
    the event where the application knows it.
    """

    name: str | None
    user: str | None
    host: str
    pid: int

    @classmethod
    def of_this_process(cls, name: str | None) -> Actor:
        try:
            user: str | None = getpass.getuser()
        except (OSError, KeyError, ImportError):
            user = None
        return cls(name=name, user=user, host=socket.gethostname(), pid=os.getpid())


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyEvent:
    """One key change made through a KMS, reported after it committed.

    Attributes:
        kind: what happened (see :data:`EventKind`).
        time: when this instance saw it commit, by the local clock, in UTC.
        scope_id: the scope changed (``None`` for root wrapper changes).
        purpose: the purpose changed; ``None`` when the change covers every
            key of the scope (created by ``create_keys``, rotated, rewrapped,
            bound); ``"rootKey"`` for a root key version.
        version_id: the key version the change is about: the scope's new
            root key version (created, rotated), the new data key version
            (created by ``reconcile_keys``), the version suspended, resumed,
            revoked or destroyed; ``None`` otherwise.
        actor: who made it (see :class:`Actor`).
        in_transaction: the change was written inside the caller's
            transaction (``conn=``) and commits or rolls back with it: the
            event is sent when the library's part is done, before the caller
            commits.
        detail: more about the change, when there is more: the root
            wrapper's key id, why a rotation happened (``"policy"``, ...).
    """

    kind: EventKind
    time: datetime.datetime
    scope_id: str | None
    purpose: str | None
    version_id: str | None
    actor: Actor
    in_transaction: bool = False
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON-ready values (time as ISO 8601 text, actor as a dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["time"] = self.time.isoformat()
        out["actor"] = dataclasses.asdict(self.actor)
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DecryptionRefused(KeyEvent):
    """A decryption this KMS refused (``kind`` is ``"decryption_refused"``).

    ``version_id`` is the key version the ciphertext names, when it names
    one; ``reason`` says why (see :data:`RefusalReason`). ``in_transaction``
    is always false.
    """

    reason: RefusalReason


def refusal_reason(exc: BaseException) -> RefusalReason | None:
    """Which refusal an error of a decryption is; None for errors that are not refusals.

    Refusals are decisions about the ciphertext or its key; bad arguments,
    a closed KMS, and a database or root wrapper that failed for the moment
    are failures of the call, not refusals.
    """
    if isinstance(exc, KeySuspendedError):
        return "suspended"
    if isinstance(exc, KeyIntegrityError):
        return "integrity"
    if isinstance(exc, KeyUnusableError) or (isinstance(exc, WrapperError) and not exc.retryable):
        # The root wrapper cannot unwrap the key (every version of the pair,
        # for a WrapperError from the load): not a passing failure.
        return "unusable"
    if isinstance(exc, UnknownKeyVersionError):
        return "unknown_version"
    if isinstance(exc, DecryptionError):
        return "malformed"
    if isinstance(exc, KeyNotFoundError):
        return "no_keys"
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Events:
    """Counts every change and refusal, and hands events to the callback, if any."""

    def __init__(self, callback: Callback | None, actor: Actor) -> None:
        self.callback = callback
        self.actor = actor
        #: Changes by kind and refusals by reason, since the KMS opened.
        self.changes: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()
        self._is_async = callback is not None and _is_coroutine_function(callback)
        self._queue: collections.deque[Iterator[KeyEvent]] = collections.deque()
        self._consumer: asyncio.Task[None] | None = None
        #: Tasks of awaitables a plain callback returned.
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Deliveries dropped because an async callback fell MAX_QUEUED behind.
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        """Whether there is a callback (writes collect the ids events need only then)."""
        return self.callback is not None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- reporting ---------------------------------------------------------

    def changed(
        self,
        kind: EventKind,
        count: int,
        items: Callable[[], Iterable[tuple[str | None, str | None, str | None]]],
        *,
        in_transaction: bool = False,
        detail: str | None = None,
    ) -> None:
        """``count`` changes of one kind committed; ``items()`` gives their
        (scope, purpose, version id), called only when there is a callback."""
        self.changes[kind] += count
        if self.callback is None or not count:
            return
        when = _now()
        actor = self.actor
        self._deliver(
            KeyEvent(
                kind=kind,
                time=when,
                scope_id=scope_id,
                purpose=purpose,
                version_id=version_id,
                actor=actor,
                in_transaction=in_transaction,
                detail=detail,
            )
            for scope_id, purpose, version_id in items()
        )

    def refused(
        self, scope_id: str, purpose: str, version_id: str | None, reason: RefusalReason
    ) -> None:
        self.refusals[reason] += 1
        if self.callback is None:
            return
        event = DecryptionRefused(
            kind="decryption_refused",
            time=_now(),
            scope_id=scope_id,
            purpose=purpose,
            version_id=version_id,
            actor=self.actor,
            reason=reason,
        )
        self._deliver(iter((event,)))

    # -- delivery ----------------------------------------------------------

    def _deliver(self, events: Iterator[KeyEvent]) -> None:
        if self._is_async:
            # Built lazily as the task takes them: a bulk change over a
            # million scopes holds one iterator here, not a million events.
            if len(self._queue) >= MAX_QUEUED:
                # A callback that cannot keep up (a flood of refused
                # decryptions, say) must not grow memory without bound.
                if not self.dropped:
                    logger.warning(
                        "kms_async: the on_event callback is %d deliveries behind; dropping "
                        "events until it catches up",
                        MAX_QUEUED,
                    )
                self.dropped += 1
                return
            self._queue.append(events)
            if self._consumer is None or self._consumer.done():
                self._consumer = self._spawn(self._consume())
            return
        callback = self.callback
        assert callback is not None
        for event in events:
            try:
                result = callback(event)
            except Exception as exc:
                _log_failure(event, exc)
                continue
            if inspect.isawaitable(result):
                # A plain callable that returned an awaitable (a lambda over a
                # coroutine function, say): run it without waiting for it.
                self._track(self._spawn(_guarded(result, event)))

    async def _consume(self) -> None:
        callback = self.callback
        assert callback is not None
        while self._queue:
            for event in self._queue.popleft():
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    _log_failure(event, exc)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        loop: asyncio.AbstractEventLoop | None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
            if loop is None:
                raise
        return loop.create_task(coro)  # type: ignore[arg-type]

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """Stop delivering (a KMS that failed to open)."""
        self._queue.clear()
        for task in [*self._tasks, self._consumer]:
            if task is not None:
                task.cancel()

    async def aclose(self, timeout: float | None = None) -> None:
        """Let pending async deliveries finish, for at most ``timeout`` (DRAIN_SECONDS)."""
        timeout = DRAIN_SECONDS if timeout is None else timeout
        pending: set[asyncio.Future[Any]] = set(self._tasks)
        if self._consumer is not None and not self._consumer.done():
            pending.add(self._consumer)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
            logger.warning(
                "kms_async: the on_event callback did not take every event within %.0f s of "
                "aclose(); the rest were dropped",
                timeout,
            )
        self._queue.clear()


async def _guarded(awaitable: Awaitable[Any], event: KeyEvent) -> None:
    try:
        await awaitable
    except Exception as exc:
        _log_failure(event, exc)


def _log_failure(event: KeyEvent, exc: Exception) -> None:
    # The event holds ids only; the exception is the application's own.
    logger.warning(
        "kms_async: the on_event callback raised %s for a %r event (scope %s); the "
        "operation itself succeeded",
        type(exc).__name__,
        event.kind,
        show(event.scope_id) if event.scope_id is not None else "-",
        exc_info=exc,
    )


def _is_coroutine_function(callback: object) -> bool:
    if inspect.iscoroutinefunction(callback):
        return True
    call = getattr(type(callback), "__call__", None)  # noqa: B004 - an instance's async __call__
    return call is not None and inspect.iscoroutinefunction(call)
