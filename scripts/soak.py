"""Soak run: several worker processes use one database while faults happen.

    python scripts/soak.py --duration 20            # PostgreSQL (a private cluster), then SQLite
    python scripts/soak.py --dialect sqlite --duration 600 --workers 6
    python scripts/soak.py --failover --duration 60  # primary + standby, primary SIGKILLed

Workers encrypt rows for many tenants, store them in an application table
(restrict foreign key to the data key versions), read them back, rotate
tenants' keys (with and without rewrap) and revoke versions nothing uses,
once they have been superseded for the revoke grace. During a PostgreSQL run
the server is restarted once, a rotating worker is killed with SIGKILL in the
middle of a rotation and started again, a forger sends malformed and forged
key change notifications, and an operator kills every other connection now
and then (so key change checks, loads and commits fail). At the end every
stored row must decrypt to what was written (the report counts unreadable
rows: it must be 0), every rotation must be
whole (a root key version and one version of every data key, or nothing),
and every error a worker saw must be a retryable KMSError subclass or an
expected refusal (KeyInUseError). The run is bounded in time; all traffic
stays on 127.0.0.1.

PostgreSQL runs in a throwaway cluster made with initdb in a temporary
directory on a free port, so restarting it disturbs nothing else on the
machine. Pass --pg-dsn to use an existing server instead (it is then not
restarted).

--failover runs a private primary and a streaming standby (synchronous
with --standby sync, the default, or asynchronous), reached through one
multi-host DSN with target_session_attrs=read-write. Writer processes
encrypt rows and store them, and keep a local log of every row acknowledged
(the database may lose rows in a failover; keys lost would make the logged
ciphertexts unreadable); a rotator rotates with durability="replicated" and
logs the versions each rotation reported durable. Halfway through, the
primary is killed with SIGKILL while a rotation is in flight, the standby
is promoted, and a new standby is made from it on the old primary's port
(as an operator or Patroni would). The report gives rows written, rows
whose ciphertext decrypts afterwards (must equal acknowledged), key versions
created and lost (0 among those reported durable), and how long writes and
key writes were unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import pathlib
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kms_async

PURPOSES = ["database", "oidc"]
APP_TABLE = """
create table if not exists soak_row (
  id text primary key,
  tenant text not null,
  key_version_id text not null
    references kms_data_key_version (private_id) on delete restrict,
  ciphertext bytea not null,
  digest text not null
)
"""
# Revokers work on the first tenants only, so the others keep contiguous
# version numbers that the final check can compare one to one.
REVOCABLE = 4
#: Every worker's bound; with no successful check for 4x as long it stops encrypting.
MAX_STALENESS = 0.5
#: Superseded versions are revoked only after this long (> 4 x MAX_STALENESS).
REVOKE_GRACE = 3.0


# -- a private PostgreSQL cluster ----------------------------------------------


class PrivateCluster:
    """A PostgreSQL server of our own in a temporary directory (needs initdb)."""

    def __init__(self) -> None:
        found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise SystemExit("soak: PostgreSQL binaries (initdb) not found; use --pg-dsn")
        self.bin = found[-1].parent
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kms-soak-pg-"))
        self.data = self.dir / "data"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.dir, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.pg_ctl("start")

    def pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "-m",
            "fast",
            action,
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.pg_ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# -- workers ---------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.bad: list[str] = []

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] += 1
        # OutcomeUnknownError: the operator killed the connection during a
        # COMMIT; the verification below checks whatever came of it.
        # DurabilityTimeoutError (committed): a rotation in flight when the
        # primary died (--failover); the final check sees what came of it.
        expected = isinstance(exc, kms_async.KMSError) and (
            exc.retryable
            or isinstance(
                exc,
                (
                    kms_async.KeyInUseError,
                    kms_async.OutcomeUnknownError,
                    kms_async.DurabilityTimeoutError,
                ),
            )
        )
        if not expected and len(self.bad) < 20:
            self.bad.append(f"{name}: {exc}")


async def asyncpg_connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn)


async def app_connection(dsn: str) -> Any:
    if dsn.startswith("sqlite"):
        import aiosqlite

        conn = await aiosqlite.connect(dsn[len("sqlite:///") :], isolation_level=None)
        await conn.execute("pragma busy_timeout = 10000")
        await conn.execute("pragma foreign_keys = on")
        return conn
    import asyncpg

    return await asyncpg.create_pool(dsn, min_size=1, max_size=4)


class VersionRevokedMeanwhile(Exception):
    """The row's key version was revoked between encrypt and insert.

    Another process rotated and revoked the version while this one still had
    it cached (for at most max_staleness); the restrict foreign key refused
    the row, nothing was stored, and the application encrypts again.
    """


async def app_execute(db: Any, sql: str, *args: Any) -> list[Any]:
    """One statement on the app's own connection, driver errors as KMSError."""
    import sqlite3

    import asyncpg

    try:
        if hasattr(db, "acquire"):
            async with db.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        # :pn bound from a dict: Python 3.12.0-3.12.3 warn on ?n bound from a tuple.
        named = re.sub(r"\$(\d+)", r":p\1", sql)
        params = {f"p{n}": value for n, value in enumerate(args, 1)}
        return list(await db.execute_fetchall(named, params))
    except (asyncpg.ForeignKeyViolationError, sqlite3.IntegrityError) as exc:
        raise VersionRevokedMeanwhile(str(exc)) from exc
    except (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.ReadOnlySQLTransactionError,
        asyncpg.exceptions.CannotConnectNowError,
        sqlite3.OperationalError,
    ) as exc:
        raise kms_async.TransientStorageError(str(exc)) from exc


async def worker(
    role: str,
    index: int,
    dsn: str,
    root_key: bytes,
    tenants: int,
    until: float,
    marker: pathlib.Path | None,
) -> Stats:
    stats = Stats()
    root = kms_async.AeadWrapper(root_key, key_id="soak-root")
    kms = None
    while kms is None and time.time() < until:
        try:
            kms = await kms_async.KMS.open(
                dsn,
                purposes=PURPOSES,
                root_wrapper=root,
                max_staleness=MAX_STALENESS,
                revoke_grace=REVOKE_GRACE,
            )
        except kms_async.KMSError as exc:
            stats.error(exc)
            await asyncio.sleep(0.2)
    if kms is None:
        return stats
    db = await app_connection(dsn)
    rng = random.Random(f"{role}-{index}-{os.getpid()}")
    try:

        async def writer() -> None:
            while time.time() < until:
                tenant = f"tenant-{rng.randrange(tenants)}"
                purpose = rng.choice(PURPOSES)
                try:
                    row_id = f"{role}{index}-{os.getpid()}-{secrets.token_hex(6)}"
                    data = secrets.token_bytes(rng.choice([16, 200, 3000]))
                    ct = await kms.encrypt(tenant, purpose, data, aad=row_id.encode())
                    version = kms_async.BlobInfo.from_bytes(ct).key_id
                    await app_execute(
                        db,
                        "insert into soak_row (id, tenant, key_version_id, ciphertext, digest)"
                        " values ($1, $2, $3, $4, $5)",
                        row_id,
                        f"{tenant}|{purpose}",
                        version,
                        ct,
                        hashlib.sha256(data).hexdigest(),
                    )
                    stats.ops["write"] += 1
                    rows = await app_execute(
                        db,
                        "select id, tenant, ciphertext, digest from soak_row"
                        " where tenant = $1 order by id desc limit 1",
                        f"{tenant}|{purpose}",
                    )
                    for rid, owner, cipher, digest in rows:
                        scope, used = owner.split("|")
                        plain = await kms.decrypt(scope, used, bytes(cipher), aad=rid.encode())
                        if hashlib.sha256(plain).hexdigest() != digest:
                            stats.bad.append(f"row {rid} decrypted to different data")
                        stats.ops["read"] += 1
                except VersionRevokedMeanwhile:
                    stats.ops["write retried: version revoked meanwhile"] += 1
                except Exception as exc:
                    stats.error(exc)
                    await asyncio.sleep(0.05)

        async def rotator() -> None:
            while time.time() < until:
                tenant = f"tenant-{rng.randrange(tenants)}"
                try:
                    if marker is not None:
                        # Synchronous on purpose: the marker must exist before
                        # the rotation starts, for the kill to land inside it.
                        marker.write_text(tenant)  # noqa: ASYNC240
                    await kms.rotate_keys(tenant, rewrap=rng.random() < 0.5)
                    stats.ops["rotate"] += 1
                except Exception as exc:
                    stats.error(exc)
                    await asyncio.sleep(0.05)
                finally:
                    if marker is not None:
                        marker.unlink(missing_ok=True)  # noqa: ASYNC240
                await asyncio.sleep(rng.uniform(0.0, 0.05))

        async def revoker() -> None:
            while time.time() < until:
                tenant = f"tenant-{rng.randrange(REVOCABLE)}"
                try:
                    keys = await kms.list_keys(tenant)
                    await kms.rewrap_keys(tenant)
                    for key in keys:
                        for version in key.versions[:-1]:
                            try:
                                await kms.revoke_key_version(version.id, scope_id=tenant)
                                stats.ops["revoke"] += 1
                            except (kms_async.KeyInUseError, kms_async.KeyNotFoundError):
                                stats.ops["revoke refused"] += 1
                except Exception as exc:
                    stats.error(exc)
                await asyncio.sleep(rng.uniform(0.1, 0.3))

        async def forger() -> None:
            """Anyone who can connect can NOTIFY: junk, and versions announced early."""
            while time.time() < until:
                try:
                    conn = await asyncpg_connect(dsn)
                    try:
                        oid = await conn.fetchval(
                            "select to_regclass('kms_collection_version')::oid"
                        )
                        channel = f"kms_key_change_{oid}"
                        while time.time() < until:
                            version = await conn.fetchval(
                                "select version from kms_collection_version"
                            )
                            payloads = [
                                json.dumps({"v": version + 1, "s": []}),
                                json.dumps({"v": version + 1, "s": None}),
                                '{"v": Infinity, "s": null}',
                                "[" * 3000,
                                json.dumps({"v": version + 2, "s": [f"tenant-{rng.randrange(9)}"]}),
                            ]
                            await conn.executemany(
                                "select pg_notify($1, $2)", [(channel, p) for p in payloads]
                            )
                            stats.ops["forged notifications"] += len(payloads)
                            await asyncio.sleep(rng.uniform(0.01, 0.05))
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.close()
                except Exception as exc:
                    # Killed by the operator, or the server restarting.
                    stats.ops[f"forger: {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.2)

        async def operator() -> None:
            """Kills every other connection now and then: checks, loads and writes fail."""
            while time.time() < until:
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                try:
                    conn = await asyncpg_connect(dsn)
                    try:
                        killed = await conn.fetchval(
                            "select count(pg_terminate_backend(pid)) from pg_stat_activity"
                            " where datname = current_database() and pid <> pg_backend_pid()"
                            " and backend_type = 'client backend'"
                        )
                    finally:
                        await conn.close()
                    stats.ops["connections killed"] += int(killed or 0)
                except Exception as exc:
                    stats.ops[f"operator: {type(exc).__name__}"] += 1

        body = {
            "writer": writer,
            "rotator": rotator,
            "revoker": revoker,
            "forger": forger,
            "operator": operator,
        }[role]
        await asyncio.gather(*(body() for _ in range(4 if role == "writer" else 1)))
        stats.ops["failed key change checks"] += kms._freshness.failed_checks
    finally:
        await kms.aclose()
        await db.close()
    return stats


async def failover_worker(
    role: str,
    index: int,
    dsn: str,
    root_key: bytes,
    tenants: int,
    until: float,
    marker: pathlib.Path | None,
    log: pathlib.Path,
) -> Stats:
    """A writer or the rotator of a --failover run; each logs what it was told.

    Writers log every row whose insert was acknowledged (id, ciphertext,
    digest, time); the rotator logs every version a rotation reported
    durable, and when.
    """
    stats = Stats()
    root = kms_async.AeadWrapper(root_key, key_id="soak-root")
    kms = None
    while kms is None and time.time() < until:
        try:
            kms = await kms_async.KMS.open(
                dsn,
                purposes=PURPOSES,
                root_wrapper=root,
                max_staleness=MAX_STALENESS,
                revoke_grace=REVOKE_GRACE,
                durability="replicated",
                durability_timeout=2.0,
            )
        except kms_async.KMSError as exc:
            stats.error(exc)
            await asyncio.sleep(0.2)
    if kms is None:
        return stats
    db = await app_connection(dsn)
    rng = random.Random(f"{role}-{index}-{os.getpid()}")
    # asyncpg's pool logs a traceback each time it cannot reconnect while
    # the primary is down: expected here, and the errors are counted anyway.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    out = log.open("a")
    try:

        async def writer() -> None:
            while time.time() < until:
                tenant = f"tenant-{rng.randrange(tenants)}"
                purpose = rng.choice(PURPOSES)
                row_id = f"{role}{index}-{os.getpid()}-{secrets.token_hex(6)}"
                data = secrets.token_bytes(rng.choice([16, 200, 3000]))
                try:
                    ct = await kms.encrypt(tenant, purpose, data, aad=row_id.encode())
                except kms_async.KMSError as exc:
                    stats.ops["encrypt failed"] += 1
                    stats.error(exc)
                    await asyncio.sleep(0.02)
                    continue
                try:
                    await app_execute(
                        db,
                        "insert into soak_row (id, tenant, key_version_id, ciphertext, digest)"
                        " values ($1, $2, $3, $4, $5)",
                        row_id,
                        f"{tenant}|{purpose}",
                        kms_async.BlobInfo.from_bytes(ct).key_id,
                        ct,
                        hashlib.sha256(data).hexdigest(),
                    )
                except Exception as exc:
                    stats.error(exc)
                    await asyncio.sleep(0.02)
                    continue
                stats.ops["write"] += 1
                record = [row_id, tenant, purpose, base64.b64encode(ct).decode()]
                out.write(
                    json.dumps(["row", time.time(), *record, hashlib.sha256(data).hexdigest()])
                )
                out.write("\n")

        async def rotator() -> None:
            while time.time() < until:
                tenant = f"tenant-{rng.randrange(tenants)}"
                try:
                    if marker is not None:
                        marker.write_text(tenant)  # noqa: ASYNC240
                    await kms.rotate_keys(tenant, rewrap=rng.random() < 0.3)
                    done = time.time()
                    stats.ops["rotate"] += 1
                    versions = [v.id for k in await kms.list_keys(tenant) for v in k.versions]
                    out.write(json.dumps(["durable", done, tenant, versions]) + "\n")
                except kms_async.DurabilityTimeoutError as exc:
                    stats.ops[
                        "rotation committed, not confirmed"
                        if exc.committed
                        else "rotation refused: no standby"
                    ] += 1
                    await asyncio.sleep(0.05)
                except Exception as exc:
                    stats.error(exc)
                    await asyncio.sleep(0.05)
                finally:
                    if marker is not None:
                        marker.unlink(missing_ok=True)  # noqa: ASYNC240
                await asyncio.sleep(rng.uniform(0.0, 0.05))

        body = writer if role == "fwriter" else rotator
        await asyncio.gather(*(body() for _ in range(4 if role == "fwriter" else 1)))
        stats.ops["failed key change checks"] += kms._freshness.failed_checks
    finally:
        out.close()
        await kms.aclose()
        await db.close()
    return stats


def worker_main(args: argparse.Namespace) -> None:
    marker = pathlib.Path(args.marker) if args.marker else None
    if args.role in ("fwriter", "frotator"):
        stats = asyncio.run(
            failover_worker(
                args.role,
                args.index,
                args.dsn,
                base64.b64decode(args.root_key),
                args.tenants,
                args.until,
                marker,
                pathlib.Path(args.result + ".log"),
            )
        )
        pathlib.Path(args.result).write_text(
            json.dumps({"ops": stats.ops, "errors": stats.errors, "bad": stats.bad})
        )
        return
    stats = asyncio.run(
        worker(
            args.role,
            args.index,
            args.dsn,
            base64.b64decode(args.root_key),
            args.tenants,
            args.until,
            marker,
        )
    )
    pathlib.Path(args.result).write_text(
        json.dumps({"ops": stats.ops, "errors": stats.errors, "bad": stats.bad})
    )


# -- the run -------------------------------------------------------------------


async def prepare(dsn: str, root_key: bytes, tenants: int) -> None:
    for attempt in range(50):
        try:
            await kms_async.migrate(dsn)
            break
        except kms_async.TransientStorageError:
            await asyncio.sleep(0.2 * (attempt + 1))
    root = kms_async.AeadWrapper(root_key, key_id="soak-root")
    async with await kms_async.KMS.open(
        dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
    ) as kms:
        await kms.reconcile_keys([f"tenant-{i}" for i in range(tenants)])
    db = await app_connection(dsn)
    try:
        await app_execute(db, APP_TABLE)
    finally:
        await db.close()


async def verify(dsn: str, root_key: bytes, tenants: int) -> dict[str, Any]:
    """Every row decrypts; every rotation is whole; nothing half-written."""
    root = kms_async.AeadWrapper(root_key, key_id="soak-root")
    problems: list[str] = []
    rows_checked = unreadable = 0
    db = await app_connection(dsn)
    try:
        async with await kms_async.KMS.open(
            dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
        ) as kms:
            for rid, owner, cipher, digest in await app_execute(
                db, "select id, tenant, ciphertext, digest from soak_row"
            ):
                scope, purpose = owner.split("|")
                rows_checked += 1
                try:
                    plain = await kms.decrypt(scope, purpose, bytes(cipher), aad=rid.encode())
                except kms_async.KMSError as exc:
                    unreadable += 1
                    if unreadable <= 5:
                        problems.append(f"row {rid} cannot be decrypted: {exc}")
                    continue
                if hashlib.sha256(plain).hexdigest() != digest:
                    problems.append(f"row {rid} does not match what was written")
            for i in range(tenants):
                keys = await kms.list_keys(f"tenant-{i}")
                counts = {k.purpose: [v.version for v in k.versions] for k in keys}
                if sorted(counts) != sorted([*PURPOSES, "rootKey"]):
                    problems.append(f"tenant-{i} has keys {sorted(counts)}")
                if any(not versions for versions in counts.values()):
                    problems.append(f"tenant-{i} has a key without versions")
                if i >= REVOCABLE:
                    expected = list(range(1, len(counts["rootKey"]) + 1))
                    for purpose, versions in counts.items():
                        if versions != expected:
                            problems.append(
                                f"tenant-{i} {purpose} versions {versions}, expected {expected}"
                            )
        orphans = await app_execute(
            db,
            "select count(*) from kms_data_key_version v where not exists"
            " (select 1 from kms_root_key_version r where r.private_id = v.root_key_version_id)",
        )
        if orphans[0][0]:
            problems.append(f"{orphans[0][0]} data key versions point at no root key version")
    finally:
        await db.close()
    if unreadable:
        problems.append(f"{unreadable} stored rows cannot be decrypted")
    return {"rows_checked": rows_checked, "unreadable": unreadable, "problems": problems}


def spawn(
    role: str,
    index: int,
    dsn: str,
    root_key: bytes,
    tenants: int,
    until: float,
    work: pathlib.Path,
    marker: pathlib.Path | None = None,
) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
    result = work / f"{role}-{index}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        __file__,
        "worker",
        "--role",
        role,
        "--index",
        str(index),
        "--dsn",
        dsn,
        "--root-key",
        base64.b64encode(root_key).decode(),
        "--tenants",
        str(tenants),
        "--until",
        str(until),
        "--result",
        str(result),
    ]
    if marker is not None:
        command += ["--marker", str(marker)]
    return subprocess.Popen(command), result


def run_dialect(dialect: str, args: argparse.Namespace) -> dict[str, Any]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="kms-soak-"))
    cluster = None
    faults: list[str] = []
    try:
        if dialect == "sqlite":
            dsn = f"sqlite:///{work}/soak.db"
        elif args.pg_dsn:
            dsn = args.pg_dsn
        else:
            cluster = PrivateCluster()
            cluster.start()
            dsn = cluster.dsn
        root_key = secrets.token_bytes(32)
        asyncio.run(prepare(dsn, root_key, args.tenants))
        started = time.time()
        until = started + args.duration
        marker = work / "rotating"
        roles = ["rotator", "revoker"] + ["writer"] * max(1, args.workers - 2)
        if dialect == "postgres":
            roles += ["forger", "operator"]
        procs = []
        for i, role in enumerate(roles):
            procs.append(
                spawn(
                    role,
                    i,
                    dsn,
                    root_key,
                    args.tenants,
                    until,
                    work,
                    marker if role == "rotator" else None,
                )
            )
        # Fault 1: restart the database a third of the way in.
        time.sleep(args.duration / 3)
        if cluster is not None:
            cluster.pg_ctl("restart")
            faults.append("PostgreSQL restarted")
        # Fault 2: SIGKILL the rotator while it is inside a rotation, then restart it.
        deadline = time.time() + args.duration / 3
        while time.time() < deadline and not marker.exists():
            time.sleep(0.001)
        rotator, _ = procs[0]
        rotator.send_signal(signal.SIGKILL)
        rotator.wait()
        faults.append(
            "rotator killed with SIGKILL" + (" during a rotation" if marker.exists() else "")
        )
        marker.unlink(missing_ok=True)
        procs[0] = spawn("rotator", 100, dsn, root_key, args.tenants, until, work, marker)
        for proc, _ in procs:
            proc.wait(timeout=args.duration + 120)
        totals: dict[str, Any] = {
            "ops": collections.Counter(),
            "errors": collections.Counter(),
            "bad": [],
        }
        for _, result in procs + [(None, p) for p in work.glob("*.json")]:
            if result.exists():
                data = json.loads(result.read_text())
                result.unlink()
                totals["ops"].update(data["ops"])
                totals["errors"].update(data["errors"])
                totals["bad"].extend(data["bad"])
        checked = asyncio.run(verify(dsn, root_key, args.tenants))
        return {
            "dialect": dialect,
            "seconds": round(time.time() - started, 1),
            "ops": dict(totals["ops"]),
            "errors seen": dict(totals["errors"]),
            "unexpected errors": totals["bad"],
            "faults survived": faults,
            **checked,
        }
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


# -- the failover run -------------------------------------------------------------


async def _standby_streams(primary_dsn: str, synchronous: bool | None = None) -> None:
    """Wait for a streaming standby; with ``synchronous`` set, (un)make it synchronous."""
    import asyncpg

    conn = await asyncpg.connect(primary_dsn)
    try:
        if synchronous is not None:
            names = "'*'" if synchronous else "''"
            await conn.execute(f"alter system set synchronous_standby_names = {names}")
            await conn.execute("select pg_reload_conf()")
        for _ in range(3000):
            if await conn.fetchval(
                "select count(*) from pg_stat_replication"
                " where state = 'streaming' and flush_lsn is not null"
            ):
                return
            await asyncio.sleep(0.01)
        raise SystemExit("soak: the standby never started streaming")
    finally:
        await conn.close()


async def _no_longer_synchronous(dsn: str) -> None:
    """What an operator (or Patroni) does on a promoted primary with no standby yet."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("alter system reset synchronous_standby_names")
        await conn.execute("select pg_reload_conf()")
    finally:
        await conn.close()


async def verify_failover(
    dsn: str, root_key: bytes, tenants: int, logs: list[pathlib.Path]
) -> dict[str, Any]:
    """Every acknowledged ciphertext decrypts; every version reported durable exists."""
    rows: list[list[Any]] = []
    durable: set[str] = set()
    for log in logs:
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry[0] == "row":
                rows.append(entry)
            else:
                durable.update(entry[3])
    root = kms_async.AeadWrapper(root_key, key_id="soak-root")
    decrypting = 0
    problems: list[str] = []
    db = await app_connection(dsn)
    try:
        stored = {r[0] for r in await app_execute(db, "select id from soak_row")}
        async with await kms_async.KMS.open(
            dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None
        ) as kms:
            for _, _, row_id, tenant, purpose, ct, digest in rows:
                try:
                    plain = await kms.decrypt(
                        tenant, purpose, base64.b64decode(ct), aad=row_id.encode()
                    )
                except kms_async.KMSError as exc:
                    if len(problems) < 5:
                        problems.append(f"acknowledged row {row_id} cannot be decrypted: {exc}")
                    continue
                if hashlib.sha256(plain).hexdigest() == digest:
                    decrypting += 1
            present = {
                v.id
                for i in range(tenants)
                for key in await kms.list_keys(f"tenant-{i}")
                for v in key.versions
            }
    finally:
        await db.close()
    lost = durable - present
    if decrypting != len(rows):
        problems.append(f"{len(rows) - decrypting} acknowledged rows do not decrypt")
    if lost:
        problems.append(f"{len(lost)} key versions reported durable are gone: {sorted(lost)[:5]}")
    return {
        "rows acknowledged": len(rows),
        "acknowledged rows that decrypt": decrypting,
        "acknowledged rows missing from the table": len({r[2] for r in rows} - stored),
        "key versions reported durable": len(durable),
        "key versions reported durable and lost": len(lost),
        "key versions at the end": len(present),
        "problems": problems,
        "_times": sorted(r[1] for r in rows),
        "_rotations": sorted(
            json.loads(line)[1]
            for log in logs
            for line in log.read_text().splitlines()
            if line.startswith('["durable"')
        ),
    }


def _outage(times: list[float], moment: float) -> float | None:
    """The longest pause between two consecutive ``times`` that ends after ``moment``
    (a reply already on its way when the server died may land just after it)."""
    pauses = [b - a for a, b in itertools.pairwise(times) if b > moment and a > moment - 10]
    return round(max(pauses), 3) if pauses else None


def run_failover(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from _pg_ha_cluster import Cluster, postgres_bin

    found = postgres_bin()
    if found is None:
        raise SystemExit("soak: PostgreSQL binaries (initdb) not found")
    synchronous = args.standby == "sync"
    work = pathlib.Path(tempfile.mkdtemp(prefix="kms-soak-"))
    cluster = Cluster(found)
    faults: list[str] = []
    try:
        primary = cluster.primary()
        standby = cluster.standby(primary)
        asyncio.run(_standby_streams(primary.dsn, synchronous))
        hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
        dsn = f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"
        root_key = secrets.token_bytes(32)
        asyncio.run(prepare(dsn, root_key, args.tenants))
        started = time.time()
        until = started + args.duration
        marker = work / "rotating"
        roles = ["frotator"] + ["fwriter"] * max(1, args.workers - 1)
        procs = [
            spawn(role, i, dsn, root_key, args.tenants, until, work, marker)
            if role == "frotator"
            else spawn(role, i, dsn, root_key, args.tenants, until, work)
            for i, role in enumerate(roles)
        ]
        time.sleep(args.duration / 2)
        # SIGKILL the primary while a rotation is in flight.
        deadline = time.time() + args.duration / 4
        while time.time() < deadline and not marker.exists():
            time.sleep(0.001)
        in_rotation = marker.exists()
        primary.kill()
        killed = time.time()
        faults.append("primary killed with SIGKILL" + (" during a rotation" if in_rotation else ""))
        standby.promote()
        promoted = time.time()
        faults.append(f"standby promoted {promoted - killed:.2f} s after the kill")
        if synchronous:
            asyncio.run(_no_longer_synchronous(standby.dsn))
        cluster.standby(standby, primary.port)
        asyncio.run(_standby_streams(standby.dsn, synchronous or None))
        faults.append(f"a new standby streams {time.time() - killed:.2f} s after the kill")
        for proc, _ in procs:
            proc.wait(timeout=args.duration + 120)
        totals: dict[str, Any] = {"ops": collections.Counter(), "errors": collections.Counter()}
        bad: list[str] = []
        for _, result in procs:
            if result.exists():
                data = json.loads(result.read_text())
                totals["ops"].update(data["ops"])
                totals["errors"].update(data["errors"])
                bad.extend(data["bad"])
        logs = [pathlib.Path(str(result) + ".log") for _, result in procs]
        checked = asyncio.run(
            verify_failover(dsn, root_key, args.tenants, [log for log in logs if log.exists()])
        )
        times = checked.pop("_times")
        rotations = checked.pop("_rotations")
        return {
            "mode": f"failover, {args.standby} standby",
            "seconds": round(time.time() - started, 1),
            "ops": dict(totals["ops"]),
            "errors seen": dict(totals["errors"]),
            "unexpected errors": bad,
            "faults survived": faults,
            "writes unavailable (s, longest pause between acknowledged rows)": _outage(
                times, killed
            ),
            "key writes unavailable (s, longest pause between durable rotations)": _outage(
                rotations, killed
            ),
            **checked,
        }
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    for name in ("role", "dsn", "root_key", "result", "marker"):
        w.add_argument(f"--{name.replace('_', '-')}", dest=name)
    w.add_argument("--index", type=int)
    w.add_argument("--tenants", type=int)
    w.add_argument("--until", type=float)
    parser.add_argument("--dialect", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per dialect")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (>= 3)")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--pg-dsn", help="use this server instead of a private cluster")
    parser.add_argument(
        "--failover",
        action="store_true",
        help="primary + standby; kill the primary mid-rotation, promote the standby",
    )
    parser.add_argument("--standby", choices=["sync", "async"], default="sync")
    args = parser.parse_args()
    if args.command == "worker":
        worker_main(args)
        return 0
    if args.failover:
        report = run_failover(args)
        print(json.dumps(report, indent=2))
        failed = bool(report["problems"] or report["unexpected errors"])
        print("soak: FAILED" if failed else "soak: passed")
        return 1 if failed else 0
    dialects = ["postgres", "sqlite"] if args.dialect == "both" else [args.dialect]
    failed = False
    for dialect in dialects:
        report = run_dialect(dialect, args)
        print(json.dumps(report, indent=2))
        if report["problems"] or report["unexpected errors"]:
            failed = True
    print("soak: FAILED" if failed else "soak: passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
