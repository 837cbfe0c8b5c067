"""The framework integrations of examples/, run for real on 127.0.0.1.

Each example runs as it would in production — uvicorn, Django's runserver, Flask's server,
a Celery prefork worker, gunicorn with ``preload_app`` and two workers — in a process of
its own on a free loopback port; the Lambda handler is called in-process, as the Lambda
runtime does. Every wait is bounded by a deadline, every loop by a count, and every
process is stopped (its whole process group, if it does not stop by itself) at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import poolwatch
from tests.support.upstream import ThreadedUpstream

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PYTHON = sys.executable
START_TIMEOUT = 20.0
"""Seconds a server gets to start listening."""

CLOSED_NONE = {
    "idle_expired": 0,
    "max_lifetime": 0,
    "pool_full": 0,
    "stale": 0,
    "invalidated": 0,
    "error": 0,
    "disposed": 0,
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without poolwatch/OTel settings, exporting nothing."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POOLWATCH_", "OTEL_", "CELERY_", "GUNICORN_", "DJANGO_"))
    }
    env.update(OTEL_METRICS_EXPORTER="none", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


class Process:
    """A server process of a test, its output in a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited with {self.popen.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"not listening on {port} after {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (every server here shuts down gracefully on it), then SIGKILL the group."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -signal.SIGKILL
        with contextlib.suppress(ProcessLookupError):  # its workers, if any outlived it
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=5)
        return code


@contextlib.contextmanager
def _process(
    args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path
) -> Iterator[Process]:
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stoppable with its workers
        )
    process = Process(popen, log)
    try:
        yield process
    finally:
        process.stop()


def _request(url: str, method: str = "GET", timeout: float = 10.0) -> Any:
    """JSON from a plain urllib request (no pool of the test process is involved)."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read())


def _pool(
    name: str,
    kind: str,
    *,
    checkouts: int,
    max: int | None,
    attributes: dict[str, str | int] | None = None,
    idle_max: int | None = None,
) -> dict[str, Any]:
    """A pool as its health endpoint reports it, at rest after sequential use."""
    return {
        "name": name,
        "kind": kind,
        "used": 0,
        "idle": 1,
        "max": max,
        "pending": 0,
        "instances": 1,
        "instances_created": 1,
        "checkouts": checkouts,
        "timeouts": 0,
        "connects": 1,
        "connect_errors": 0,
        "closed": CLOSED_NONE,
        "leaks": 0,
        "leaks_active": 0,
        "attributes": attributes or {},
        "idle_max": idle_max,
        "reused": checkouts - 1,
        "antipatterns": [],
    }


def _without_wait(pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reported pools without ``wait_p99`` and ``sizing`` (from measured durations),
    after checking them. Sequential use keeps at most one connection busy, so Little's law
    with half again as headroom recommends 1 or 2: which one depends on how long the machine
    took to serve the requests (busy on average below or above 2/3)."""
    for pool in pools:
        assert isinstance(pool.pop("wait_p99"), float)
        sizing = pool.pop("sizing")
        assert sizing["size"] in (1, 2) and "checkouts/s wanted" in sizing["reasoning"], sizing
    return pools


# FastAPI ------------------------------------------------------------------------------------


def test_fastapi_lifespan_instruments_the_uvicorn_process(tmp_path: Path) -> None:
    db = tmp_path / "fastapi.db"
    port = _free_port()
    args = [PYTHON, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
    env = _environment(DATABASE_URL=f"sqlite+aiosqlite:///{db}")
    base = f"http://127.0.0.1:{port}"
    with _process(args, cwd=EXAMPLES / "fastapi", env=env, log=tmp_path / "log") as server:
        server.wait_listening(port)
        ids = [_request(f"{base}/orders", "POST")["id"] for _ in range(3)]
        health = _request(f"{base}/health/pools")
        log = server.output
    assert ids == [1, 2, 3]
    # The schema at start-up, then one checkout per request, on one connection.
    expected = _pool(f"sqlite:///{db}", "sqlalchemy", checkouts=4, max=15, idle_max=5)
    assert _without_wait(health) == [expected], log()
    # A graceful shutdown (uvicorn re-raises the SIGTERM it handled, hence -15), in which the
    # lifespan's engine.dispose() and poolwatch.uninstrument() ran without an error.
    assert server.popen.returncode == -signal.SIGTERM, log()
    assert "Application shutdown complete." in log()
    assert "Traceback" not in log()


# Django -------------------------------------------------------------------------------------


def test_django_wsgi_instruments_runserver(tmp_path: Path) -> None:
    port = _free_port()
    args = [PYTHON, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    base = f"http://127.0.0.1:{port}"
    with ThreadedUpstream() as upstream:
        env = _environment(UPSTREAM_URL=upstream.url.rstrip("/"))
        with _process(args, cwd=EXAMPLES / "django", env=env, log=tmp_path / "log") as server:
            server.wait_listening(port)
            answers = [_request(f"{base}/inventory") for _ in range(3)]
            health = _request(f"{base}/health/pools")
        assert (upstream.connections, upstream.requests) == (1, 3)
    assert answers == [{"upstream_status": 200}] * 3
    assert _without_wait(health) == [
        _pool(
            f"http://127.0.0.1:{upstream.port}",
            "requests",
            checkouts=3,
            max=10,
            idle_max=10,
            attributes={"server.address": "127.0.0.1", "server.port": upstream.port},
        )
    ], server.output()


def test_django_management_commands_are_not_instrumented() -> None:
    """Why wsgi.py and not AppConfig.ready(): a management command loads the project (here
    ``shell``, importing the views and their Session) without starting poolwatch."""
    code = (
        "import poolwatch\n"
        "from poolsite import views\n"
        "try:\n"
        "    poolwatch.track(views._session)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [PYTHON, "manage.py", "shell", "--verbosity", "0", "--command", code],
        cwd=EXAMPLES / "django",
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (
        0,
        "poolwatch.track() needs poolwatch.instrument() to be called first\n",
    ), result.stderr


# Flask --------------------------------------------------------------------------------------


def test_flask_app_factory_instruments_the_server_process(tmp_path: Path) -> None:
    db = tmp_path / "flask.db"
    port = _free_port()
    args = [PYTHON, "-m", "flask", "--app", "shop", "run", "--host", "127.0.0.1",
            "--port", str(port), "--no-reload", "--no-debugger"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    env = _environment(DATABASE_URL=f"sqlite:///{db}")
    with _process(args, cwd=EXAMPLES / "flask", env=env, log=tmp_path / "log") as server:
        server.wait_listening(port)
        ids = [_request(f"{base}/orders", "POST")["id"] for _ in range(3)]
        health = _request(f"{base}/health/pools")
    assert ids == [1, 2, 3]
    # the schema, then 3 requests
    expected = _pool(f"sqlite:///{db}", "sqlalchemy", checkouts=4, max=15, idle_max=5)
    assert _without_wait(health) == [expected], server.output()


# Celery -------------------------------------------------------------------------------------


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_celery_each_prefork_child_reports_its_own_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "celery"
    db = data / "app.db"
    env = _environment(CELERY_EXAMPLE_DIR=str(data), DATABASE_URL=f"sqlite:///{db}")
    monkeypatch.setenv("CELERY_EXAMPLE_DIR", str(data))  # the client below: same folders
    import celery.exceptions

    tasks = _load(EXAMPLES / "celery" / "tasks.py", "poolwatch_example_celery_tasks")
    args = [PYTHON, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork",
            "--concurrency=2", "-O", "fair", "--loglevel=INFO", "--without-gossip",
            "--without-mingle", "--without-heartbeat"]  # fmt: skip
    reports: list[dict[str, Any]] = []
    with _process(args, cwd=EXAMPLES / "celery", env=env, log=tmp_path / "log") as worker:
        try:
            for _ in range(10):  # rounds of two tasks at once: each child takes one
                sent = [tasks.pool_report.delay(0.3) for _ in range(2)]
                try:
                    reports += [result.get(timeout=30) for result in sent]
                except celery.exceptions.TimeoutError as error:
                    raise AssertionError(
                        f"a task did not finish in 30 s; the worker's log:\n{worker.output()}"
                    ) from error
                if len({r["pid"] for r in reports}) == 2 and len(reports) >= 4:
                    break
        finally:
            tasks.app.close()
        log = worker.output
    assert worker.popen.returncode == 0, log()  # a warm shutdown

    by_child: dict[int, list[dict[str, Any]]] = {}
    for report in reports:
        assert report["parent_pid"] == worker.pid  # a child of the worker's main process
        by_child.setdefault(report["pid"], []).append(report)
    assert len(by_child) == 2 and worker.pid not in by_child, log()
    for child_reports in by_child.values():
        # Each child counts its own tasks only: 1, 2, ... on its own engine and connection.
        ordered = sorted(child_reports, key=lambda r: int(r["pools"][0]["checkouts"]))
        assert [_without_wait(r["pools"]) for r in ordered] == [
            [_pool(f"sqlite:///{db}", "sqlalchemy", checkouts=n, max=15, idle_max=5)]
            for n in range(1, len(ordered) + 1)
        ]
    assert poolwatch.pools() == []  # the test process itself was never instrumented


# gunicorn -----------------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = []
    for line in metrics.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)\{(.*)\} (\S+)", line)
        if match is None or match[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2]))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match[3]))
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.mark.parametrize("where", ["post_fork", "master"])
def test_gunicorn_preload_each_worker_reports_only_its_own_checkouts(
    tmp_path: Path, where: str
) -> None:
    """``post_fork``: gunicorn.conf.py as it is. ``master``: the same under ``poolwatch run``,
    which instruments the master before it preloads the app: then poolwatch's fork handling
    alone makes each worker start clean (post_fork's instrument() returns that handle)."""
    db = tmp_path / "gunicorn.db"
    port = _free_port()
    metrics_port = _free_port()
    env = _environment(
        DATABASE_URL=f"sqlite:///{db}", GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="2"
    )
    args = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:application"]
    if where == "master":
        args = [
            str(Path(PYTHON).with_name("poolwatch")), "run",
            "--prometheus-port", str(metrics_port), "--", *args,
        ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    reports: list[dict[str, Any]] = []
    master_metrics = ""
    with (
        _process(args, cwd=EXAMPLES / "gunicorn", env=env, log=tmp_path / "log") as master,
        ThreadPoolExecutor(2) as pool,
    ):
        master.wait_listening(port)
        for _ in range(15):  # two requests at once: a busy sync worker leaves one to the other
            reports += pool.map(lambda _: _request(f"{base}/work?hold=0.3"), range(2))
            if len({r["pid"] for r in reports}) == 2 and len(reports) >= 4:
                break
        if where == "master":
            master_metrics = _scrape(metrics_port)
        log = master.output
    assert master.popen.returncode == 0, log()

    by_worker: dict[int, list[dict[str, Any]]] = {}
    for report in reports:
        by_worker.setdefault(report["pid"], []).append(report)
    assert len(by_worker) == 2 and master.pid not in by_worker, log()
    name = f"sqlite:///{db}"
    for worker_reports in by_worker.values():
        # The master's schema checkout and its dispose() before the fork are not the
        # worker's: each worker counts 1, 2, ... on one connection of its own.
        ordered = sorted(worker_reports, key=lambda r: int(r["pools"][0]["checkouts"]))
        assert [_without_wait(r["pools"]) for r in ordered] == [
            [_pool(name, "sqlalchemy", checkouts=n, max=15, idle_max=5)]
            for n in range(1, len(ordered) + 1)
        ]

    if where == "master":
        # The master did count its own work: the schema checkout, one connect, the dispose.
        pool_labels = {"pool_name": name, "pool_kind": "sqlalchemy"}
        assert (
            _sample(
                master_metrics,
                "poolwatch_wait_duration_seconds_count",
                outcome="acquired",
                **pool_labels,
            ),
            _sample(
                master_metrics,
                "poolwatch_connect_duration_seconds_count",
                outcome="ok",
                **pool_labels,
            ),
            _sample(
                master_metrics,
                "poolwatch_connections_closed_total",
                reason="disposed",
                **pool_labels,
            ),
        ) == (1.0, 1.0, 1.0)
        for pid in by_worker:  # and each worker said why it does not serve that port
            assert (
                f"poolwatch: forked process {pid} does not serve the parent's Prometheus "
                f"endpoint (127.0.0.1:{metrics_port})"
            ) in log()


# AWS Lambda ---------------------------------------------------------------------------------


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_lambda_handler_reuses_its_pools_across_warm_invocations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    moto_endpoint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import boto3

    db = tmp_path / "lambda.db"
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAPOOLWATCHTEST",
        "AWS_SECRET_ACCESS_KEY": "poolwatch-test-secret-key",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "TABLE_NAME": "orders",
        "DATABASE_URL": f"sqlite:///{db}",
        "OTEL_METRICS_EXPORTER": "none",
    }.items():
        monkeypatch.setenv(name, value)
    for name in [n for n in os.environ if n.startswith("POOLWATCH_")]:
        monkeypatch.delenv(name)
    setup = boto3.client("dynamodb")  # the table, as the deployment would have made it
    setup.create_table(
        TableName="orders",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    setup.close()
    del setup
    gc.collect()

    # The cold start: the runtime imports the handler module (which instruments) once.
    handler = _load(EXAMPLES / "lambda" / "handler.py", "poolwatch_example_lambda_handler")
    try:
        results = [handler.handler({"order_id": f"order-{n}"}, None) for n in range(1, 5)]
        logged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        [database] = [p for p in poolwatch.pools() if p.kind == "sqlalchemy"]
        [dynamodb] = [p for p in poolwatch.pools() if p.kind == "botocore"]
    finally:
        handler.engine.dispose()
        handler.dynamodb.close()

    for n, result in enumerate(results, start=1):
        assert result == {
            "order_id": f"order-{n}",
            "cold_start": n == 1,
            "invocation": n,
            "pools": {
                # Created and connected once, on the cold start; then reused: one more
                # checkout per invocation, no new instance, no new connection.
                f"sqlite:///{db}": {
                    "kind": "sqlalchemy",
                    "instances_created": 1,
                    "connects": 1,
                    "checkouts": n,
                    "reused": n - 1,  # warm invocations reuse the cold start's connection
                },
                # The client and its pool are reused too (one instance ever); but moto's
                # server answers every request with "Connection: close", so each
                # invocation connects anew — where a real endpoint keeps the connection.
                f"dynamodb {moto_endpoint}": {
                    "kind": "botocore",
                    "instances_created": 1,
                    "connects": n,
                    "checkouts": n,
                    "reused": 0,
                },
            },
        }
    assert logged == [{"poolwatch": {k: r[k] for k in r if k != "order_id"}} for r in results]
    # One invocation at a time holds at most one connection, so Little's law puts at most
    # one connection busy on average, and x 1.5 headroom sizes the pool at 1 or 2: which of
    # the two depends on how much of the run the holds took (the machine's load).
    assert database.sizing is not None and database.sizing.size in (1, 2)
    assert dataclasses.replace(database, wait_p99=None, sizing=None) == poolwatch.PoolSnapshot(
        name=f"sqlite:///{db}",
        kind="sqlalchemy",
        used=0,
        idle=1,
        max=15,
        pending=0,
        instances=1,
        instances_created=1,
        checkouts=4,
        timeouts=0,
        connects=1,
        connect_errors=0,
        closed=CLOSED_NONE,
        leaks=0,
        leaks_active=0,
        wait_p99=None,
        idle_max=5,
        reused=3,
    )
    # The server's closes, counted as the pool let go of each connection: all but the last.
    assert (dynamodb.instances, dynamodb.checkouts, dynamodb.connects, dynamodb.closed) == (
        1,
        4,
        4,
        {**CLOSED_NONE, "invalidated": 3},
    )
