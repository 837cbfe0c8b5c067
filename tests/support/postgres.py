"""A real, throw-away PostgreSQL cluster for the tests.

poolwatch's promises about stale connections, restarts and timeouts are only worth what a
real server proves: this starts one from Debian's server binaries
(``/usr/lib/postgresql/*/bin``) in a temporary directory, listening on 127.0.0.1 only, on
a free port, with password authentication (so that the tests can check that credentials
never reach a pool name). As root, PostgreSQL refuses to run, so the cluster runs as the
``postgres`` system user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bin_dir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
            "install Debian's postgresql package (scripts/test does)"
        )
    return Path(candidates[-1]).parent


class PostgresCluster:
    """One PostgreSQL server: ``start()``, ``restart()``, ``stop()``."""

    user = "poolwatch"
    password = "s3cret-pw-never-exported"
    dbname = "orders"
    host = "127.0.0.1"

    def __init__(self) -> None:
        self._bin = _bin_dir()
        self.port = _free_port()
        self._root: Path | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def _data(self) -> Path:
        assert self._root is not None, "the cluster is not started"
        return self._root / "data"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n--- server log ---\n{self._log_tail()}"
            )
        return result

    def _log_tail(self) -> str:
        if self._root is None or not (self._root / "server.log").exists():
            return "(no log)"
        return "\n".join((self._root / "server.log").read_text().splitlines()[-30:])

    def start(self) -> None:
        """Create the cluster and the database, and start the server."""
        self._root = Path(tempfile.mkdtemp(prefix="poolwatch-pg-"))
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            _ensure_postgres_user()
            shutil.chown(self._root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(self._data),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-instructions",
        )
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} "
            f"-c unix_socket_directories={self._root} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=100"
        )
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self._data),
            "-l",
            str(self._root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run(
            [
                str(self._bin / "createdb"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                self.dbname,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def restart(self) -> None:
        """Restart the server on the same port (existing connections are dropped)."""
        assert self._root is not None, "the cluster is not started"
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self._data),
            "-l",  # without a log file the server would hold pg_ctl's output pipe open
            str(self._root / "server.log"),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        )

    def stop(self) -> None:
        """Stop the server and remove the cluster; safe to call twice."""
        if self._root is None:
            return
        if (self._data / "postmaster.pid").exists():
            self._run(
                str(self._bin / "pg_ctl"),
                "-D",
                str(self._data),
                "-m",
                "immediate",
                "-w",
                "stop",
                check=False,
            )
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def url(self, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL, with the password, for ``postgresql+<driver>``."""
        return (
            f"postgresql+{driver}://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{self.dbname}"
        )

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


def _ensure_postgres_user() -> None:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
            timeout=30,
        )
