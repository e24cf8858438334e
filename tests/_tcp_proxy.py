"""A TCP proxy on loopback that can lose a COMMIT's reply or stop relaying.

It stands between the KMS and PostgreSQL so tests can make the network fail
in the two ways a driver cannot tell apart from the inside:

* ``cut_after_commit()``: the next COMMIT reaches the server, which commits,
  and the client's connection is then closed before the reply gets back;
* ``partition()``: every connection, open or new, stops relaying in both
  directions without closing (packets dropped, no reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse

# A simple-query message: 'Q', an int32 length, then the text and a NUL.
_COMMIT = b"Q\x00\x00\x00\x0bcommit\x00"


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.commits_cut = 0
        self._cut = False
        self._partitioned = asyncio.Event()
        self._healed = asyncio.Event()
        self._healed.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, dsn: str) -> tuple[TcpProxy, str]:
        """A running proxy in front of ``dsn``'s server, and the DSN through it."""
        parts = urllib.parse.urlsplit(dsn)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        user = f"{parts.username}@" if parts.username else ""
        return proxy, urllib.parse.urlunsplit(
            parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}")
        )

    def cut_after_commit(self) -> None:
        self._cut = True

    def partition(self) -> None:
        self._healed.clear()

    def heal(self) -> None:
        self._healed.set()

    async def aclose(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        # Aborting every socket ends every relay; the tasks then finish.
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._healed.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            client_lost = asyncio.Event()
            to_server = asyncio.ensure_future(
                self._pipe(reader, up_writer, from_client=True, client=writer, lost=client_lost)
            )
            to_client = asyncio.ensure_future(
                self._pipe(up_reader, writer, from_client=False, client=writer, lost=client_lost)
            )
            try:
                await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in (to_server, to_client):
                    pipe.cancel()
                await asyncio.gather(to_server, to_client, return_exceptions=True)
                # The server side is closed gently, so a commit in flight finishes.
                with contextlib.suppress(OSError):
                    up_writer.close()
                self._writers.discard(up_writer)
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        from_client: bool,
        client: asyncio.StreamWriter,
        lost: asyncio.Event,
    ) -> None:
        while True:
            data = await source.read(65536)
            await self._healed.wait()
            if not data or lost.is_set():
                return
            sink.write(data)
            await sink.drain()
            if from_client and self._cut and _COMMIT in data:
                # The COMMIT is on its way to the server; the reply is not
                # coming back to this client.
                self._cut = False
                self.commits_cut += 1
                lost.set()
                client.transport.abort()
                return
