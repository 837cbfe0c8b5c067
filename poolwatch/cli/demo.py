"""``poolwatch demo`` and ``poolwatch upstream``: the embedded demo, and its HTTP server on
its own (the compose stack runs it). Both load the demo only when run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from typing import TextIO


def demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the embedded demo until ``--duration`` passes, Ctrl-C, SIGTERM or SIGHUP."""
    from poolwatch._demo.workload import Demo, Options

    try:
        import sqlalchemy  # noqa: F401  (the one pool the demo cannot do without)
    except ImportError:
        print("poolwatch demo: needs SQLAlchemy: pip install 'poolwatch[demo]'", file=sys.stderr)
        return 1
    options = Options(
        scenario=args.scenario,
        duration=args.duration,
        workers=args.workers,
        port=args.port,
        url=args.url,
        http_url=args.http_url,
        database=args.database,
    )
    try:
        return Demo(options, out).run()
    except KeyboardInterrupt:  # before the demo's own signal handling was in place
        return 0
    except Exception as error:  # one line, never a traceback or a password
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        for secret in _secrets_of(args.url):
            message = message.replace(secret, "***")
        print(f"poolwatch demo: {message}", file=sys.stderr)
        return 1


def _secrets_of(url: str | None) -> list[str]:
    """The password in a database URL, to keep it out of error messages."""
    if not url:
        return []
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def upstream(args: argparse.Namespace, out: TextIO) -> int:
    """Serve the demo's HTTP upstream until Ctrl-C or SIGTERM (the compose stack's)."""
    import signal

    from poolwatch._demo.upstream import ThreadedUpstream

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server = ThreadedUpstream(host=args.host, port=args.port)
    try:
        server.start()
    except OSError as error:
        reason = error.strerror or str(error)
        print(
            f"poolwatch upstream: cannot listen on {args.host}:{args.port}: {reason}",
            file=sys.stderr,
        )
        return 1
    try:
        print(f"demo upstream on http://{args.host}:{server.port}/", file=out, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stopped.wait()
    finally:
        server.stop()
    return 0
