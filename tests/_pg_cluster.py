"""Private PostgreSQL topologies for tests: a primary with a streaming standby, PgBouncer.

Everything runs on loopback ports chosen free at start, in a temporary
directory, as the ``postgres`` user when the tests run as root (the server
and PgBouncer refuse root). Servers are tuned for speed, not safety
(``fsync=off``, small buffers): they are thrown away after the tests.

Without the binaries (PostgreSQL's ``initdb``, Debian's ``pgbouncer``) the
tests that need them skip locally; with ``CI`` set they fail instead, like
the SoftHSM tests: ``.ci/run`` installs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import asyncpg

__all__ = [
    "PgBouncer",
    "PrimaryStandby",
    "free_port",
    "postgres_bin",
    "require_binary",
    "wait_until",
]


def require_binary(path: str | None, what: str, package: str) -> str:
    """``path`` if it exists; else skip (or fail under CI) naming the package to install."""
    if path and os.path.exists(path):
        return path
    import pytest  # only here: scripts (benchmarks) import this module too

    message = f"{what} is not installed (apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run these tests")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(command: list[str], directory: pathlib.Path) -> list[str]:
    if os.geteuid() != 0:
        return command
    shutil.chown(directory, "postgres")
    for path in directory.rglob("*"):
        shutil.chown(path, "postgres")
    return ["runuser", "-u", "postgres", "--", *command]


def _run(command: list[str], directory: pathlib.Path) -> None:
    done = subprocess.run(
        _as_postgres(command, directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout[-2000:]}")


async def wait_until(condition: Any, *, timeout: float = 20.0, what: str = "a condition") -> None:
    """Await ``condition()`` (an async callable) until it is true, polling briefly."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def postgres_bin() -> pathlib.Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _postgres_bin() -> pathlib.Path:
    found = postgres_bin()
    initdb = require_binary(
        str(found / "initdb") if found else None, "PostgreSQL's initdb", "postgresql"
    )
    return pathlib.Path(initdb).parent


#: Settings for throwaway servers: quick to start, cheap on a shared machine.
_FAST = (
    "-c listen_addresses=127.0.0.1 -c shared_buffers=16MB -c fsync=off "
    "-c full_page_writes=off -c synchronous_commit=off -c max_connections=60 "
    "-c wal_sender_timeout=5s -c wal_receiver_status_interval=1s"
)


class PrimaryStandby:
    """A primary and a streaming hot standby (``pg_basebackup -R``) of our own.

    ``extra`` adds server options to both (``-c name=value ...``).
    """

    def __init__(self, *, extra: str = "") -> None:
        self.bin = _postgres_bin()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kms-pg-pair-"))
        self.primary_port = free_port()
        self.standby_port = free_port()
        self.extra = extra
        self.primary_dsn = f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres"
        self.standby_dsn = f"postgresql://postgres@127.0.0.1:{self.standby_port}/postgres"

    def _pg_ctl(self, data: str, port: int, action: str) -> None:
        options = f"-p {port} -k {self.dir} {_FAST} {self.extra}"
        _run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.dir / data),
                "-o",
                options,
                "-l",
                str(self.dir / f"{data}.log"),
                "-w",
                "-t",
                "60",
                "-m",
                "immediate" if action == "stop" else "fast",
                action,
            ],
            self.dir,
        )

    def start(self) -> None:
        _run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.dir / "primary"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            self.dir,
        )
        self._pg_ctl("primary", self.primary_port, "start")
        _run(
            [
                str(self.bin / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary_port),
                "-U",
                "postgres",
                "-D",
                str(self.dir / "standby"),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            self.dir,
        )
        self._pg_ctl("standby", self.standby_port, "start")

    def stop(self) -> None:
        for data, port in (("standby", self.standby_port), ("primary", self.primary_port)):
            with contextlib.suppress(Exception):
                self._pg_ctl(data, port, "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    async def primary_lsn(self) -> str:
        conn = await asyncpg.connect(self.primary_dsn)
        try:
            return str(await conn.fetchval("select pg_current_wal_insert_lsn()::text"))
        finally:
            await conn.close()

    async def wait_for_replay(self, timeout: float = 20.0) -> None:
        """Until the standby has replayed everything the primary had written on the call."""
        target = await self.primary_lsn()
        standby = await asyncpg.connect(self.standby_dsn)
        try:

            async def caught_up() -> bool:
                # Paused replay never catches up: the caller resumes it first.
                return bool(
                    await standby.fetchval(
                        "select pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target
                    )
                )

            await wait_until(caught_up, timeout=timeout, what="the standby to replay")
        finally:
            await standby.close()

    async def standby_execute(self, sql: str) -> None:
        conn = await asyncpg.connect(self.standby_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


class PgBouncer:
    """A PgBouncer process in transaction mode in front of ``host:port``, any database.

    Connections as ``postgres`` without a password (auth_type trust); at most
    ``pool_size`` server connections per database and user.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 5432, pool_size: int = 2) -> None:
        # Debian installs it in /usr/sbin, which a non-root PATH may lack.
        found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.binary = require_binary(found, "PgBouncer", "pgbouncer")
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kms-pgbouncer-"))
        self.port = free_port()
        self.target = (host, port)
        self.pool_size = pool_size
        self.process: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        host, port = self.target
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            "server_lifetime = 3600\n"
        )
        command = _as_postgres([self.binary, str(self.dir / "pgbouncer.ini")], self.dir)
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "pgbouncer.log").read_text() if self.dir.exists() else ""
                raise RuntimeError(f"PgBouncer did not start: {log[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            # runuser passes SIGTERM on to PgBouncer.
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
