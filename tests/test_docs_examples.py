"""Every Python and shell block of the docs and the README runs, as a reader would run it.

Each page runs top to bottom in a temporary directory of its own, once per
database the page names (``<!-- docs-test: databases=sqlite,postgres -->``,
the default; ``none`` runs it once without one). ``DATABASE_URL`` and
``KMS_DATABASE_URL`` point at an empty database: a new SQLite file, or a new
PostgreSQL database on ``KMS_TEST_POSTGRES_DSN``'s server; ``KMS_ROOT_KEY`` holds a
random key.

- ``python`` blocks run in one namespace per page, in this process; a
  top-level ``await`` works as in ``python -m asyncio``.
- ``bash``/``sh`` blocks run in bash with ``set -euo pipefail``; variables
  and the working directory carry over to the next block, of either kind.
- ``console`` blocks hold ``$ command`` lines, each followed by the output it
  must print; ``...`` matches any text within a line, or any lines when it
  stands alone on one.
- Other languages (``text``, ``sql``, ``json``, ...) are not run; a block
  without a language fails ``test_every_block_names_its_language``.

A comment right before a block changes what happens to it:

- ``<!-- docs-test: skip REASON -->``: not run; the reason is required.
- ``<!-- docs-test: only postgres -->`` (or ``sqlite``): run in that
  database's run of the page only.
- ``<!-- docs-test: file NAME -->``: appended to ``NAME`` in the page's
  directory instead of being run (a later block runs the file).
- ``<!-- docs-test: background port=8000 -->``: a shell block that starts a
  server; it runs in the background until the page ends, and the page goes
  on once the port accepts connections. The harness picks a free port and
  writes it for every ``8000`` in the page's shell blocks.
- ``<!-- docs-test: needs softhsm -->`` / ``needs moto``: the page needs
  SoftHSM2 (the PKCS#11 tests' token, named by ``HSM_TOKEN`` and ``HSM_PIN``;
  a page that adds keys to it must use labels the tests do not use) or an
  AWS KMS stand-in (moto's server, holding ``alias/kms-root``, reached
  through ``AWS_ENDPOINT_URL``). Without SoftHSM2 the page skips locally and
  fails under CI.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
POSTGRES_DSN = os.environ.get("KMS_TEST_POSTGRES_DSN")

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell"}
CONSOLE = {"console"}
NOT_RUN = {"text", "sql", "json", "toml", "ini", "yaml", "dockerfile", "diff", "svg"}

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<body>.*?)\s*-->")
# How long a background server may take to listen, and a block to finish.
_SERVER_START = 30.0
_BLOCK_TIMEOUT = 60.0


@dataclasses.dataclass
class Block:
    page: pathlib.Path
    line: int
    lang: str
    code: str
    markers: list[str]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def marker(self, name: str) -> str | None:
        for marker in self.markers:
            word, _, rest = marker.partition(" ")
            if word == name:
                return rest.strip()
        return None


@dataclasses.dataclass
class Page:
    path: pathlib.Path
    blocks: list[Block]
    databases: list[str]

    @property
    def needs(self) -> set[str]:
        return {b.marker("needs") or "" for b in self.blocks} - {""}


def parse(path: pathlib.Path) -> Page:
    """The page's fenced blocks, with the ``docs-test`` markers just before each."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    databases = ["sqlite", "postgres"]
    pending: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        for found in _MARKER.finditer(line):
            body = found.group("body")
            if body.startswith("databases="):
                names = body.partition("=")[2].split(",")
                databases = [] if names == ["none"] else [n.strip() for n in names]
            else:
                pending.append(body)
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip() and not _MARKER.search(line):
                pending = []
            i += 1
            continue
        indent, mark = len(fence.group("indent")), fence.group("fence")
        info = fence.group("info").strip()
        lang = info.split()[0].strip("{}.") if info else ""
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != mark:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(path, i - len(body), lang, "\n".join(body) + "\n", pending))
        pending = []
        i += 1
    return Page(path, blocks, databases)


def _page_params() -> Iterator[Any]:
    for path in PAGES:
        page = parse(path)
        runs = PYTHON | SHELL | CONSOLE
        if not any(b.lang in runs and b.marker("skip") is None for b in page.blocks):
            continue
        name = str(path.relative_to(ROOT))
        for database in page.databases or ["none"]:
            yield pytest.param(path, database, id=f"{name}-{database}")


# -- the services some blocks need ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _SERVER_START
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on port {port} within {_SERVER_START} s")


class _Databases:
    """New, empty PostgreSQL databases on the test server; dropped on a thread.

    A whole database rather than a schema: the pages' DSNs then work unchanged
    with every client they use (asyncpg, psycopg2, SQLAlchemy, yoyo, dbmate).
    Dropping one takes a checkpoint (about 0.3 s), so the drops run on a
    thread while the next pages run.
    """

    def __init__(self) -> None:
        self._drops = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="docs-drop")
        self._pending: list[concurrent.futures.Future[None]] = []

    def _admin(self) -> Any:
        import psycopg2

        admin = psycopg2.connect(POSTGRES_DSN)
        admin.autocommit = True
        return admin

    def _run(self, sql: str) -> None:
        admin = self._admin()
        try:
            with admin.cursor() as cursor:
                cursor.execute(sql)
        finally:
            admin.close()

    @contextlib.contextmanager
    def new(self) -> Iterator[str]:
        if not POSTGRES_DSN:
            if os.environ.get("CI"):
                pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
            pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
        name = "kms_docs_" + secrets.token_hex(6)
        self._run(f"create database {name}")
        try:
            yield urllib.parse.urlunsplit(urllib.parse.urlsplit(POSTGRES_DSN)._replace(path=name))
        finally:
            drop = f"drop database if exists {name} with (force)"
            self._pending.append(self._drops.submit(self._run, drop))

    def close(self) -> None:
        self._drops.shutdown(wait=True)
        for done in self._pending:
            done.result()


@pytest.fixture(scope="module")
def databases() -> Iterator[_Databases]:
    made = _Databases()
    try:
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def _softhsm(env: dict[str, str]) -> Iterator[None]:
    """The PKCS#11 tests' SoftHSM2 token (SoftHSM2 reads its configuration once per process)."""
    from test_root_pkcs11 import require_softhsm

    hsm = require_softhsm()
    env.update(
        SOFTHSM2_CONF=os.environ["SOFTHSM2_CONF"],
        HSM_LIB=hsm.lib_path,
        HSM_TOKEN=hsm.token_label,
        HSM_PIN=hsm.pin,
    )
    yield


@contextlib.contextmanager
def _moto(env: dict[str, str]) -> Iterator[None]:
    """The AWS tests' moto server (one per process), holding a key ``alias/kms-root``."""
    import boto3
    from test_root_aws import moto_endpoint

    endpoint = moto_endpoint()
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": endpoint,
        # Nothing beyond loopback: no instance metadata, no profile of the machine's.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    client = boto3.client(
        "kms",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key = client.create_key()["KeyMetadata"]["KeyId"]
    client.create_alias(AliasName="alias/kms-root", TargetKeyId=key)
    env.update(aws)
    try:
        yield
    finally:
        client.delete_alias(AliasName="alias/kms-root")
        client.close()


# -- running a page -----------------------------------------------------------------


class Session:
    """One run of one page: its directory, environment, Python namespace and servers."""

    def __init__(self, page: Page, workdir: pathlib.Path, env: dict[str, str]) -> None:
        self.page = page
        self.workdir = workdir
        self.env = env
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.loop = asyncio.new_event_loop()
        self.servers: list[subprocess.Popen[bytes]] = []
        self.ports: dict[str, str] = {}

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, block: Block) -> None:
        if (name := block.marker("file")) is not None:
            path = self.workdir / name
            with open(path, "a") as file:
                # The parts of a Python file are shown without the blank lines between them.
                if path.stat().st_size and block.lang in PYTHON:
                    file.write("\n\n")
                file.write(block.code)
        elif block.lang in PYTHON:
            self.python(block)
        elif block.lang in SHELL:
            port = block.marker("background")
            if port is not None:
                self.background(block, port.partition("=")[2])
            else:
                self.shell(block.code, block)
        elif block.lang in CONSOLE:
            self.console(block)

    def python(self, block: Block) -> None:
        code = compile(
            block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
        os.environ.clear()
        os.environ.update(self.env)
        try:
            result = eval(code, self.namespace)
            if asyncio.iscoroutine(result):
                self.loop.run_until_complete(result)
        finally:
            self.env = dict(os.environ)

    def _ported(self, code: str) -> str:
        for documented, real in self.ports.items():
            code = re.sub(rf"\b{documented}\b", real, code)
        return code

    def shell(self, code: str, block: Block) -> str:
        state = self.workdir / ".docs-test-env"
        script = (
            # set -a: plain assignments carry over to the next block too.
            f"set -euo pipefail -a\n{self._ported(code)}\n"
            f'env -0 > {state}; printf "%s" "$PWD" > {state}.pwd\n'
        )
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.env.get("PWD", self.workdir),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=_BLOCK_TIMEOUT,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{block.where}: exit status {done.returncode}\n--- script\n{code}"
                f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
            )
        pairs = state.read_bytes().split(b"\0")
        self.env = dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
        self.env["PWD"] = (self.workdir / ".docs-test-env.pwd").read_text()
        return done.stdout

    def background(self, block: Block, documented_port: str) -> None:
        port = str(_free_port())
        self.ports[documented_port] = port
        with open(self.workdir / f"server-{port}.log", "w") as log:
            server = subprocess.Popen(
                ["bash", "-c", f"exec {self._ported(block.code).strip()}"],
                cwd=self.env.get("PWD", self.workdir),
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.servers.append(server)
        try:
            _wait_for_port(int(port), server, f"{block.where} ({block.code.strip()})")
        except AssertionError as exc:
            log = (self.workdir / f"server-{port}.log").read_text()
            raise AssertionError(f"{exc}\n--- its stderr\n{log}") from None

    def console(self, block: Block) -> None:
        commands: list[tuple[str, list[str]]] = []
        for line in block.code.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands and commands[-1][0].endswith("\\") and not commands[-1][1]:
                commands[-1] = (commands[-1][0] + "\n" + line, [])
            elif commands:
                commands[-1][1].append(line)
            elif line.strip():
                raise AssertionError(f"{block.where}: output before the first '$ ' command")
        for command, expected in commands:
            output = self.shell(command, block)
            got = [line.rstrip() for line in output.rstrip("\n").splitlines()]
            want = [line.rstrip() for line in "\n".join(expected).rstrip("\n").splitlines()]
            if not _matches(got, want):
                raise AssertionError(
                    f"{block.where}: `{command}` printed\n" + "\n".join(got)
                    + "\n--- the page says\n" + "\n".join(want)
                )  # fmt: skip


def _matches(got: list[str], want: list[str]) -> bool:
    """``...`` matches any text within a line, or any lines when it stands alone."""
    pattern = []
    for line in want:
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?[^\n]*")
        else:
            pattern.append(r"[^\n]*".join(re.escape(part) for part in line.split("...")))
    return re.fullmatch("\n".join(pattern), "\n".join(got)) is not None


@pytest.mark.parametrize(("path", "database"), list(_page_params()))
def test_page_runs(
    path: pathlib.Path, database: str, tmp_path: pathlib.Path, databases: _Databases
) -> None:
    page = parse(path)
    runnable = [
        b for b in page.blocks if b.marker("skip") is None and b.marker("only") in (None, database)
    ]
    with contextlib.ExitStack() as stack:
        if database == "postgres":
            dsn = stack.enter_context(databases.new())
        else:
            dsn = f"sqlite:///{tmp_path}/app.db"
        env = {
            **os.environ,
            "PWD": str(tmp_path),
            "KMS_ROOT_KEY": __import__("base64").b64encode(secrets.token_bytes(32)).decode(),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        if database != "none":
            env.update(DATABASE_URL=dsn, KMS_DATABASE_URL=dsn)
        if "softhsm" in page.needs:
            stack.enter_context(_softhsm(env))
        if "moto" in page.needs:
            stack.enter_context(_moto(env))
        saved_env, saved_cwd, saved_path = dict(os.environ), os.getcwd(), list(sys.path)
        session = Session(page, tmp_path, env)
        try:
            os.chdir(tmp_path)
            sys.path.insert(0, str(tmp_path))
            for block in runnable:
                os.chdir(session.env.get("PWD", tmp_path))
                session.run(block)
        finally:
            session.close()
            # Modules the page imported from its directory (app.py...) go with it.
            for name, module in list(sys.modules.items()):
                if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                    del sys.modules[name]
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path[:] = saved_path


def test_every_block_names_its_language() -> None:
    unnamed = [b.where for p in PAGES for b in parse(p).blocks if not b.lang]
    assert not unnamed, (
        f"code blocks without a language (```python, ```bash, ```text...): {unnamed}"
    )
    unknown = [
        f"{b.where} ({b.lang})"
        for p in PAGES
        for b in parse(p).blocks
        if b.lang not in PYTHON | SHELL | CONSOLE | NOT_RUN
    ]
    assert not unknown, f"code blocks in a language the harness does not know: {unknown}"


def test_every_skip_says_why() -> None:
    bare = [b.where for p in PAGES for b in parse(p).blocks if b.marker("skip") == ""]
    assert not bare, f"docs-test: skip without a reason at {bare}"


def _anchors(path: pathlib.Path) -> set[str]:
    """The ids MkDocs gives the page's headings."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = re.sub(r"[`*]", "", line.lstrip("#").strip()).lower()
            anchors.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title)).strip("-"))
    return anchors


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 200, (
        "the README is a front page: move detail to docs/"
    )
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists() or (anchor and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"
