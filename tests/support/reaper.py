"""Run a command and report every process it left running: a Linux child subreaper.

    python -m tests.support.reaper --report FILE -- COMMAND [ARG ...]

The wrapper marks itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so every
process the command starts that outlives its parent — a daemon such as PostgreSQL's
postmaster, which ``pg_ctl`` starts in a session of its own — is re-parented to the
wrapper instead of to init. When the command exits, whatever is still a child of the
wrapper (and their children) was left running by it: the wrapper writes the report as
JSON (``pid`` of the command, its ``returncode``, and ``left``: the command lines of
those processes), then kills and reaps them so that nothing outlives a failed test.
The command's stdin, stdout and stderr are the wrapper's; its pid is written to
``FILE.pid`` as soon as it runs, for the caller to signal it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def _children_of(parents: set[int]) -> dict[int, str]:
    """Live (not zombie) processes whose parent is in ``parents``, and their descendants."""
    found: dict[int, str] = {}
    frontier = set(parents)
    for _ in range(64):  # bounded: process trees are not that deep
        table: dict[int, tuple[int, str, str]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
        new = {
            pid: cmd
            for pid, (ppid, state, cmd) in table.items()
            if ppid in frontier and state != "Z" and pid not in found
        }
        if not new:
            return found
        found.update(new)
        frontier = set(new)
    return found


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    process = subprocess.Popen(command)
    Path(f"{args.report}.pid").write_text(str(process.pid))
    try:
        returncode = process.wait(300)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = process.wait()
    time.sleep(0.5)  # a process the command stopped has a moment to exit
    _reap()
    left = _children_of({os.getpid()})
    args.report.write_text(
        json.dumps({"pid": process.pid, "returncode": returncode, "left": sorted(left.values())})
    )
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _children_of({os.getpid()}) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.1)
    _reap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
