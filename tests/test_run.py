"""Zero-code instrumentation: ``poolwatch run`` and ``opentelemetry-instrument``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    import json, subprocess, sys
    import sqlalchemy as sa
    import poolwatch

    engine = sa.create_engine("sqlite://")
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    handle = poolwatch.instrument()  # idempotent: the handle the bootstrap made
    child = None
    if "--child" in sys.argv:  # a Python process the program starts is instrumented too
        child = json.loads(subprocess.run([sys.executable, __file__], capture_output=True,
                                          text=True, check=True).stdout)
    print(json.dumps({
        "pools": [[p.name, p.kind, p.checkouts] for p in poolwatch.pools()],
        "prometheus": handle.prometheus_address,
        "leak_threshold": handle.settings.leak_threshold,
        "leak_stacks": handle.settings.leak_stacks,
        "connection_max_age": handle.settings.connection_max_age,
        "wait_span_threshold": handle.settings.wait_span_threshold,
        "process_view": [handle.settings.process_view, poolwatch.process_view() is not None],
        "server_limits": sorted([*k, v] for k, v in handle.settings.server_limits.items()),
        "child": child,
    }))
    """
)


def _bin(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable))
    assert found is not None, name
    return found


def _run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    app = tmp_path / "app.py"
    app.write_text(APP)
    environment = {**os.environ, "OTEL_METRICS_EXPORTER": "none", **(env or {})}
    return subprocess.run(
        [_bin("poolwatch"), "run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
        cwd=tmp_path,
    )


def test_run_instruments_the_program_with_its_options(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "--leak-threshold", "2.5", "--pool-names", "sqlite://:memory:=scratch",
        "--leak-stacks", "always", "--connection-max-age", "600", "--process-view", "off",
        "--prometheus-port", "0", "--server-limits", "db.internal:5432=97,[fd00::5]:6379=1000",
        "--wait-span-threshold", "0.25",
        "--", sys.executable, "app.py", "--child",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pools"] == [["scratch", "sqlalchemy", 3]]
    assert report["leak_threshold"] == 2.5
    assert (report["leak_stacks"], report["connection_max_age"]) == ("always", 600.0)
    assert report["wait_span_threshold"] == 0.25
    assert report["process_view"] == ["off", False]
    assert report["server_limits"] == [["db.internal", 5432, 97], ["fd00::5", 6379, 1000]]
    host, port = report["prometheus"]
    assert host == "127.0.0.1" and port > 0
    assert report["child"]["pools"] == [["scratch", "sqlalchemy", 3]]


def test_the_programs_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    own = tmp_path / "site"
    own.mkdir()
    marker = tmp_path / "marker"
    (own / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    # The program's own path first; then the caller's, so that the poolwatch under test
    # (a checkout on PYTHONPATH rather than the installed one) is the one that runs.
    path = os.pathsep.join([str(own), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = _run(tmp_path, "--", sys.executable, "app.py", env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "ran"
    assert json.loads(result.stdout)["pools"] == [["sqlite://:memory:", "sqlalchemy", 3]]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--leak-threshold", "-3", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch setting 'leak_threshold' (option --leak-threshold) got "
            "'-3': expected a number of seconds > 0, or None/'off' to disable leak detection\n",
        ),
        (
            ["--process-view", "sometimes", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch setting 'process_view' (option --process-view) got "
            "'sometimes': expected 'auto', 'on' (needs psutil: pip install 'poolwatch[process]') "
            "or 'off'\n",
        ),
        (  # ran the program uninstrumented, with exit status 0, before
            ["--exporter", "kafka", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch: option --exporter got 'kafka': expected a "
            "comma-separated list of otlp, prometheus, console, none\n",
        ),
        (
            ["--shutdown-timeout", "forever", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch setting 'shutdown_timeout' (option --shutdown-timeout) got "
            "'forever': expected a number of seconds from 0 to 600\n",
        ),
        (
            ["--pool-names", "postgresql://bob:secret@db/orders=orders", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch setting 'pool_names' (option --pool-names) got "
            "'postgresql://***@db/orders=orders' (a derived name never carries credentials or a "
            "query string): expected a mapping of derived pool name to chosen name (env: "
            "'target=name,target=name'); names are 1-200 printable characters without "
            "credentials or query strings\n",
        ),
        (
            ["--server-limits", "bob:secret@db:5432=97", "--", "python", "app.py"],
            2,
            "poolwatch run: poolwatch setting 'server_limits' (option --server-limits) got "
            "'***@db:5432=97' ('***@db:5432' is not host:port: a server is named without a "
            "scheme, credentials, path or query string): expected a mapping of server "
            "'host:port' to its connection limit, an int from 1 to 10,000,000 (env: "
            "'db.internal:5432=480,[fd00::5]:6379=10000'), at most 1000 servers\n",
        ),
        ([], 2, "poolwatch run: no command given: poolwatch run [options] -- python app.py\n"),
        (["--", "no-such-program"], 127, "poolwatch run: command not found: no-such-program\n"),
    ],
)
def test_run_fails_in_one_line(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = _run(tmp_path, *args)
    assert (result.returncode, result.stdout, result.stderr) == (code, "", message)


def test_run_checks_the_exporters_the_environment_asks_for(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "--",
        "python",
        "app.py",
        env={"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "poolwatch run: poolwatch: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL/OTEL_EXPORTER_OTLP_PROTOCOL "
        "got 'http/json': expected 'grpc' or 'http/protobuf'\n",
    )


def test_opentelemetry_instrument_starts_poolwatch(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    result = subprocess.run(
        [_bin("opentelemetry-instrument"), sys.executable, "app.py"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pools"] == [["sqlite://:memory:", "sqlalchemy", 3]]
