"""Servers on loopback that stand for a PostgreSQL server gone wrong.

* ``refusing_server(sqlstate, message)`` answers the startup like a server
  whose pg_hba.conf or password check refuses the client: an ErrorResponse
  with that SQLSTATE (the test server trusts everyone, so a real refusal
  cannot be had from it);
* ``hung_server()`` accepts connections and never says a word, like a server
  stopped with SIGSTOP or a firewall that swallows the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

_SSL_REQUEST_CODE = 80877103


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    return await reader.readexactly(length - 4)


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(
        code + text.encode() + b"\0"
        for code, text in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


@contextlib.asynccontextmanager
async def refusing_server(sqlstate: str, message: str) -> AsyncIterator[int]:
    """A server that refuses every client with ``sqlstate``; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            packet = await _read_packet(reader)
            if struct.unpack("!I", packet[:4])[0] == _SSL_REQUEST_CODE:
                writer.write(b"N")  # no TLS here; the startup message follows
                await writer.drain()
                await _read_packet(reader)
            writer.write(_error_response(sqlstate, message))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[int]:
    """A server that accepts and never answers; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
