"""Supported library versions: each adapter's ranges, checked before it hooks anything.

Every adapter declares, as data, the distributions it hooks and the versions it supports
(``Adapter.requires``, e.g. ``"sqlalchemy >= 2.0.0, < 2.2"``), in the form OpenTelemetry's
instrumentations use. Before an adapter is activated the installed version of each is read
from the distribution's metadata (``importlib.metadata``; the module's ``__version__`` when
no metadata is found); outside its range the adapter is not activated, and one WARNING says
which library, which version and the range. Libraries only hooked *through* an adapter
(requests and botocore, through urllib3) are declared in ``Adapter.tested_with``: outside
those ranges the adapter still hooks, and the WARNING says what may differ.

poolwatch has no dependency on ``packaging``, so versions are compared here, as PEP 440
orders them for a range check:

* release numbers compare numerically, padded with zeros (``2.0 == 2.0.0``);
* a pre-release or development release (``2.2.0rc1``, ``2.2.0.dev3``) comes before its
  release: ``>= 2.2`` does not admit ``2.2.0rc1``, and ``< 2.2`` does not admit it either;
* a post-release (``2.0.5.post1``) and a local version (``2.0.5+debian``) compare as their
  release;
* an epoch (``1!2.0``) comes after every version without one.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

_VERSION = re.compile(
    r"""
    ^\s*v?
    (?:(?P<epoch>\d+)!)?
    (?P<release>\d+(?:\.\d+)*)
    (?P<pre>[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?
    (?P<post>[-_.]?(?:post|rev|r)[-_.]?\d*|-\d+)?
    (?P<dev>[-_.]?dev[-_.]?\d*)?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?    # a local version: compared as its release
    \s*$
    """,
    re.IGNORECASE | re.VERBOSE,
)
_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<spec>.*?)\s*$")
_CLAUSE = re.compile(r"^\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<version>\S+)\s*$")


class Version(NamedTuple):
    """A version as a range check orders it: compare two with ``<``, ``==``, ..."""

    epoch: int
    release: tuple[int, ...]
    """Release numbers without trailing zeros: ``2.0.0`` is ``(2,)``."""
    final: bool
    """False for a pre-release or development release, which come before their release."""


def parse_version(text: str) -> Version | None:
    """``text`` as a :class:`Version`, or None when it is not a PEP 440 version."""
    match = _VERSION.match(text)
    if match is None:
        return None
    # 2.0.post1.dev1 is a development release of a post-release: after 2.0 all the same.
    final = match["pre"] is None and (match["dev"] is None or match["post"] is not None)
    release = tuple(int(part) for part in match["release"].split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    return Version(int(match["epoch"] or 0), release, final)


_COMPARE: dict[str, Callable[[Version, Version], bool]] = {
    ">=": lambda v, bound: v >= bound,
    ">": lambda v, bound: v > bound,
    "<=": lambda v, bound: v <= bound,
    # A pre-release of the bound itself is not below it: "< 2.2" admits no 2.2.0rc1.
    "<": lambda v, bound: v < bound._replace(final=False),
    "==": lambda v, bound: v == bound,
    "!=": lambda v, bound: v != bound,
}


class Requirement(NamedTuple):
    """A distribution and the versions of it that are supported."""

    distribution: str
    """The distribution's name on the package index, e.g. ``"sqlalchemy"``."""
    specifier: str
    """The range as written, e.g. ``">= 2.0.0, < 2.2"``."""
    clauses: tuple[tuple[str, Version], ...]

    def admits(self, version: Version) -> bool:
        """Whether ``version`` satisfies every clause of the range."""
        return all(_COMPARE[op](version, bound) for op, bound in self.clauses)

    def lowest(self) -> str:
        """The version the range starts at (its ``>=`` bound), as written."""
        for clause in self.specifier.split(","):
            match = _CLAUSE.match(clause)
            if match is not None and match["op"] == ">=":
                return match["version"]
        raise ValueError(f"{self.distribution} {self.specifier}: no '>=' lower bound")


def parse_requirement(text: str) -> Requirement:
    """``"name >= 1.0, < 2"`` as a :class:`Requirement`; ValueError names what is wrong.

    Only what adapters declare is accepted: a name and comma-separated clauses with
    ``>= > <= < == !=`` and a release (no wildcards, no markers, no extras).
    """
    match = _REQUIREMENT.match(text)
    if match is None or not match["spec"]:
        raise ValueError(f"requirement {text!r}: expected 'name >= version, < version'")
    clauses = []
    for clause in match["spec"].split(","):
        part = _CLAUSE.match(clause)
        version = parse_version(part["version"]) if part is not None else None
        if part is None or version is None or not version.final:
            raise ValueError(
                f"requirement {text!r}: clause {clause.strip()!r} is not an operator "
                "(>=, >, <=, <, ==, !=) and a release (no pre-release bounds)"
            )
        clauses.append((part["op"], version))
    return Requirement(match["name"].lower(), match["spec"], tuple(clauses))


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` installed, read from its metadata; else the
    ``__version__`` of the module of that name when it is imported (a library put on
    ``sys.path`` without metadata); None when neither says."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    imported = sys.modules.get(distribution)
    version = getattr(imported, "__version__", None)
    return version if isinstance(version, str) else None


class Mismatch(NamedTuple):
    """A library whose installed version is outside the range declared for it."""

    distribution: str
    version: str | None
    """As installed; None when no metadata and no ``__version__`` tell it."""
    specifier: str

    def __str__(self) -> str:
        found = self.version if self.version is not None else "of unknown version"
        return f"{self.distribution} {found} (supported: {self.specifier})"


def mismatches(requires: tuple[str, ...], *, only_installed: bool = False) -> list[Mismatch]:
    """The requirements in ``requires`` the installed versions do not satisfy.

    ``only_installed``: a distribution that is not installed is not a mismatch (for
    libraries an adapter is only tested with, which the application may not use).
    """
    found = []
    for text in requires:
        requirement = parse_requirement(text)
        version = installed_version(requirement.distribution)
        if version is None and only_installed:
            continue
        parsed = parse_version(version) if version is not None else None
        if parsed is None or not requirement.admits(parsed):
            found.append(Mismatch(requirement.distribution, version, requirement.specifier))
    return found
