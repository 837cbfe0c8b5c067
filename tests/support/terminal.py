"""A command run on a pseudo-terminal, as a person at a terminal runs it: what it draws is
read back, and keys are written to it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def on_terminal(
    argv: Sequence[str], *, colour: bool = False, stderr_only: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``argv`` with the terminal as its standard streams (``stderr_only``: only its
    standard error; no input, output discarded); yield the process and the terminal's
    controlling side, to read with ``read_until`` and write keys to. ``colour``: without
    ``NO_COLOR`` in the environment. On exit the process is killed if it still runs."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not (colour and k == "NO_COLOR")}
    streams = (subprocess.DEVNULL, subprocess.DEVNULL) if stderr_only else (terminal, terminal)
    process = subprocess.Popen(
        list(argv), stdin=streams[0], stdout=streams[1], stderr=terminal, env=env
    )
    os.close(terminal)
    try:
        yield process, controller
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(controller)


def read_until(fd: int, pattern: str, seconds: float = 20.0) -> str:
    """Everything the terminal shows until ``pattern`` matches it; AssertionError (with
    the tail of what was shown) if it does not within ``seconds``."""
    seen = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536).decode(errors="replace")
            except OSError:
                break
            if re.search(pattern, seen, re.S):
                return seen
    raise AssertionError(f"{pattern!r} not seen; got {seen[-2000:]!r}")
