"""The ``poolwatch`` command.

``poolwatch demo`` runs the main job on an embedded default: SQLAlchemy, requests, httpx
and boto3 workloads against a throw-away PostgreSQL (when its server binaries are on the
machine; SQLite otherwise), a loopback HTTP server and moto's DynamoDB (poolwatch._demo),
instrumented by poolwatch, with the Prometheus endpoint served on 127.0.0.1 and the live
pool table printed every second. ``--scenario`` makes alerts' conditions really happen
(each scenario says which). ``poolwatch upstream`` serves the demo's HTTP server on its
own (the compose stack runs it in a container). Each command lives in a module of its own
(``demo``, ``top``, ``doctor``, ``run``; the demo's pool table in ``table``), imported when
that command runs: ``poolwatch top --help`` loads neither the demo nor OpenTelemetry's SDK.

Every command prints a failure as one line on stderr; its exit codes are in its --help
(``EXIT_CODES``). Bad usage exits with 2 everywhere.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO

from poolwatch._demo.scenarios import SCENARIOS
from poolwatch._version import __version__
from poolwatch.cli import top as _top
from poolwatch.diagnostics import advice as _advice

EXIT_CODES = {
    "demo": "0 done, or stopped by Ctrl-C, SIGTERM or SIGHUP (at any moment, start-up "
    "included: nothing is left running); 1 a failure (one line on stderr); 2 bad usage",
    "top": "0 done (q, Ctrl-C, or --once); 1 the endpoint cannot be read or does not serve "
    "Prometheus metrics; 2 bad usage",
    "doctor": "0 nothing to report; 3 findings reported; 1 the endpoint cannot be read or "
    "does not serve Prometheus metrics, or an --import module cannot be imported; 2 bad "
    "usage; 130 interrupted (Ctrl-C) before the second reading: no report",
    "run": "the program's own; 2 bad options; 127 command not found",
    "upstream": "0 stopped (Ctrl-C or SIGTERM); 1 cannot listen (e.g. the port is in use); "
    "2 bad usage",
}
"""Each command's exit codes, as its --help states them."""

EXIT_INTERRUPTED = 130
"""doctor interrupted by Ctrl-C (128 + SIGINT, as shells report it)."""


def _top_command(args: argparse.Namespace, out: TextIO) -> int:
    """The live pool view of a process serving poolwatch metrics."""
    from poolwatch.cli import top as _top

    try:
        import prometheus_client  # noqa: F401  (its text-format parser)
    except ImportError:
        print(
            "poolwatch top: needs prometheus-client: pip install 'poolwatch[prometheus]'",
            file=sys.stderr,
        )
        return 1
    colour = False if args.no_color else None
    try:
        return _top.run(
            args.url, interval=args.interval, sort=args.sort, once=args.once, colour=colour, out=out
        )
    except _top.TopError as error:
        print(f"poolwatch top: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _doctor_command(args: argparse.Namespace, out: TextIO) -> int:
    """Findings and advice for every pool of a process serving poolwatch metrics, or of
    the pools an application's modules configure (``--import``)."""
    from poolwatch.cli import doctor as _doctor
    from poolwatch.cli import top as _top

    if args.imports:
        try:
            return _doctor.configured(args.imports, out)
        except ImportError as error:
            modules = ", ".join(args.imports)
            print(f"poolwatch doctor: cannot import {modules}: {error}", file=sys.stderr)
            return 1
    try:
        import prometheus_client  # noqa: F401  (its text-format parser)
    except ImportError:
        needs = "poolwatch doctor: needs prometheus-client: pip install 'poolwatch[prometheus]'"
        print(needs, file=sys.stderr)
        return 1
    try:
        return _doctor.run(args.url, interval=args.interval, out=out)
    except _top.TopError as error:
        print(f"poolwatch doctor: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # end the progress line
        print("poolwatch doctor: interrupted before the second reading: no report", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwatch", description="Connection-pool observability for Python services."
    )
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_demo = commands.add_parser(
        "demo",
        help="run an instrumented workload with every pool kind, no external services needed",
        description=_described(
            "demo",
            "Run SQLAlchemy (a throw-away PostgreSQL when its server binaries are on the "
            "machine, else SQLite), requests, httpx (sync and async) and boto3 (moto) "
            "workloads against embedded loopback servers, instrumented by poolwatch; print "
            "the pool table every second and serve Prometheus metrics. Each scenario but "
            "healthy makes the conditions of the alerts listed below really happen; healthy "
            "makes none.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n"
        + "\n".join(_scenario_help(name) for name in SCENARIOS)
        + "\n\ntraces: OTEL_TRACES_EXPORTER=otlp sends each worker call as a span, with "
        "poolwatch's\npool.wait and pool.connect spans under it (OTEL_EXPORTER_OTLP_ENDPOINT); "
        "=console\nprints poolwatch's spans on stderr, one line each.",
    )
    run_demo.add_argument("--scenario", choices=list(SCENARIOS), default="healthy")
    run_demo.add_argument("--duration", type=_positive, default=30.0, help="seconds (default 30)")
    run_demo.add_argument("--workers", type=int, default=8, help="worker threads (default 8)")
    run_demo.add_argument(
        "--port", type=int, default=9464, help="Prometheus port on 127.0.0.1 (default 9464)"
    )
    run_demo.add_argument(
        "--url",
        help="a SQLAlchemy database URL to run against instead of the embedded database",
    )
    run_demo.add_argument(
        "--database",
        choices=["auto", "sqlite", "postgresql"],
        default="auto",
        help="the embedded database: a throw-away PostgreSQL when its server binaries are on "
        "the machine (auto, the default), or SQLite",
    )
    run_demo.add_argument(
        "--http-url",
        help="an HTTP upstream to call (e.g. `poolwatch upstream` elsewhere) instead of the "
        "embedded one",
    )
    watch = commands.add_parser(
        "top",
        help="live view of every pool of a running process (reads its Prometheus metrics)",
        description=_described(
            "top",
            "Show every pool of a process serving poolwatch metrics in the Prometheus format: "
            f"used/idle/max with a utilization bar (yellow from {_top.WARN_AT:.0%}, red from "
            f"{_top.CRITICAL_AT:.0%}), callers waiting, wait p99, timeouts and discards per "
            "second, active leaks. Keys: u w t d n sort (utilization, wait, timeouts, "
            "discards, name), r reverse, q quit.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument(
        "--url",
        default="http://127.0.0.1:9464/metrics",
        help="the metrics endpoint (default http://127.0.0.1:9464/metrics)",
    )
    watch.add_argument(
        "--interval", type=_positive, default=2.0, help="seconds between scrapes (default 2)"
    )
    watch.add_argument(
        "--sort", choices=["u", "w", "t", "d", "n"], default="u", help="initial sort (default u)"
    )
    watch.add_argument(
        "--once", action="store_true", help="print one table (rates over one interval) and exit"
    )
    watch.add_argument("--no-color", action="store_true", help="no colour (also: NO_COLOR set)")
    check = commands.add_parser(
        "doctor",
        help="watch a running process's pools and report what to fix, with advice",
        description=_described(
            "doctor",
            "Read a process's poolwatch metrics (Prometheus format) twice, INTERVAL seconds "
            "apart, and report exhausted, saturated, too small, discarding, churning, stale, "
            "leaking and unbounded pools with a recommended size (Little's law with "
            f"{_advice.HEADROOM}x headroom) and concrete advice. A pool seen at only one of "
            "the two readings is named but not judged. With --import, import the "
            "application's own modules instead (which create its engines and clients) and "
            "report what their configuration alone shows: pools without a limit or a pool "
            "timeout, and each pool's limits.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--url",
        default="http://127.0.0.1:9464/metrics",
        help="the metrics endpoint (default http://127.0.0.1:9464/metrics)",
    )
    check.add_argument(
        "--interval", type=_positive, default=10.0, help="seconds to observe (default 10)"
    )
    check.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="judge the configuration of the pools MODULE creates when imported (repeatable)",
    )
    start = commands.add_parser(
        "run",
        help="run a Python program instrumented by poolwatch, without changing its code",
        description=_described(
            "run",
            "Run COMMAND with poolwatch instrumenting every Python process it starts (through "
            "sitecustomize on PYTHONPATH). Options become POOLWATCH_* / OTEL_* variables and "
            "are checked before the program starts.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="poolwatch run [options] -- COMMAND [ARG ...]",
    )
    from poolwatch.cli import run as _run

    _run.add_arguments(start)
    serve = commands.add_parser(
        "upstream",
        help="serve the demo's HTTP upstream (for the compose stack)",
        description=_described(
            "upstream",
            "Serve the keep-alive HTTP server the demo calls; a request may ask for a slow "
            "answer with ?delay=SECONDS.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    return parser


def _described(command: str, text: str) -> str:
    """A command's description and its exit codes, as two wrapped paragraphs."""
    return "\n\n".join(
        textwrap.fill(paragraph, 79) for paragraph in (text, f"Exit codes: {EXIT_CODES[command]}.")
    )


def _scenario_help(name: str) -> str:
    scenario = SCENARIOS[name]
    alerts = sorted({a for names in scenario.alerts.values() for a in names})
    fires = "\n" + " " * 14 + "alerts: " + ", ".join(alerts) if alerts else ""
    return f"  {name:<11} {scenario.description}{fires}"


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``poolwatch`` command."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from poolwatch.cli.demo import demo

        return demo(args, sys.stdout)
    if args.command == "upstream":
        from poolwatch.cli.demo import upstream

        return upstream(args, sys.stdout)
    if args.command == "top":
        return _top_command(args, sys.stdout)
    if args.command == "doctor":
        return _doctor_command(args, sys.stdout)
    if args.command == "run":
        from poolwatch.cli import run as _run

        return _run.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
