"""``poolwatch run -- COMMAND``: instrument a Python program without changing its code.

The options become ``POOLWATCH_*`` (and ``OTEL_*``) variables, checked here first — every
setting, and the exporters the environment asks for — so that a bad value stops with one
clear line and exit status 2 instead of a silently uninstrumented program; the
bootstrap directory (``_bootstrap/sitecustomize.py``) goes first on ``PYTHONPATH``; then
the command replaces this process. Python processes it starts inherit both, as with
``opentelemetry-instrument``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping

from poolwatch._config import ConfigError, resolve

BOOTSTRAP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_bootstrap")

_FLAGS = {  # option -> environment variable
    "libraries": "POOLWATCH_LIBRARIES",
    "semconv": "POOLWATCH_SEMCONV",
    "leak_threshold": "POOLWATCH_LEAK_THRESHOLD",
    "leak_stacks": "POOLWATCH_LEAK_STACKS",
    "connection_max_age": "POOLWATCH_CONNECTION_MAX_AGE",
    "wait_span_threshold": "POOLWATCH_WAIT_SPAN_THRESHOLD",
    "process_view": "POOLWATCH_PROCESS_VIEW",
    "shutdown_timeout": "POOLWATCH_SHUTDOWN_TIMEOUT",
    "max_pools": "POOLWATCH_MAX_POOLS",
    "pool_names": "POOLWATCH_POOL_NAMES",
    "server_limits": "POOLWATCH_SERVER_LIMITS",
    "prometheus_port": "POOLWATCH_PROMETHEUS_PORT",
    "prometheus_host": "POOLWATCH_PROMETHEUS_HOST",
    "service_name": "OTEL_SERVICE_NAME",
    "exporter": "OTEL_METRICS_EXPORTER",
}

EXIT_NOT_FOUND = 127
"""The command does not exist (as in a shell)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``poolwatch run``."""
    parser.add_argument("--libraries", help="libraries to hook, e.g. sqlalchemy,urllib3")
    parser.add_argument("--semconv", choices=["true", "false"], help="semantic-convention mirrors")
    parser.add_argument("--leak-threshold", help="seconds a checkout may be held, or 'off'")
    parser.add_argument(
        "--leak-stacks", help="capture borrowers' stacks: auto (once a pool leaked), always, off"
    )
    parser.add_argument(
        "--connection-max-age", help="seconds after which an open connection is too old, or 'off'"
    )
    parser.add_argument(
        "--wait-span-threshold",
        help="seconds a caller waits for a connection before the wait is a span, or 'off'",
    )
    parser.add_argument(
        "--process-view", help="file descriptors and TCP connections (psutil): auto, on, off"
    )
    parser.add_argument(
        "--shutdown-timeout",
        help="seconds exit waits for poolwatch's last export (default 2)",
    )
    parser.add_argument("--max-pools", help="pool series before the overflow series")
    parser.add_argument("--pool-names", help="target=name,target=name")
    parser.add_argument(
        "--server-limits", help="servers' connection limits: host:port=limit,host:port=limit"
    )
    parser.add_argument("--prometheus-port", help="serve Prometheus metrics on this port")
    parser.add_argument("--prometheus-host", help="address of that endpoint (default 127.0.0.1)")
    parser.add_argument("--service-name", help="OTEL_SERVICE_NAME")
    parser.add_argument(
        "--exporter", help="OTEL_METRICS_EXPORTER: otlp, prometheus, console or none"
    )
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- the program and arguments")


def environment(args: argparse.Namespace, base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ``base`` plus the options, with the bootstrap on the path."""
    env = dict(base)
    for option, variable in _FLAGS.items():
        value = getattr(args, option)
        if value is not None:
            env[variable] = str(value)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = BOOTSTRAP + (os.pathsep + path if path else "")
    return env


def run(args: argparse.Namespace) -> int:  # returns only when it cannot start the command
    """Check the settings, then exec the command (returns only on failure)."""
    command = list(args.program)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(
            "poolwatch run: no command given: poolwatch run [options] -- python app.py",
            file=sys.stderr,
        )
        return 2
    # Here, not at import: `poolwatch run --help` loads neither the SDK nor the adapters.
    from poolwatch import _provider
    from poolwatch.adapters import ADAPTERS

    env = environment(args, os.environ)
    try:
        _provider.check(resolve({}, env, tuple(ADAPTERS)), env)
    except ConfigError as error:
        message = str(error)
        for option, variable in _FLAGS.items():  # name the option the user typed
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                message = message.replace(f"environment variable {variable}", f"option {flag}")
        print(f"poolwatch run: {message}", file=sys.stderr)
        return 2
    program = shutil.which(command[0], path=env.get("PATH"))
    if program is None:
        print(f"poolwatch run: command not found: {command[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    os.execve(program, command, env)  # replaces this process
