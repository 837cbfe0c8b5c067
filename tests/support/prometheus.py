"""Real Prometheus (and Alertmanager) processes on loopback for the tests.

Debian's prometheus and prometheus-alertmanager packages provide them; the test command
installs them. ``rules(**overrides)`` renders the shipped rules with settings of
alerts/config.py replaced — the one configuration place — and ``alerts(**overrides)``
lists the alert rules themselves.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"{names[0]} not found: the test command installs Debian's packages")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def until(what: str, probe: Callable[[], Any], seconds: float = 90.0) -> Any:
    """``probe()`` every half second until it returns something true (bounded)."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except OSError as error:  # not listening yet
            last = error
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {seconds} s; last: {last!r}")


def build() -> ModuleType:
    """alerts/build.py, loaded as a module."""
    name = "poolwatch_tests_alerts_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "alerts/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rules(**overrides: Any) -> str:
    text: str = build().render(**overrides)
    return text


class Processes:
    """Processes started for a test, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            process.terminate()
        for process in self.started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class Prometheus:
    """A Prometheus scraping ``targets`` (job name: list of host:port) every second."""

    def __init__(
        self,
        processes: Processes,
        directory: Path,
        targets: dict[str, list[str]],
        rules_text: str,
        alertmanager: str | None = None,
        *,
        exemplars: bool = False,
    ) -> None:
        """``exemplars``: with exemplar storage on (Prometheus then scrapes OpenMetrics)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        (directory / "rules.yml").write_text(rules_text)
        managers = f"[{{static_configs: [{{targets: ['{alertmanager}']}}]}}]"
        alerting = f"alerting: {{alertmanagers: {managers}}}\n" if alertmanager else ""
        jobs = ", ".join(
            f"{{job_name: {job}, static_configs: [{{targets: {json.dumps(hosts)}}}]}}"
            for job, hosts in targets.items()
        )
        (directory / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yml]\n" + alerting + f"scrape_configs: [{jobs}]\n"
        )
        processes.start(
            [
                binary("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                *(["--enable-feature=exemplar-storage"] if exemplars else []),
            ],
            directory / "prometheus.log",
        )

    def query_exemplars(self, expr: str, start: float, end: float) -> list[Any]:
        """The exemplars of the series ``expr`` selects, between two Unix times."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        body = get_json(f"{self.url}/api/v1/query_exemplars?" + urllib.parse.urlencode(params))
        assert body["status"] == "success", body
        result: list[Any] = body["data"]
        return result

    def query(self, expr: str) -> list[Any]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = get_json(url)
        assert body["status"] == "success", body
        result: list[Any] = body["data"]["result"]
        return result
