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


def _skipped(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.normcase(os.path.abspath(filename))
    return path.startswith(_SKIP_DIRS)


def creation_site(frame: FrameType | None = None) -> str | None:
    """The first frame outside poolwatch, the standard library and installed packages.

    Returned as ``path:line`` with the path relative to the working directory when it
    lies below it, so that the name is stable across hosts and restarts.
    """
    f: FrameType | None = frame if frame is not None else sys._getframe(1)
    while f is not None:
        filename = f.f_code.co_filename
        if not _skipped(filename):
            path = os.path.abspath(filename)
            try:
                rel = os.path.relpath(path)
            except ValueError:  # another drive on Windows
                rel = path
            if rel.startswith(".."):
                rel = "/".join(path.replace(os.sep, "/").split("/")[-2:])
            return f"{rel.replace(os.sep, '/')}:{f.f_lineno}"
        f = f.f_back
    return None
