"""The one async-resource base: ``async with`` closes with ``aclose()``."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

__all__ = ["AsyncResource"]

_R = TypeVar("_R", bound="AsyncResource")


class AsyncResource:
    """An object with an idempotent ``aclose()``, usable as ``async with``.

    Subclasses that connect lazily may override :meth:`_enter` to connect
    eagerly when entered.
    """

    __slots__ = ()

    async def __aenter__(self: _R) -> _R:
        await self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _enter(self) -> None:
        """Called by ``async with`` before the block runs; nothing by default."""

    async def aclose(self) -> None:
        raise NotImplementedError
