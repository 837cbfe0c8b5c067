#!/usr/bin/env python3
"""The hooked libraries' own test suites, bare and with poolwatch on (issue 17).

For each end of the supported ranges (``oldest``: every range's lower bound; ``newest``:
the newest release inside each range, resolved by pip at run time), a virtual environment
in ``.compat/<end>`` gets poolwatch from this checkout (editable), the libraries pinned at
that end and their test requirements. For each library it downloads the source
distribution of the installed version from the package index, unpacks its tests (the
library's own sources removed, so that the installed build is what runs), and runs the
chosen test modules twice, side by side: bare, and with poolwatch instrumenting the test
process from before the library is imported, collections racing the tests every 20 ms
(``scripts/compat_plugin.py``). It fails when a test that passes bare does not pass
instrumented, when poolwatch hooked nothing of the library under test, when poolwatch
counted internal errors, or when a test fails bare that ``scripts/compat_known_bare.txt``
does not list (the list says why this environment cannot run each test it names).
Each pytest run has a network namespace of its own with only loopback up (``unshare``);
tests left unsettled (passing bare and not instrumented, or failing bare unlisted) are run
again at the end, bare then instrumented, with nothing else running, and judged by that.

    scripts/compat                        # both ends, every suite
    scripts/compat --end newest           # one end
    scripts/compat --suite urllib3 -v     # some suites; -v prints each run's log tail
    scripts/compat --serial               # bare and instrumented one after the other
    scripts/compat --prepare              # environments and sources only, no test run

Exit codes: 0 no difference; 1 a difference or a failed check (printed); 2 bad usage or
the set-up (venv, install, download) failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
WORK = ROOT / ".compat"
KNOWN_BARE = SCRIPTS / "compat_known_bare.txt"
DESELECTED = "[deselected]"
ENDS = ("oldest", "newest")
TEST_TIMEOUT = 120
"""pytest-timeout, seconds a test (the suites' own slowest take a few seconds)."""
JOBS = 3
LONGEST_FIRST = (
    "sqlalchemy",
    "redis",
    "requests",
    "urllib3",
    "sqlalchemy-asyncio",
    "httpx",
    "aiohttp",
    "httpcore",
    "botocore",
    "asyncpg",
    "aiobotocore",
)
"""Suites in the order they are started: the slowest first (measured here)."""
"""Suites run at once (each is two pytest processes). Most of the suites' time is spent
waiting (servers, timeouts, sleeps): one at a time, the CPU was busy 30% of the run."""
RUN_TIMEOUT = 600
RERUN_AT_MOST = 60
"""Unsettled tests of a suite run again alone, at most (more are not a matter of timing)."""
"""Seconds one pytest run may take in all before it is killed (the slowest takes ~100 s)."""


@dataclass(frozen=True)
class Suite:
    """A chosen set of one library's own test modules."""

    name: str
    distribution: str
    """Whose source distribution holds the tests."""
    adapter: str
    """The poolwatch adapter that must be hooked in the instrumented run."""
    paths: tuple[str, ...]
    args: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    """The library's own sources inside the sdist: removed, so the installed build runs."""
    keep: tuple[str, ...] = ()
    """Files under ``remove`` the tests read by path (SQLAlchemy's pytest plugin)."""
    imports: tuple[str, ...] = ()
    """Modules the instrumented run imports after ``instrument()``."""
    edits: tuple[tuple[str, str, str], ...] = ()
    """``(file, text, replacement)`` made in the unpacked tests where ``text`` is found:
    a later release's own fix of a flaw in its tests, applied to the older release."""
    env: dict[str, str] = field(default_factory=dict)
    ends: tuple[str, ...] = ENDS
    """The ends it runs at."""
    apart: tuple[str, ...] = ()
    """The distributions of an environment of its own (``.compat/<end>-<name>``), for a
    library that cannot be installed beside the others; empty: its end's shared one."""
    server: str = ""
    """A server the suite needs. ``redis``: a throw-away ``redis-server`` on a free loopback
    port started for each pytest run inside its network namespace, its URL given to the
    suite as ``--redis-url``, stopped after the run. ``postgres``: one throw-away PostgreSQL
    that compat.py starts before the suites and stops after them, reached through its Unix
    socket (``SERVER_ENV``)."""


SUITES = (
    Suite(
        "sqlalchemy",
        "sqlalchemy",
        "sqlalchemy",
        tuple(
            f"test/engine/test_{m}.py"
            for m in ("pool", "reconnect", "transaction", "execute", "logging", "parseconnect")
        ),
        remove=("lib/sqlalchemy",),
        keep=("lib/sqlalchemy/testing/plugin",),
    ),
    Suite(
        "sqlalchemy-asyncio",
        "sqlalchemy",
        "sqlalchemy",
        ("test/ext/asyncio",),
        args=("--db", "aiosqlite"),
        remove=("lib/sqlalchemy",),
        keep=("lib/sqlalchemy/testing/plugin",),
    ),
    Suite(
        "urllib3",
        "urllib3",
        "urllib3",
        (
            "test/test_connectionpool.py",
            "test/test_poolmanager.py",
            "test/with_dummyserver/test_connectionpool.py",
            "test/with_dummyserver/test_poolmanager.py",
            "test/with_dummyserver/test_socketlevel.py",
        ),
        remove=("src",),
        # urllib3 2.0's socket-level tests give a server thread 5 ms to read a request and
        # the client 10 ms to get its answer (LONG_TIMEOUT = 0.01): any other process on
        # the machine makes them fail, bare as instrumented. urllib3 later raised it to
        # 0.1 s (0.5 s on CI) for that reason; its CI value is used here.
        edits=(("test/__init__.py", "LONG_TIMEOUT = 0.01\n", "LONG_TIMEOUT = 0.5\n"),),
    ),
    Suite(
        "requests",
        "requests",
        "urllib3",
        ("tests",),
        remove=("src", "requests"),
    ),
    Suite(
        "botocore",
        "botocore",
        "urllib3",
        ("tests/unit/test_http_session.py", "tests/unit/test_endpoint.py"),
        remove=("botocore",),
    ),
    Suite(
        "httpcore",
        "httpcore",
        "httpx",
        (
            "tests/_async",
            "tests/_sync",
            "tests/test_api.py",
            "tests/test_cancellations.py",
            "tests/test_models.py",
        ),
        remove=("httpcore",),
        imports=("httpx",),
    ),
    Suite("httpx", "httpx", "httpx", ("tests/client",), remove=("httpx",)),
    Suite(
        "aiohttp",
        "aiohttp",
        "aiohttp",
        ("tests/test_connector.py", "tests/test_client_session.py"),
        # aiohttp's pytest.ini adds xdist, coverage and doctests of its sources: replaced by
        # its marker selection alone.
        args=("-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal"),
        remove=("aiohttp",),
    ),
    Suite(
        "redis",
        "redis",
        "redis",
        ("tests/test_connection_pool.py", "tests/test_asyncio/test_connection_pool.py"),
        # redis-py's pyproject adds -s and INFO logging of every test to the output.
        args=("-o", "addopts=", "-o", "log_cli_level=WARNING"),
        remove=("redis",),
        server="redis",
    ),
    # asyncpg's own pool tests (its sdist has them; psycopg_pool's sdist has no tests, and
    # psycopg's none either: they live in its repository only, so there is no psycopg_pool
    # suite). With PGHOST set, asyncpg's test base uses that running server as its
    # "cluster", reached through libpq's environment variables.
    Suite(
        "asyncpg",
        "asyncpg",
        "asyncpg",
        ("tests/test_pool.py",),
        remove=("asyncpg",),
        server="postgres",
    ),
    # aiobotocore's pools are aiohttp connectors, hooked by the aiohttp adapter (poolwatch
    # patches nothing of aiobotocore's; it reads the stack that makes a connector to name
    # it). Its HTTP session's tests and its S3 tests against moto's server, on the aiohttp
    # backend (HTTP_BACKEND unset); the localonly ones need real AWS credentials. Apart:
    # each aiobotocore release pins the botocore releases it was made for (3.10.0: 1.43.115
    # to 1.43.117), which is neither end's botocore (1.31.63; the newest, 1.44.x). Its range
    # (3.10 up to 4) holds one release so far: the newest end is both of its ends.
    Suite(
        "aiobotocore",
        "aiobotocore",
        "aiohttp",
        ("tests/test_httpsession.py", "tests/test_basic_s3.py"),
        args=("-o", "addopts=--import-mode=importlib", "-m", "not localonly"),
        remove=("aiobotocore",),
        ends=("newest",),
        apart=("aiohttp", "aiobotocore"),
    ),
)

KEPT_APART = frozenset(s.distribution for s in SUITES if s.apart)
"""Distributions only their own suite's environment installs."""


def runs_in(suite: Suite, env: Environment) -> bool:
    """Whether ``suite`` runs in ``env``: its end, and its own environment or the shared one."""
    return env.end in suite.ends and env.apart is (suite if suite.apart else None)


# The tests' own requirements, as each project lists them for its test runs (lint, docs,
# coverage and xdist left out), at each end. Unpinned: the newest that installs beside the
# library; pinned where the oldest library's tests need an older tool.
TEST_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "common": ("pytest", "pytest-timeout"),
    "sqlalchemy": ("aiosqlite", "greenlet"),
    "urllib3": (
        "anyio[trio]",
        "h2",
        "hypercorn",
        "pysocks",
        "pytest-socket",
        "quart",
        "quart-trio",
        "trio",
        "trustme",
    ),
    "requests": ("pytest-httpbin==2.1.0", "httpbin~=0.10.0", "pytest-mock", "trustme", "pysocks"),
    "botocore": ("jsonschema",),
    "httpcore": ("anyio", "trio", "pytest-trio", "h2", "socksio", "pytest-httpbin", "trustme"),
    # chardet 5.2: httpx's own pin (its tests assert what that detector guesses).
    "httpx": ("anyio", "trio", "uvicorn", "trustme", "chardet==5.2.0", "brotli", "zstandard", "h2"),
    # redis-py's dev_requirements.txt, for what its pool tests import (numpy, uvloop,
    # redis-entraid and the OTLP exporter serve other modules).
    "redis": ("pytest-asyncio", "packaging", "ujson", "pybreaker", "xxhash"),
    # asyncpg's test_pool.py needs nothing beyond pytest (its test extra is linters, uvloop
    # and Kerberos for other modules).
    "asyncpg": (),
    # aiobotocore's test group, for these two modules (its conftest starts moto's server).
    "aiobotocore": ("moto[server,s3]", "pytest-mock", "anyio", "trio"),
    "aiohttp": (
        "blockbuster",
        "coverage",  # its pytest.ini names coverage's warning class
        "freezegun",
        "pytest-mock",
        "re-assert",  # aiohttp 3.9's test_client_session
        "trustme",
        "proxy.py",
        "isal",
        "zlib-ng",
    ),
}


# pytest plugins one suite's requirements install, kept out of every other suite's runs:
# pytest-asyncio (redis-py's) warns at start-up where no asyncio_default_fixture_loop_scope
# is set, and httpx's, httpcore's and aiohttp's suites turn that warning into an error.
PLUGINS_OF: dict[str, tuple[str, ...]] = {"asyncio": ("redis",)}


# What the oldest end's tests need beyond that, pinned as those releases pinned them.
OLDEST_TEST_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # urllib3 2.0's dummyserver is tornado's (hypercorn and quart came later); on tornado
    # 6.3+ its servers answer nothing to 200 of the tests.
    "urllib3": ("tornado==6.2",),
}


SERVER_ENV: dict[str, dict[str, str]] = {}
"""By ``Suite.server``: the environment its runs get (set by ``servers()``)."""


@contextlib.contextmanager
def servers(suites: list[Suite]) -> Iterator[None]:
    """Start the servers the chosen suites need, on this machine, and stop them after.

    PostgreSQL: the test suite's throw-away cluster (``poolwatch/_demo/postgres.py``), as
    a superuser with a password; the runs reach it through its Unix socket, the one way
    into the host's server from a network namespace of their own (each has its own
    loopback)."""
    with contextlib.ExitStack() as stack:
        if any(s.server == "postgres" for s in suites):
            sys.path.insert(0, str(ROOT))
            from poolwatch._demo.postgres import PostgresCluster

            pg = stack.enter_context(PostgresCluster())
            log(f"  PostgreSQL {pg.socket_dir} (port {pg.port}) for the asyncpg suite")
            SERVER_ENV["postgres"] = {
                "PGHOST": str(pg.socket_dir),
                "PGPORT": str(pg.port),
                "PGUSER": pg.user,
                "PGPASSWORD": pg.password,
                "PGDATABASE": pg.dbname,
            }
        try:
            yield
        finally:
            SERVER_ENV.clear()


def started_servers(suites: list[Suite]) -> contextlib.ExitStack:
    """``servers(suites)`` entered, to be closed by the caller (on an early return, the
    cluster stops at interpreter exit)."""
    serving = contextlib.ExitStack()
    try:
        serving.enter_context(servers(suites))
    except Exception as error:  # PostgresError: no server binaries, or it did not start
        raise SetupError(f"a server the suites need: {error}") from error
    return serving


def log(message: str) -> None:
    print(message, flush=True)


class SetupError(Exception):
    """The environment could not be prepared (exit 2)."""


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, text=True, capture_output=True, check=False)
    if done.returncode != 0:
        raise SetupError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}"
            f"{done.stderr[-3000:]}"
        )
    return done


# -- environments ----------------------------------------------------------------------------


class Environment:
    """``.compat/<end>``: poolwatch from the checkout, the libraries at one end; or
    ``.compat/<end>-<suite>``, the environment of a suite kept ``apart``."""

    def __init__(self, end: str, apart: Suite | None = None) -> None:
        self.end = end
        self.apart = apart
        self.label = end if apart is None else f"{end}-{apart.name}"
        self.venv = WORK / self.label
        self.python = self.venv / "bin" / "python"
        self.versions: dict[str, str] = {}
        self.ready: concurrent.futures.Future[None] | None = None
        """Set by main(): the environment being prepared; suites wait for it."""
        self._downloading = threading.Lock()

    def pip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([str(self.python), "-m", "pip", "--disable-pip-version-check", *args])

    def ranges(self) -> dict[str, list[str]]:
        """Each declared range, by distribution, as the checkout's poolwatch declares it."""
        program = (
            "import json\n"
            "from poolwatch._versions import parse_requirement\n"
            "from poolwatch.adapters import ADAPTERS\n"
            "out = {}\n"
            "for a in ADAPTERS.values():\n"
            "    for text in a.requires + a.tested_with:\n"
            "        r = parse_requirement(text)\n"
            "        out[r.distribution] = [r.specifier, r.lowest()]\n"
            "print(json.dumps(out))\n"
        )
        ranges: dict[str, list[str]] = json.loads(run([str(self.python), "-c", program]).stdout)
        return ranges

    def prepare(self, fresh: bool) -> None:
        if fresh and self.venv.exists():
            shutil.rmtree(self.venv)
        if not self.python.exists():
            run([sys.executable, "-m", "venv", str(self.venv)])
            self.pip("install", "--quiet", "--upgrade", "pip")
            self.pip("install", "--quiet", "-e", str(ROOT))
        ranges = {
            distribution: spec
            for distribution, spec in self.ranges().items()
            if (distribution in self.apart.apart if self.apart else distribution not in KEPT_APART)
        }
        wanted = []
        for distribution, (specifier, lowest) in sorted(ranges.items()):
            wanted.append(
                f"{distribution}=={lowest}"
                if self.end == "oldest"
                else f"{distribution}{specifier.replace(' ', '')}"
            )
        for group in ("common", *sorted(ranges)):
            wanted.extend(TEST_REQUIREMENTS.get(group, ()))
            if self.end == "oldest":
                wanted.extend(OLDEST_TEST_REQUIREMENTS.get(group, ()))
        wanted = sorted(set(wanted))
        stamp = self.venv / "compat-requirements.txt"
        if not stamp.exists() or stamp.read_text() != "\n".join(wanted):
            log(f"  installing into {self.venv.relative_to(ROOT)}: {' '.join(wanted)}")
            self.pip("install", "--quiet", "--upgrade", *wanted)
            stamp.write_text("\n".join(wanted))
        freeze = self.pip("freeze", "--exclude-editable").stdout
        (self.venv / "freeze.txt").write_text(freeze)
        for line in freeze.splitlines():
            name, _, version = line.partition("==")
            self.versions[name.lower().replace("_", "-")] = version
        missing = [d for d in ranges if d not in self.versions]
        if missing:
            raise SetupError(f"{self.label}: not installed after pip install: {missing}")

    def sdist(self, distribution: str) -> Path:
        """The source distribution of ``distribution`` at the installed version, downloaded
        from the package index into ``.compat/sdists`` unless it is there already."""
        with self._downloading:  # two suites may share a distribution
            return self._sdist(distribution)

    def _sdist(self, distribution: str) -> Path:
        version = self.versions[distribution]
        sdists = WORK / "sdists"
        sdists.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(
            rf"^{re.escape(distribution)}-{re.escape(version)}\.tar\.gz$", re.IGNORECASE
        )
        found = [p for p in sdists.iterdir() if pattern.match(p.name)]
        if not found:
            # --no-binary for this distribution only: its build requirements (needed to read
            # the sdist's metadata) may come as wheels; with :all: pip builds Cython and
            # setuptools from source first, minutes each.
            self.pip(
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                distribution,
                "--dest",
                str(sdists),
                f"{distribution}=={version}",
            )
            found = [p for p in sdists.iterdir() if pattern.match(p.name)]
            if not found:
                raise SetupError(f"no sdist of {distribution}=={version} was downloaded")
        return found[0]

    def unpack(self, suite: Suite, copy: str) -> Path:
        """A fresh copy of ``suite``'s tests, without the library's own sources."""
        sdist = self.sdist(suite.distribution)
        where = WORK / "src" / f"{self.end}-{suite.name}-{copy}"
        if where.exists():
            shutil.rmtree(where)
        where.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            top = archive.getnames()[0].split("/")[0]
            if sys.version_info >= (3, 12):
                archive.extractall(where, filter="data")
            else:
                archive.extractall(where)  # a registry's sdist of a pinned version
        tree = where / top
        for path in suite.paths:
            if not (tree / path).exists():
                raise SetupError(f"{sdist.name} has no {path}: its tests are not shipped")
        kept: dict[str, Path] = {}
        for keep in suite.keep:
            kept[keep] = where / f"keep-{len(kept)}"
            shutil.copytree(tree / keep, kept[keep])
        for remove in suite.remove:
            if (tree / remove).exists():  # requests moved to src/ in 2.32
                shutil.rmtree(tree / remove)
        for keep, saved in kept.items():
            shutil.copytree(saved, tree / keep)
            shutil.rmtree(saved)
        for name, text, replacement in suite.edits:
            edited = tree / name
            content = edited.read_text()
            if text in content:
                edited.write_text(content.replace(text, replacement))
                with open(tree / "compat-edits.txt", "a") as applied:
                    applied.write(f"{name}: {text.strip()!r} -> {replacement.strip()!r}\n")
        return tree


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    seconds: float
    returncode: int | None
    result: dict[str, object] | None
    log: Path
    summary: str

    @property
    def outcomes(self) -> dict[str, str]:
        return dict(self.result["outcomes"]) if self.result else {}  # type: ignore[call-overload]


# Each pytest run gets a network namespace of its own with only loopback up (``unshare``):
# nothing a test does can leave the machine (the suites have tests that reach the Internet,
# or a non-routable address for a connect timeout: they fail at once here, and are listed
# in compat_known_bare.txt), and runs side by side cannot collide on the fixed ports some
# suites use (httpx's server is always on 127.0.0.1:8000).
_LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # IFF_UP
os.execv(sys.argv[1], sys.argv[1:])
"""


# Run inside the pytest run's own network namespace, before pytest: a throw-away
# redis-server on a free loopback port, its URL appended to the pytest command as
# --redis-url, stopped when pytest ends (a run killed for its time takes it along: the same
# process group).
_WITH_REDIS = """
import os, shutil, socket, subprocess, sys, tempfile, time
server, command = sys.argv[1], sys.argv[2:]
# 6379, redis' own port, where free (the run's own namespace): a few of the suites' tests
# connect there whatever --redis-url says; else (no namespace) any free port.
with socket.socket() as probe:
    try:
        probe.bind(("127.0.0.1", 6379))
    except OSError:
        probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
work = tempfile.mkdtemp(prefix="compat-redis-")
redis = subprocess.Popen(
    [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
     "--enable-debug-command", "yes",  # the suite's DEBUG ERROR tests of loading/OOM replies
     "--dir", work, "--logfile", os.path.join(work, "redis.log")],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        break
    except OSError:
        if redis.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"redis-server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
try:
    code = subprocess.call([*command, f"--redis-url=redis://127.0.0.1:{port}/0"])
finally:
    redis.terminate()
    redis.wait(10)
    shutil.rmtree(work, ignore_errors=True)
sys.exit(code)
"""


def server_wrapper(suite: Suite) -> list[str]:
    """The command prefix that starts the server ``suite`` needs around its pytest run."""
    if not suite.server or suite.server == "postgres":  # postgres: one for all (servers())
        return []
    if suite.server != "redis":
        raise SetupError(f"suite {suite.name}: unknown server {suite.server!r}")
    found = shutil.which("redis-server")
    if found is None:
        raise SetupError(
            f"suite {suite.name} needs redis-server: install Debian's 'redis-server' package"
        )
    return [sys.executable, "-S", "-E", "-c", _WITH_REDIS, found]


def isolation() -> list[str] | None:
    """The command prefix that runs a command in a fresh network namespace, or None."""
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        # -S -E: this interpreter must not load compat_site's sitecustomize (the pytest
        # process it becomes must be the first to).
        wrapper = [sys.executable, "-S", "-E", "-c", _LOOPBACK_UP]
        command = [*prefix, *wrapper, sys.executable, "-S", "-c", ""]
        try:
            done = subprocess.run(command, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return [*prefix, *wrapper]
    return None


def pytest_run(
    env: Environment,
    suite: Suite,
    mode: str,
    tree: Path,
    *,
    prefix: list[str] | None,
    only: list[str] | None = None,
    deselect: tuple[str, ...] = (),
) -> Run:
    """One pytest run of ``suite`` (or of the tests ``only`` names) in ``mode``."""
    label = mode if only is None else f"{mode}-rerun"
    out = tree / f"compat-{label}.json"
    log_path = WORK / "logs" / f"{env.end}-{suite.name}-{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environ = {
        **os.environ,
        **suite.env,
        **SERVER_ENV.get(suite.server, {}),
        "PYTHONPATH": f"{SCRIPTS / 'compat_site'}:{SCRIPTS}",
        "POOLWATCH_COMPAT_MODE": mode,
        "POOLWATCH_COMPAT_OUT": str(out),
        "POOLWATCH_COMPAT_IMPORTS": ",".join(suite.imports),
        "POOLWATCH_COMPAT_GUARD": "0" if prefix else "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if only is not None:
        wanted = tree / f"compat-{label}.txt"
        wanted.write_text("\n".join(only) + "\n")
        environ["POOLWATCH_COMPAT_ONLY"] = str(wanted)
    for name in [n for n in environ if n.startswith(("POOLWATCH_", "OTEL_"))]:
        if not name.startswith("POOLWATCH_COMPAT_") or name == "POOLWATCH_COMPAT_PID":
            del environ[name]  # poolwatch's defaults, whatever the caller's shell holds
    command = [
        *(prefix or []),
        *server_wrapper(suite),
        str(env.python),
        "-s",
        "-m",
        "pytest",
        *(sorted({t.split("::")[0] for t in only}) if only else suite.paths),
        *suite.args,
        *(
            arg
            for plugin, users in PLUGINS_OF.items()
            if suite.name not in users
            for arg in ("-p", f"no:{plugin}")
        ),
        *(f"--deselect={test}" for test in deselect),
        "-p",
        "compat_plugin",
        "-p",
        "no:cacheprovider",
        f"--timeout={TEST_TIMEOUT}",
        "-q",
        "-rN",
        "--color=no",
        "--durations=10",
        "--tb=native",  # pytest's own traceback formatting crashed on urllib3 2.0's SSL tests
    ]
    started = time.monotonic()
    returncode: int | None
    with open(log_path, "w") as output:
        output.write(f"$ cd {tree}\n$ {' '.join(command)}\n")
        output.flush()
        process = subprocess.Popen(
            command,
            cwd=tree,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            returncode = None
    seconds = time.monotonic() - started
    result = json.loads(out.read_text()) if out.exists() else None
    text = log_path.read_text(errors="replace")
    summaries = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", text, re.MULTILINE)
    summary = (
        summaries[-1]
        if summaries
        else (
            f"no summary: killed after {RUN_TIMEOUT} s"
            if returncode is None
            else f"no summary (exit {returncode})"
        )
    )
    return Run(label, seconds, returncode, result, log_path, summary)


# -- known-bare failures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A line of compat_known_bare.txt."""

    suite: str
    end: str
    test: str
    reason: str

    @property
    def deselected(self) -> bool:
        """Not run at all (the reason says why: its time, not the environment)."""
        return self.reason.startswith(DESELECTED)

    def matches(self, suite: str, end: str, nodeid: str) -> bool:
        return (
            self.suite == suite
            and self.end in ("*", end)
            and (nodeid == self.test or nodeid.startswith((self.test + "::", self.test + "[")))
        )


def known_bare() -> list[Known]:
    entries = []
    for number, line in enumerate(KNOWN_BARE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 4 or parts[1] not in (*ENDS, "*"):
            raise SetupError(
                f"{KNOWN_BARE.name}:{number}: expected 'suite end test-id reason' "
                f"(end: {', '.join(ENDS)} or *), got {line!r}"
            )
        entries.append(Known(*parts))
    return entries


# -- the comparison --------------------------------------------------------------------------


def regressions(bare: Run, inst: Run) -> list[str]:
    """Tests that pass bare and do not pass instrumented."""
    b, i = bare.outcomes, inst.outcomes
    return sorted(t for t, o in b.items() if o == "passed" and i.get(t) != "passed")


def unsettled(
    env: Environment, suite: Suite, bare: Run, inst: Run, known: list[Known]
) -> list[str]:
    """Tests to run again alone: passing bare and not instrumented, or failing bare and not
    listed (the suites' collection errors excepted: they are not a matter of timing)."""
    b = bare.outcomes
    found = set(regressions(bare, inst))
    found.update(
        t
        for t, o in b.items()
        if o == "failed" and not any(k.matches(suite.name, env.end, t) for k in known)
    )
    return sorted(t for t in found if not t.endswith("::<collection>"))


def merged(
    bare: Run, inst: Run, reruns: tuple[Run, Run] | None, log: Callable[[str], None]
) -> tuple[dict[str, str], dict[str, str]]:
    """Each test's outcome bare and instrumented, from its run again alone where it was."""
    b, i = bare.outcomes, inst.outcomes
    if reruns is None:
        return b, i
    again_b, again_i = reruns[0].outcomes, reruns[1].outcomes
    log(
        f"  run again alone ({len(again_b)} tests): bare {reruns[0].summary}; "
        f"instrumented {reruns[1].summary}"
    )
    for test in sorted(set(again_b) | set(again_i)):
        before = (b.get(test, "did not run"), i.get(test, "did not run"))
        after = (again_b.get(test, "did not run"), again_i.get(test, "did not run"))
        if before != after:
            log(
                f"  timing: bare {before[0]} -> {after[0]}, instrumented {before[1]} -> "
                f"{after[1]} when run again alone: {test}"
            )
    return {**b, **again_b}, {**i, **again_i}


def bare_failures(
    env: Environment,
    suite: Suite,
    b: dict[str, str],
    known: list[Known],
    log: Callable[[str], None],
) -> list[str]:
    """Print the known-bare failures and stale entries; return unlisted bare failures."""
    problems = []
    for test, outcome in sorted(b.items()):
        if outcome != "failed":
            continue
        entry = next((k for k in known if k.matches(suite.name, env.end, test)), None)
        if entry is None:
            problems.append(f"fails bare and is not in {KNOWN_BARE.name}: {test}")
        else:
            log(f"  known-bare failure: {test} -- {entry.reason}")
    for entry in known:
        if (
            not entry.deselected
            and entry.suite == suite.name
            and entry.end in ("*", env.end)
            and not any(
                entry.matches(suite.name, env.end, t) and o == "failed" for t, o in b.items()
            )
        ):
            log(f"  note: listed as known-bare but did not fail bare here: {entry.test}")
    return problems


def watch_problems(suite: Suite, inst: Run, log: Callable[[str], None]) -> list[str]:
    """What the instrumented run's poolwatch record says is wrong."""
    if inst.result is None:
        return []
    watch = inst.result.get("poolwatch")
    if not isinstance(watch, dict):
        return ["the instrumented run has no poolwatch record"]
    log(
        f"  poolwatch: hooked {watch['hooked']}, {watch['collections']} collections, "
        f"{watch['points']} points, {watch['pool_names']} pool names, kinds "
        f"{watch['kinds']}, imported before instrument(): {watch['imported_before']}"
    )
    problems = []
    if suite.adapter not in watch["hooked"]:
        problems.append(
            f"poolwatch did not hook {suite.adapter}: the instrumented run proves nothing"
        )
    if watch["errors"]:
        problems.append(f"poolwatch counted internal errors: {watch['errors']}")
    if watch["collect_errors"]:
        problems.append(f"collections raised: {watch['collect_errors']}")
    if suite.distribution in watch["imported_before"]:
        problems.append(f"{suite.distribution} was imported before instrument()")
    return problems


def judge(checked: Checked, known: list[Known], lines: list[str]) -> list[str]:
    """Add the comparison of one suite to ``lines``; return the problems found (empty: it
    passes)."""
    env, suite = checked.env, checked.suite
    bare, inst = checked.runs
    log = lines.append
    log(f"  bare:         {bare.summary}  [{bare.seconds:.0f} s]")
    log(f"  instrumented: {inst.summary}  [{inst.seconds:.0f} s]")
    problems = []
    for run_ in (bare, inst):
        if run_.result is None:
            problems.append(f"the {run_.mode} run left no result ({run_.summary}); see {run_.log}")
            continue
        if run_.returncode not in (0, 1):  # 2 interrupted, 3 pytest's internal error, ...
            problems.append(
                f"the {run_.mode} run did not finish (pytest exit {run_.returncode}); "
                f"see {run_.log}"
            )
        modules = run_.result.get("modules", {})
        origin = modules.get(suite.distribution) if isinstance(modules, dict) else None
        if origin is not None and str(env.venv) not in str(origin):
            problems.append(
                f"{run_.mode}: {suite.distribution} imported from {origin}, not the installed build"
            )
    b, i = merged(bare, inst, checked.reruns, log)
    for test in sorted(t for t, o in b.items() if o == "passed" and i.get(t) != "passed"):
        problems.append(f"passes bare, {i.get(test, 'did not run')} instrumented: {test}")
    problems.extend(bare_failures(env, suite, b, known, log))
    for test in sorted(t for t, o in i.items() if o == "passed" and b.get(t) == "failed"):
        log(f"  note: fails bare, passes instrumented: {test}")
    problems.extend(watch_problems(suite, inst, log))
    for problem in problems:
        log(f"  FAIL {problem}")
    status = "ok" if not problems else f"{len(problems)} problem(s)"
    log(f"  => {suite.name} {env.versions[suite.distribution]} ({env.end}): {status}")
    return problems


@dataclass
class Checked:
    """One suite's two runs, waiting to be judged."""

    env: Environment
    suite: Suite
    lines: list[str]
    started: float
    trees: dict[str, Path] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    reruns: tuple[Run, Run] | None = None
    problems: list[str] = field(default_factory=list)


def run_suite(
    env: Environment,
    suite: Suite,
    known: list[Known],
    prefix: list[str] | None,
    serial: bool,
) -> Checked:
    """Run ``suite`` bare and instrumented, side by side unless ``serial``, once its
    environment is ready (its source distribution is downloaded here: downloads overlap
    other suites' runs, which mostly wait)."""
    checked = Checked(env, suite, [], time.monotonic())
    try:
        if env.ready is not None:
            env.ready.result()
        checked.trees = {mode: env.unpack(suite, mode) for mode in ("bare", "instrumented")}
    except SetupError as error:
        checked.problems.append(str(error))
        return checked
    deselect = tuple(
        k.test for k in known if k.deselected and k.suite == suite.name and k.end in ("*", env.end)
    )
    for test in deselect:
        checked.lines.append(f"  deselected: {test}")
    applied = checked.trees["bare"] / "compat-edits.txt"
    for edit in applied.read_text().splitlines() if applied.exists() else ():
        checked.lines.append(f"  edited {edit}")
    trees = checked.trees
    if prefix is None or serial:
        checked.runs = [
            pytest_run(env, suite, m, trees[m], prefix=prefix, deselect=deselect) for m in trees
        ]
    else:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(pytest_run, env, suite, m, trees[m], prefix=prefix, deselect=deselect)
                for m in trees
            ]
            checked.runs = [f.result() for f in futures]
    return checked


def run_again(checked: Checked, known: list[Known], prefix: list[str] | None) -> None:
    """Run the suite's unsettled tests again, bare then instrumented, with nothing else
    running: some of the suites' tests are timing-sensitive (httpcore cancels a request
    after 10 ms; urllib3 2.0's socket-level tests wait 10 ms for a server thread), and six
    pytest processes share two cores during the main runs. Many unsettled tests are not a
    matter of timing: past ``RERUN_AT_MOST`` they are not run again."""
    if len(checked.runs) != 2:
        return
    bare, inst = checked.runs
    tests = unsettled(checked.env, checked.suite, bare, inst, known)
    if not tests or len(tests) > RERUN_AT_MOST:
        return
    env, suite, trees = checked.env, checked.suite, checked.trees
    checked.reruns = (
        pytest_run(env, suite, "bare", trees["bare"], prefix=prefix, only=tests),
        pytest_run(env, suite, "instrumented", trees["instrumented"], prefix=prefix, only=tests),
    )


def report(checked: Checked, known: list[Known], verbose: bool) -> tuple[list[str], str]:
    """Judge one suite: its report lines and its timing line; its problems in ``checked``."""
    env, suite = checked.env, checked.suite
    version = env.versions.get(suite.distribution, "?")
    lines = [f"==> {env.end}: {suite.name} {version}", *checked.lines]
    if len(checked.runs) != 2:
        lines.extend(f"  FAIL {p}" for p in checked.problems)
        return lines, f"{env.end} {suite.name}: set-up failed"
    bare, inst = checked.runs
    if verbose:
        for run_ in [*checked.runs, *(checked.reruns or ())]:
            tail = run_.log.read_text(errors="replace").splitlines()[-15:]
            lines.append(f"  --- {run_.log}\n    " + "\n    ".join(tail))
    checked.problems = judge(checked, known, lines)
    again = sum(r.seconds for r in checked.reruns or ())
    timing = (
        f"{env.end} {suite.name}: bare {bare.seconds:.0f} s, instrumented "
        f"{inst.seconds:.0f} s" + (f", run again {again:.0f} s" if checked.reruns else "")
    )
    return lines, timing


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--end", choices=(*ENDS, "both"), default="both")
    parser.add_argument("--suite", action="append", choices=[s.name for s in SUITES])
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help=f"suites run at once (default {JOBS})"
    )
    parser.add_argument(
        "--serial", action="store_true", help="run bare and instrumented one after the other"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="recreate the environments, resolving the newest releases again (a first run "
        "creates them; later ones reuse them)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only make the environments and download the suites' source distributions, "
        "then exit (scripts/test does it while its own tests run)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's log tail")
    return parser.parse_args(argv)


def prepare_only(envs: list[Environment], suites: list[Suite], fresh: bool) -> int:
    """``--prepare``: what a run needs before its first test, made ready, nothing run."""

    def ready(env: Environment) -> None:
        env.prepare(fresh)
        for distribution in sorted({s.distribution for s in suites if runs_in(s, env)}):
            env.sdist(distribution)

    with concurrent.futures.ThreadPoolExecutor(len(envs)) as setting_up:
        futures = {setting_up.submit(ready, env): env for env in envs}
        for future, env in futures.items():
            try:
                future.result()
            except SetupError as error:
                log(f"error: {error}")
                return 2
            log(f"compat: {env.label} environment ready ({env.venv.relative_to(ROOT)})")
    return 0


def conclude(
    checked: list[Checked],
    known: list[Known],
    prefix: list[str] | None,
    *,
    verbose: bool,
    started: float,
    serving: contextlib.ExitStack,
) -> int:
    """Unsettled tests run again alone (then the servers the suites used stop), then each
    suite's verdict, timings and the exit code."""
    ends = sorted({c.env.end for c in checked}, key=ENDS.index)
    suites = {c.suite.name for c in checked}
    timings = [f"suites: {time.monotonic() - started:.0f} s from the start"]
    step = time.monotonic()
    for done in checked:
        run_again(done, known, prefix)
    serving.close()
    timings.append(f"tests run again alone: {time.monotonic() - step:.0f} s")
    failures: dict[str, list[str]] = {}
    for done in sorted(checked, key=lambda c: (ENDS.index(c.env.end), SUITES.index(c.suite))):
        lines, timing = report(done, known, verbose)
        log("\n".join(lines))
        timings.append(timing)
        if done.problems:
            failures[f"{done.env.end} {done.suite.name}"] = done.problems
    log(f"\n==> compat run: {time.monotonic() - started:.0f} s")
    for line in timings:
        log(f"  {line}")
    if failures:
        count = sum(map(len, failures.values()))
        log(f"\ncompat: {count} problem(s) in {', '.join(failures)}; logs in {WORK / 'logs'}")
        return 1
    log(
        f"\ncompat: every suite passes instrumented as it does bare ({len(suites)} suites, "
        f"{len(ends)} end(s))"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    ends = ENDS if options.end == "both" else (options.end,)
    suites = [s for s in SUITES if not options.suite or s.name in options.suite]
    started = time.monotonic()

    def elapsed() -> str:
        return f"[{time.monotonic() - started:4.0f}s]"

    own = [Environment(end, s) for s in suites if s.apart for end in s.ends if end in ends]
    envs = [Environment(end) for end in ends] + own
    if options.prepare:
        return prepare_only(envs, suites, options.fresh)
    prefix = isolation()
    if prefix is None:
        log(
            "note: no network namespace can be made here (unshare): runs share the network, "
            "so they run one at a time, and connects off loopback are refused in-process"
        )
        options.jobs = 1
    try:
        known = known_bare()
        serving = started_servers(suites)  # closed after the reruns
    except SetupError as error:
        log(f"error: {error}")
        return 2
    log(f"==> {elapsed()} environments, then suites ({options.jobs} at a time)")
    # Longest first, so that the last suite to start is a short one.
    order = sorted(suites, key=lambda s: LONGEST_FIRST.index(s.name))
    checked: list[Checked] = []
    with (
        concurrent.futures.ThreadPoolExecutor(len(envs)) as setting_up,
        concurrent.futures.ThreadPoolExecutor(max(1, options.jobs)) as pool,
    ):
        for env in envs:
            env.ready = setting_up.submit(env.prepare, options.fresh)
        futures = [
            pool.submit(run_suite, env, suite, known, prefix, options.serial)
            for suite in order
            for env in envs
            if runs_in(suite, env)
        ]
        for env in envs:
            ready = env.ready
            assert ready is not None
            try:
                ready.result()
            except SetupError as error:
                log(f"error: {error}")
                for future in futures:
                    future.cancel()
                return 2
            log(
                f"  {elapsed()} {env.label}: "
                + ", ".join(
                    f"{d} {env.versions[d]}"
                    for d in sorted({s.distribution for s in SUITES if runs_in(s, env)})
                )
            )
        for future in concurrent.futures.as_completed(futures):
            checked.append(future.result())
            log(f"  {elapsed()} ran {checked[-1].env.end} {checked[-1].suite.name}")
    return conclude(
        checked, known, prefix, verbose=options.verbose, started=started, serving=serving
    )


if __name__ == "__main__":
    sys.exit(main())
