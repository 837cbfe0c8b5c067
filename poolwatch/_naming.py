"""Pool names: derived from the pool's target, never carrying credentials.

A derived name is the target with user, password, query string and fragment removed
(``postgresql://db:5432/orders``, ``https://api.example.com``). Names are checked when the
user chooses them too, so a credential can never reach a metric attribute or a log line
through a pool name.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from types import FrameType

_MAX_NAME = 200
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s]*@")

_POOLWATCH_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = tuple(
    os.path.normcase(os.path.abspath(p))
    for p in {
        _POOLWATCH_DIR,
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
)


def check_pool_name(name: object) -> str:
    """Return ``name`` if it is a usable pool name, else raise ``ValueError``.

    Allowed: 1-200 printable ASCII characters, no ``user:password@`` part and no query
    string, so that a name chosen from a connection string cannot leak a secret.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME:
        raise ValueError(name)
    if not _PRINTABLE.fullmatch(name) or _USERINFO.match(name) or "?" in name:
        raise ValueError(name)
    return name


def target_name(scheme: str, host: str | None, port: int | None, path: str | None = None) -> str:
    """Build a credential-free target name such as ``postgresql://db:5432/orders``."""
    netloc = host or ""
    if netloc and ":" in netloc and not netloc.startswith("["):
        netloc = f"[{netloc}]"  # IPv6 literal
    if port is not None:
        netloc = f"{netloc}:{port}"
    path = (path or "").split("?", 1)[0].split("#", 1)[0]
    if path and not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{netloc}{path}"


_CWD = os.getcwd()
"""The working directory when poolwatch was imported: creation sites are shown relative to it.
Kept rather than asked again: ``os.getcwd`` and ``os.path.abspath`` are system calls, and a
site may be looked up on an event loop's thread (an aiohttp connector made in a coroutine),
where a blocking call is a fault (aiohttp's own tests fail on one)."""

_SITES_KEPT = 4096
_sites: dict[str, str | None] = {}
"""By a code object's file name: its path as a site shows it, or None for a file skipped."""


def _absolute(filename: str) -> str:
    """``filename`` made absolute by string operations only (no system call)."""
    if not os.path.isabs(filename):
        filename = os.path.join(_CWD, filename)
    return os.path.normpath(filename)


def _shown(filename: str) -> str | None:
    """How a site in ``filename`` shows its path; None when the file is not user code."""
    if filename.startswith("<"):
        return None
    path = _absolute(filename)
    if os.path.normcase(path).startswith(_SKIP_DIRS):
        return None
    if path.startswith(_CWD.rstrip(os.sep) + os.sep):
        rel = path[len(_CWD.rstrip(os.sep)) + 1 :]
    else:  # outside the working directory: its last two parts are stable across hosts
        rel = "/".join(path.replace(os.sep, "/").split("/")[-2:])
    return rel.replace(os.sep, "/")


def creation_site(frame: FrameType | None = None) -> str | None:
    """The first frame outside poolwatch, the standard library and installed packages.

    Returned as ``path:line`` with the path relative to the working directory (as it was
    when poolwatch was imported) when it lies below it, so that the name is stable across
    hosts and restarts. No system call: it may run on an event loop.
    """
    f: FrameType | None = frame if frame is not None else sys._getframe(1)
    while f is not None:
        filename = f.f_code.co_filename
        try:
            shown = _sites[filename]
        except KeyError:
            shown = _shown(filename)
            if len(_sites) < _SITES_KEPT:
                _sites[filename] = shown
        if shown is not None:
            return f"{shown}:{f.f_lineno}"
        f = f.f_back
    return None
