"""Pool names: derived from the pool's target, never carrying credentials.

A derived name is the target with user, password, query string and fragment removed
(``postgresql://db:5432/orders``, ``https://api.example.com``). Names are checked when the
user chooses them too, so a credential can never reach a metric attribute or a log line
through a pool name.

Every derived name goes through :func:`derived_name`, the one place that makes a name safe
to show: characters that are not printable (a newline in a SQLite path, an escape
sequence) are written as escapes, and a name longer than ``MAX_NAME`` characters is
shortened around a digest of the whole (a 10,000-character name was once exported).
:func:`redacted` does the same for values echoed in error messages, without credentials.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from types import FrameType

MAX_NAME = 200
"""The longest pool name, chosen or derived (characters)."""
_MAX_NAME = MAX_NAME
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s]*@")
_PASSWORD = re.compile(r"[^\s/:@'\"]+:[^\s/@'\"]*@")
"""``user:password@`` anywhere, with or without a scheme before it."""
_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s'\"]*@")
_QUERY = re.compile(r"\?[^\s'\",}\]]*")
_TAIL = 50
"""Characters kept from the end of a shortened name (where the creation site is)."""

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
    if not _PRINTABLE.fullmatch(name) or "?" in name:
        raise ValueError(name)
    if _USERINFO.match(name) or _PASSWORD.search(name):
        raise ValueError(name)
    return name


def carries_credentials(text: str) -> bool:
    """Whether ``text`` holds a ``user@``/``user:password@`` part of a URL, a
    ``user:password@`` without a scheme, or a query string."""
    return bool(_URL_USERINFO.search(text) or _PASSWORD.search(text) or "?" in text)


def redacted(text: str) -> str:
    """``text`` without credentials: a URL's ``user:password@`` becomes ``***@``, a
    ``user:password@`` without a scheme ``***@``, a query string ``?***``."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _PASSWORD.sub("***@", text)
    return _QUERY.sub("?***", text)


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line and
    paragraph separators, bidirectional overrides) written as its escape (``\\n``,
    ``\\x1b``, ``\\u2028``): one line, shown as it is."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def shortened(text: str, limit: int = MAX_NAME) -> str:
    """``text`` if it has at most ``limit`` characters; else its start and its end around
    ``…digest…``, a digest of the whole, so that two long names stay two names."""
    if len(text) <= limit:
        return text
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    middle = f"…{digest}…"
    tail = min(_TAIL, (limit - len(middle)) // 3)
    head = limit - len(middle) - tail
    return text[:head] + middle + text[len(text) - tail :]


def derived_name(target: str, site: str | None = None) -> str:
    """The pool name derived from ``target`` (and the creation ``site``, when it is needed to
    tell two places apart): printable, at most ``MAX_NAME`` characters, the site kept."""
    if site is None:
        return shortened(printable(target))
    suffix = f" ({shortened(printable(site), MAX_NAME // 2)})"
    return shortened(printable(target), MAX_NAME - len(suffix)) + suffix


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
