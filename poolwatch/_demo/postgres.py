"""A real, throw-away PostgreSQL cluster: the demo's database when the server binaries are
on the machine, and the test suite's.

Why the tests use a real server: poolwatch's promises about stale connections, server
restarts, connect errors and exhaustion timeouts are only worth what a real server proves;
a mocked driver would only repeat our own assumptions back to us (see "Real components in
tests" in the design). This module starts one from Debian's server binaries
(``/usr/lib/postgresql/*/bin``, the highest version installed) in a temporary directory:

- listening on 127.0.0.1 only, on a free port chosen by binding a socket to port 0, with its
  Unix socket inside the temporary directory (nothing system-wide is touched);
- with password authentication (SCRAM-SHA-256) for a test user with a real password, so the
  tests can check that credentials never reach a pool name or a metric attribute;
- tuned for throw-away use: ``fsync``, ``full_page_writes`` and ``synchronous_commit`` off.

PostgreSQL refuses to run as root, so when the tests run as root the cluster is created and
run as the ``postgres`` system user (created when missing) through ``runuser``, and the
temporary directory is handed to that user.

Usage::

    with PostgresCluster() as pg:
        engine = sqlalchemy.create_engine(pg.url())      # postgresql+psycopg://...
        pg.restart()                                     # same port, connections dropped

``scripts/test`` installs Debian's ``postgresql`` package when the binaries are missing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["PostgresCluster", "PostgresError", "find_bin_dir"]

_BIN_GLOB_ROOT = Path("/usr/lib/postgresql")
_OS_USER = "postgres"
_COMMAND_TIMEOUT = 120.0
_SETTLE_SECONDS = 3.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it


class PostgresError(RuntimeError):
    """A step of creating, starting, restarting or stopping the cluster failed."""


def find_bin_dir() -> Path:
    """The ``bin`` directory of the highest PostgreSQL version with server binaries."""
    found: list[tuple[tuple[int, ...], Path]] = []
    if _BIN_GLOB_ROOT.is_dir():
        for version_dir in _BIN_GLOB_ROOT.iterdir():
            bin_dir = version_dir / "bin"
            if not all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
                continue  # e.g. only postgresql-client installed: psql but no server
            key = tuple(int(part) for part in re.findall(r"\d+", version_dir.name))
            found.append((key, bin_dir))
    if not found:
        raise PostgresError(
            f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
            f"{_BIN_GLOB_ROOT}/*/bin: install Debian's 'postgresql' package "
            "(scripts/test does this when they are missing)"
        )
    return max(found)[1]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _ensure_os_user() -> None:
    try:
        pwd.getpwnam(_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _OS_USER],
            check=True,
            capture_output=True,
            timeout=60,
        )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip() or "(no output)"


class PostgresCluster:
    """One throw-away PostgreSQL server: ``start()``, ``restart()``, ``stop()``.

    Also a context manager (started on enter, stopped and removed on exit). ``stop()`` is
    idempotent and is also registered to run at interpreter exit while the server runs.
    """

    def __init__(
        self,
        *,
        user: str = "poolwatch",
        password: str = "s3cret-pw-never-exported",
        dbname: str = "orders",
        checkpoint: Callable[[], None] | None = None,
        max_connections: int = 100,
    ) -> None:
        """``checkpoint``: called between the steps of ``start()``; what it raises (the
        demo's KeyboardInterrupt on a stop signal) stops and removes the cluster.
        ``max_connections``: the server's own limit (PostgreSQL keeps 3 of them for
        superusers: ``superuser_reserved_connections``)."""
        self._bin = find_bin_dir()
        self._checkpoint = checkpoint or (lambda: None)
        self._host = "127.0.0.1"
        self._port = 0
        self._user = user
        self._password = password
        self._dbname = dbname
        self._max_connections = max_connections
        self._root: Path | None = None
        self._as_os_user = os.geteuid() == 0
        self._start_attempted = False

    # -- connection parameters -----------------------------------------------------------

    @property
    def host(self) -> str:
        """The only address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port; chosen at ``start()`` and kept across ``restart()``."""
        if not self._port:
            raise PostgresError("the cluster has not been started")
        return self._port

    @property
    def user(self) -> str:
        """The database superuser the tests connect as."""
        return self._user

    @property
    def password(self) -> str:
        """That user's password (password authentication is enforced)."""
        return self._password

    @property
    def dbname(self) -> str:
        """The database created at start."""
        return self._dbname

    @property
    def running(self) -> bool:
        """Whether the cluster has been started and not yet stopped."""
        return self._root is not None

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's Unix socket (a libpq ``host``), while it runs."""
        if self._root is None:
            raise PostgresError("the cluster is not running")
        return self._root

    def url(self, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL with the credentials, e.g. ``postgresql+psycopg://u:p@h:port/db``."""
        credentials = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"postgresql+{driver}://{credentials}@{self.host}:{self.port}/{self.dbname}"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        if self._root is None:
            return "(no server log: the cluster is not started)"
        log = self._root / "server.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return f"(no server log at {log})"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster and the database, and start the server on a free port."""
        if self._root is not None:
            raise PostgresError("the cluster is already started")
        try:
            self._create()
            self._checkpoint()
            self._start_on_free_port()
            self._checkpoint()
            self._create_database()
            self._checkpoint()
        except BaseException as error:
            # Interrupted (Ctrl-C reaches pg_ctl too, and pg_ctl starts the server in a
            # session of its own): the server may be a moment from writing its pid file.
            self.stop(settle=not isinstance(error, Exception))
            raise
        atexit.register(self.stop)

    def restart(self) -> None:
        """Restart the server (fast shutdown: open connections are dropped), same port."""
        data = self._data_dir()
        self._pg_ctl("restart", "-D", str(data), "-l", str(self._log()), "-m", "fast")

    def stop(self, *, settle: bool = False) -> None:
        """Stop the server at once and remove the cluster's directory; safe to call again.

        ``settle``: a start was interrupted — give a server that is still starting a few
        seconds to write its ``postmaster.pid``, so that it is stopped rather than orphaned.
        """
        root = self._root
        if root is None:
            return
        atexit.unregister(self.stop)
        data = root / "data"
        if settle and self._start_attempted:
            deadline = time.monotonic() + _SETTLE_SECONDS
            while not (data / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            if (data / "postmaster.pid").exists():
                try:
                    self._pg_ctl("stop", "-D", str(data), "-m", "immediate")
                except (PostgresError, subprocess.TimeoutExpired):
                    self._kill_postmaster(data)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._root = None
            self._start_attempted = False

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.host}:{self._port}" if self.running else "stopped"
        return f"<PostgresCluster {state} db={self.dbname!r} bin={str(self._bin)!r}>"

    # -- steps ---------------------------------------------------------------------------

    def _data_dir(self) -> Path:
        if self._root is None:
            raise PostgresError("the cluster is not started")
        return self._root / "data"

    def _log(self) -> Path:
        if self._root is None:
            raise PostgresError("the cluster is not started")
        return self._root / "server.log"

    def _create(self) -> None:
        if self._as_os_user:
            _ensure_os_user()
        # Short path: the Unix socket lives here and socket paths are limited to ~107 bytes.
        # As root, a private TMPDIR (e.g. /root/tmp) may be closed to the postgres user.
        base = "/tmp" if self._as_os_user else None
        self._root = root = Path(tempfile.mkdtemp(prefix="poolwatch-pg-", dir=base))
        pwfile = root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as_os_user:
            for path in (root, pwfile):
                shutil.chown(path, _OS_USER, _OS_USER)
        self._run(
            [
                str(self._bin / "initdb"),
                "--pgdata",
                str(root / "data"),
                "--username",
                self.user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what="initdb",
        )
        pwfile.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{root}'",
            "unix_socket_permissions": "0700",
            "max_connections": str(self._max_connections),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            "password_encryption": "'scram-sha-256'",
            "include": "'port.conf'",  # the port, written by _start_on_free_port
        }
        with (root / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# poolwatch throw-away cluster (poolwatch/_demo/postgres.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_on_free_port(self) -> None:
        data = self._data_dir()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._port = _free_port(self.host)
            port_conf = data / "port.conf"
            port_conf.write_text(f"port = {self._port}\n")
            if self._as_os_user:
                shutil.chown(port_conf, _OS_USER, _OS_USER)
            try:
                self._start_attempted = True
                self._pg_ctl("start", "-D", str(data), "-l", str(self._log()))
                return
            except PostgresError:
                taken = "could not bind" in self.log_tail() or "in use" in self.log_tail()
                if attempt == _START_ATTEMPTS or not taken:
                    raise
                self._kill_postmaster(data)  # normally not running; make sure

    def _create_database(self) -> None:
        createdb = [
            str(self._bin / "createdb"),
            f"--host={self.host}",
            f"--port={self.port}",
            f"--username={self.user}",
            "--no-password",  # use PGPASSWORD, never prompt
            self.dbname,
        ]
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        result = subprocess.run(
            createdb,
            env=env,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"createdb {self.dbname} failed ({result.returncode}): {_output(result)}\n"
                f"--- server log ---\n{self.log_tail()}"
            )

    def _pg_ctl(self, action: str, *args: str) -> None:
        # -w: wait until the action is complete; -t: for at most that many seconds.
        self._run(
            [str(self._bin / "pg_ctl"), action, *args, "-w", "-t", "60"],
            what=f"pg_ctl {action}",
        )

    def _run(self, command: list[str], *, what: str) -> None:
        """Run one step to its end, even when interrupted.

        A Ctrl-C or SIGTERM arriving while ``pg_ctl start`` runs must not kill it halfway:
        the server it is starting would live on without a ``postmaster.pid`` yet for
        ``stop()`` to find. So an interruption waits for the step (bounded by its own
        timeout), and is raised after it.
        """
        if self._as_os_user:
            command = ["runuser", "-u", _OS_USER, "--", *command]
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # The server inherits the working directory; the postgres user may not be
                # able to enter the caller's (e.g. /root/...).
                cwd=self._root,
            )
            try:
                code = self._wait(process)
            except BaseException:
                self._wait(process)
                raise
            output.seek(0)
            text = output.read().decode(errors="replace").strip() or "(no output)"
        if code != 0:
            raise PostgresError(
                f"{what} failed (exit {code}): {text}\n"
                f"--- server log ({self._bin}) ---\n{self.log_tail()}"
            )

    @staticmethod
    def _wait(process: subprocess.Popen[bytes]) -> int:
        try:
            return process.wait(_COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    @staticmethod
    def _kill_postmaster(data: Path) -> None:
        """Last resort when ``pg_ctl stop`` fails: SIGKILL the postmaster and wait for it."""
        try:
            pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
