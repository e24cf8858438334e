"""Private PostgreSQL primaries and streaming standbys, for failover tests and the soak.

Each server runs from the binaries under /usr/lib/postgresql/*/bin in a
temporary directory, on a loopback port of its own, as the ``postgres`` OS
user when run as root (the server refuses to run as root). Nothing else on
the machine is touched: every process is found through its own data
directory's postmaster.pid, and killed by that id.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

from _pg_cluster import free_port, postgres_bin

__all__ = ["Cluster", "Server", "postgres_bin"]


class Server:
    """One server: its data directory, port and processes."""

    def __init__(self, cluster: Cluster, name: str, port: int | None = None) -> None:
        self.cluster = cluster
        self.data = cluster.dir / name
        self.port = port or free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # A socket directory of its own: a server killed with SIGKILL leaves
        # its socket lock file behind, naming a process that may not be
        # reaped yet, which would stop a new server on the same port.
        self.sockets = cluster.dir / f"{name}.sockets"
        self.sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.sockets, "postgres")

    def pg_ctl(self, action: str, *more: str) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
        self.cluster.run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data) + ".log",
            "-w",
            "-t",
            "30",
            *more,
            action,
        )

    def start(self) -> None:
        try:
            self.pg_ctl("start")
        except subprocess.CalledProcessError as exc:
            log = pathlib.Path(str(self.data) + ".log")
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{self.data.name} did not start on port {self.port}:\n{tail}"
            ) from exc

    def promote(self) -> None:
        self.pg_ctl("promote")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("stop", "-m", "immediate")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self, kind: str) -> list[int]:
        """The server's processes whose title names ``kind`` (``walsender``, ...)."""
        pid = self.postmaster_pid()
        if pid is None:
            return []
        return [child for child in _children(pid) if kind in _cmdline(child)]

    def pause(self, kind: str) -> list[int]:
        """SIGSTOP the server's ``kind`` processes; returns their ids for :meth:`resume`."""
        paused = self.processes(kind)
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        return paused

    def resume(self, paused: list[int]) -> None:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def pause_replication(self) -> list[int]:
        """SIGSTOP this primary's WAL senders: its standbys receive nothing more,
        and pg_stat_replication keeps their last reported positions."""
        return self.pause("walsender")

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started: the server dies at once."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = _children(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        # Children started between the listing and the kill (a new backend).
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Cluster:
    """A primary and its standbys in one temporary directory."""

    def __init__(self, bin_dir: pathlib.Path) -> None:
        self.bin = bin_dir
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kms-pg-cluster-"))
        self.servers: list[Server] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")

    def run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def primary(self, *, synchronous: bool = False) -> Server:
        """initdb and start a primary that accepts streaming standbys."""
        server = Server(self, f"node{len(self.servers)}")
        self.run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        settings = [
            "wal_level = replica",
            "max_wal_senders = 10",
            "wal_keep_size = '64MB'",
            # A test server: SIGKILL loses no data without fsync (the OS keeps it).
            "fsync = off",
            "shared_buffers = '16MB'",
            "max_connections = 60",
        ]
        if synchronous:
            settings.append("synchronous_standby_names = '*'")
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")
        server.start()
        self.servers.append(server)
        return server

    def standby(self, primary: Server, port: int | None = None) -> Server:
        """A streaming standby of ``primary`` (pg_basebackup -R), started."""
        server = Server(self, f"node{len(self.servers)}", port)
        self.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(server.data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        server.start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
