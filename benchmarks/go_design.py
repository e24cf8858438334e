"""An imitation of the Go package's design, as cheap as Python allows (target 1's baseline).

The Go package's ``GetWrapper`` reads ``kms_collection_version`` before every
encrypt and decrypt, even on a cache hit, and when the value differs from
the last one it saw it drops every cached wrapper of every scope
(reference/go-kms-behaviour.md, section 3.5). A miss then loads the pair
with four more statements (root key, root key versions, data key, data key
versions) and unwraps every version.

This imitation does exactly that, synchronously, over an in-process
connection as cheap as the Go package's own: PostgreSQL through libpq itself
(psycopg's compiled ``pq`` layer, prepared statements, binary results, no
Python driver around it) and SQLite through the standard library's
``sqlite3`` module. The crypto and the envelope are kms_async's own fast
code, so only the design differs. Key writes made elsewhere (another
instance creating or rotating keys) are played by :meth:`GoDesign.write_elsewhere`:
one bump of the collection version, on another connection, outside the
timed work.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_async import AeadWrapper, BlobInfo
from kms_async._blob import encode_suffix, envelope_header, nonces, take_nonce
from kms_async._wrappers import unwrap_key

STATEMENTS = {
    "version": "select version from kms_collection_version",
    "root_key": "select private_id from kms_root_key where scope_id = $1",
    "root_versions": (
        "select private_id, version, key from kms_root_key_version"
        " where root_key_id = $1 order by version desc"
    ),
    "data_key": "select private_id from kms_data_key where root_key_id = $1 and purpose = $2",
    "data_versions": (
        "select private_id, version, key, root_key_version_id from kms_data_key_version"
        " where data_key_id = $1 order by version desc"
    ),
}
BUMP = "update kms_collection_version set version = version + 1"

Rows = list[tuple[Any, ...]]


class SqliteSession:
    """Statements through the stdlib sqlite3 module (C), autocommit."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._sql = {name: sql.replace("$", "?") for name, sql in STATEMENTS.items()}

    def fetch(self, name: str, *args: str) -> Rows:
        return self._conn.execute(self._sql[name], args).fetchall()

    def execute(self, sql: str) -> None:
        self._conn.execute(sql)

    def close(self) -> None:
        self._conn.close()


class LibpqSession:
    """Prepared statements through libpq (psycopg's compiled pq layer), binary results."""

    def __init__(self, dsn: str) -> None:
        import psycopg
        from psycopg import pq

        self._pq = pq
        self._conn = psycopg.connect(_libpq_dsn(dsn), autocommit=True)
        self._pg = self._conn.pgconn
        for name, sql in STATEMENTS.items():
            result = self._pg.prepare(name.encode(), sql.encode())
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise RuntimeError(result.error_message.decode())
        self._decode: dict[str, tuple[Callable[[bytes], Any], ...]] = {
            "version": (_int,),
            "root_key": (bytes.decode,),
            "root_versions": (bytes.decode, _int, bytes),
            "data_key": (bytes.decode,),
            "data_versions": (bytes.decode, _int, bytes, bytes.decode),
        }

    def fetch(self, name: str, *args: str) -> Rows:
        result = self._pg.exec_prepared(
            name.encode(), [a.encode() for a in args] or None, result_format=1
        )
        if result.status != self._pq.ExecStatus.TUPLES_OK:
            raise RuntimeError(result.error_message.decode())
        decoders = self._decode[name]
        return [
            tuple(d(result.get_value(row, col)) for col, d in enumerate(decoders))
            for row in range(result.ntuples)
        ]

    def execute(self, sql: str) -> None:
        self._conn.execute(sql)

    def close(self) -> None:
        self._conn.close()


def _int(value: bytes) -> int:
    return int.from_bytes(value, "big", signed=True)


def _libpq_dsn(dsn: str) -> str:
    """asyncpg takes ``?search_path=``; libpq wants it in ``options``."""
    parts = urllib.parse.urlsplit(dsn)
    query = []
    for key, value in urllib.parse.parse_qsl(parts.query):
        if key == "search_path":
            query.append(("options", f"-csearch_path={value}"))
        else:
            query.append((key, value))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class _Pair:
    """One pooled wrapper, as the Go package caches it: newest version first."""

    __slots__ = ("aead", "by_suffix", "suffix")

    def __init__(self, versions: list[tuple[str, AESGCM]]) -> None:
        self.aead = versions[0][1]
        self.suffix = encode_suffix(versions[0][0])
        self.by_suffix = {encode_suffix(v): a for v, a in versions}


class GoDesign:
    """``GetWrapper`` then the wrapper's encrypt/decrypt, per call."""

    def __init__(self, session: Any, writer: Any, root: AeadWrapper) -> None:
        self._session = session
        self._writer = writer
        self._root = root
        self._seen: int | None = None
        self._cache: dict[tuple[str, str], _Pair] = {}
        self.flushes = 0
        self.loads = 0

    def _wrapper(self, scope_id: str, purpose: str) -> _Pair:
        ((version,),) = self._session.fetch("version")
        if version != self._seen:
            # Any write anywhere: every cached wrapper of every scope goes.
            self._cache.clear()
            self._seen = version
            self.flushes += 1
        else:
            pair = self._cache.get((scope_id, purpose))
            if pair is not None:
                return pair
        pair = self._load(scope_id, purpose)
        self._cache[(scope_id, purpose)] = pair
        return pair

    def _load(self, scope_id: str, purpose: str) -> _Pair:
        self.loads += 1
        fetch = self._session.fetch
        ((root_key_id,),) = fetch("root_key", scope_id)
        roots = {
            version_id: AESGCM(self._root.decrypt_sync(BlobInfo.from_bytes(wrapped)))
            for version_id, _, wrapped in fetch("root_versions", root_key_id)
        }
        ((data_key_id,),) = fetch("data_key", root_key_id, purpose)
        versions = [
            (version_id, AESGCM(unwrap_key(roots[root_id], root_id, version_id, wrapped)))
            for version_id, _, wrapped, root_id in fetch("data_versions", data_key_id)
        ]
        return _Pair(versions)

    def encrypt(self, scope_id: str, purpose: str, plaintext: bytes) -> bytes:
        pair = self._wrapper(scope_id, purpose)
        try:
            nonce = take_nonce()
        except IndexError:
            nonce = nonces()
        sealed = pair.aead.encrypt(nonce, plaintext, None)
        return b"".join((envelope_header(len(sealed) + 12), nonce, sealed, pair.suffix))

    def decrypt(self, scope_id: str, purpose: str, ciphertext: bytes) -> bytes:
        pair = self._wrapper(scope_id, purpose)
        # The Go package unmarshals the BlobInfo (compiled protobuf) and
        # picks the version by key id; kms_async's own envelope check stands
        # in for it at about the same cost.
        aead = pair.by_suffix[ciphertext[-len(pair.suffix) :]]
        header = len(envelope_header(len(ciphertext) - len(pair.suffix) - 3))
        body = ciphertext[header : -len(pair.suffix)]
        return aead.decrypt(body[:12], body[12:], None)

    def write_elsewhere(self) -> None:
        """A key write by another instance: the collection version moves."""
        self._writer.execute(BUMP)

    def close(self) -> None:
        self._session.close()
        self._writer.close()


def open_go_design(dialect: str, dsn: str, path: str | None, root: AeadWrapper) -> GoDesign | str:
    """The imitation over the benchmark's database, or why it cannot run."""
    if dialect == "sqlite":
        assert path is not None
        return GoDesign(SqliteSession(path), SqliteSession(path), root)
    try:
        import psycopg
        from psycopg import pq
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if pq.__impl__ == "python":
        return (
            f"psycopg {psycopg.__version__} has no compiled libpq layer "
            "(pip install 'psycopg[binary]')"
        )
    return GoDesign(LibpqSession(dsn), LibpqSession(dsn), root)
