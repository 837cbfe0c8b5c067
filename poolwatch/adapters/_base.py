"""The one interface every adapter implements, and what the core offers adapters.

An adapter knows one library and nothing about OpenTelemetry. It finds the library's
pools, reads their levels cheaply at collection time, reports events from hooks into the
pool's :class:`~poolwatch._ledger.Ledger`, and undoes everything it did.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol

from poolwatch._ledger import Ledger
from poolwatch.adapters._patching import around, disguise, function_of, rewrap

if TYPE_CHECKING:
    from poolwatch._registry import Series


def pop_attribute(obj: Any, name: str, default: Any = None) -> Any:
    """Remove and return an attribute poolwatch set on ``obj`` (``default`` when absent).

    Adapters keep their marks as plain attributes and never touch an instance's
    ``__dict__``: on CPython 3.11+ reading ``obj.__dict__`` materialises the dictionary and
    every later attribute access on that object — the library's own, on its hot path —
    takes about twice as long (measured: 20 ns more per access).
    """
    try:
        value = getattr(obj, name)
        delattr(obj, name)  # fails when only a class-level default exists: nothing to pop
    except AttributeError:
        return default
    return value


class _NotOwn:
    def __repr__(self) -> str:
        return "<not its own>"


NOT_OWN = _NotOwn()
"""In :attr:`Adapter._patches`: the owner held no attribute of its own by that name."""


class HostLevels(NamedTuple):
    """The part of a multi-host pool's levels that belongs to one server."""

    address: str
    """``server.address``: host name or IP literal, as the pool addresses it."""
    port: int
    """``server.port``."""
    used: int
    idle: int
    pending: int = 0
    """Callers waiting for a connection to this server now."""


class Misconfiguration(NamedTuple):
    """A configuration anti-pattern an adapter sees on a pool (``_antipatterns.py``)."""

    antipattern: str
    """One of ``_catalogue.ANTIPATTERNS``: ``unbounded_pool`` or ``no_pool_timeout``."""
    setting: str
    """The setting as the application wrote it, e.g. ``httpx.Limits(max_connections=None)``."""


class Levels(NamedTuple):
    """A pool's levels at one moment, read from the pool itself."""

    used: int
    """Connections checked out."""
    idle: int
    """Open connections ready to be checked out."""
    max: int | None
    """The most connections the pool may hold at once; None when unbounded."""
    pending: int
    """Callers waiting for a connection now."""
    idle_max: int | None = None
    """The most idle connections the pool keeps (database semconv); None if unknown."""
    idle_min: int | None = None
    """The fewest idle connections the pool keeps (database semconv); None if unknown."""
    hosts: tuple[HostLevels, ...] = ()
    """For a pool that spans servers (httpx, aiohttp): used and idle per server.

    When given, ``poolwatch.connections`` is exported per server with ``server.address``
    and ``server.port``; ``used`` and ``idle`` above remain the pool's totals.
    """


class Tracker(Protocol):
    """What the core offers an adapter."""

    def track(
        self,
        pool: Any,
        adapter: Adapter,
        *,
        target: str,
        site: str | None = None,
        name: str | None = None,
        attributes: Mapping[str, str | int] | None = None,
        kind: str | None = None,
    ) -> Ledger:
        """Track ``pool`` (weakly) and return the ledger its hooks report into.

        ``kind`` overrides the adapter's ``pool.kind`` for this pool (the urllib3 adapter
        reports pools made by requests and botocore under their own kinds).
        """

    def series_of(self, pool: Any) -> Series | None:
        """The series ``pool`` reports into, if it is tracked."""

    def forget(self, pool: Any) -> None:
        """Stop counting ``pool`` in its series' levels (it was replaced); its ledger stays."""

    def report(self, where: str, error: BaseException) -> None:
        """Record a failure inside poolwatch; logged once per ``where``, never raised."""


class Adapter(abc.ABC):
    """Hooks for one library's connection pools."""

    name: ClassVar[str]
    """The library's name in the ``libraries`` setting, e.g. ``"sqlalchemy"``."""
    kind: ClassVar[str]
    """The ``pool.kind`` attribute of the pools it reports."""
    module: ClassVar[str]
    """The module whose import activates the adapter."""
    connects_in_checkout: ClassVar[bool] = False
    """Whether the library opens a new connection inside the checkout poolwatch times
    (SQLAlchemy, aiohttp: a failed connect fails that checkout) rather than after it
    (urllib3, httpx: the checkout succeeded, the request then fails to connect). Tells the
    ledger which failed connects to leave out of the reuse count."""
    family: ClassVar[Literal["database", "http"] | None] = None
    """Which semantic-convention mirrors apply to its pools: ``db.client.connection.*``
    (database) or ``http.client.*`` (http)."""
    requires: ClassVar[tuple[str, ...]] = ()
    """The distributions it hooks and the versions supported, e.g.
    ``("sqlalchemy >= 2.0.0, < 2.2",)``: outside any, the adapter is not activated and one
    WARNING says so (``poolwatch/_versions.py``). The compat run (``scripts/compat``) tests
    each range's lower bound and its newest release."""
    tested_with: ClassVar[tuple[str, ...]] = ()
    """Libraries hooked only through this adapter's (requests and botocore pools are
    urllib3 pools), with the versions tested: outside them the adapter still hooks, and one
    WARNING says what may differ."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.stopped = False
        """Set first thing by :meth:`uninstrument`: a hook still running after it (it was
        entered before its function was put back) must not track anything new."""
        self._patches: list[tuple[Any, str, Any]] = []
        """What :meth:`_patch` replaced, in order: owner, attribute, and what the owner's
        own ``__dict__`` held before (``NOT_OWN`` when nothing: the attribute was
        inherited, or poolwatch added it). ``benchmarks/bench_http.py`` reads it to switch
        the hooks off and on."""

    def _patch(self, owner: Any, attribute: str, replacement: Any) -> None:
        """Set ``owner.attribute`` (on a class or module) to ``replacement``, for
        :meth:`_unpatch` to undo."""
        self._patches.append((owner, attribute, owner.__dict__.get(attribute, NOT_OWN)))
        setattr(owner, attribute, replacement)

    def _hook(self, owner: type, attribute: str, make: Callable[[Any], Any]) -> None:
        """Replace the function ``owner.attribute`` by ``make(original)``, a hook written
        with the original's parameters spelled out, dressed as the original
        (:func:`~poolwatch.adapters._patching.disguise`: raises if the parameters differ)."""
        current = _class_attribute(owner, attribute)
        original = function_of(current)
        self._patch(owner, attribute, rewrap(current, disguise(make(original), original)))

    def _wrap(self, owner: type, attribute: str, make: Callable[[Any], Any]) -> None:
        """Replace the function ``owner.attribute`` by a generated function with the
        original's parameters that calls ``make(original)``, a ``(*args, **kwargs)`` hook
        (:func:`~poolwatch.adapters._patching.around`): for long or version-dependent
        parameter lists, off the hot path."""
        current = _class_attribute(owner, attribute)
        original = function_of(current)
        self._patch(owner, attribute, rewrap(current, around(original, make(original))))

    def _unpatch(self) -> None:
        """Undo every :meth:`_patch`, last first: what an owner held is put back, and what
        it did not hold is deleted (its inherited attribute shows again)."""
        for owner, attribute, original in reversed(self._patches):
            if original is NOT_OWN:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._patches.clear()

    @abc.abstractmethod
    def instrument(self, *, imported_before: bool) -> None:
        """Hook the library, which is imported by now.

        ``imported_before``: the application imported it before ``instrument()``, so pools
        may already exist and must be found.
        """

    def uninstrument(self) -> None:
        """Restore every patched function, remove every listener, forget every pool.

        Hooks may still be running (entered before this): they see ``stopped`` and must
        survive the marks and class defaults they read disappearing under them.
        """
        self.stopped = True
        try:
            self._forget_pools()
        finally:
            self._unpatch()

    @abc.abstractmethod
    def _forget_pools(self) -> None:
        """Remove poolwatch's marks from the pools and connections it tracks."""

    @abc.abstractmethod
    def levels(self, pool: Any) -> Levels:
        """Read ``pool``'s levels; called at collection time, never on the hot path."""

    def misconfigurations(self, pool: Any) -> tuple[Misconfiguration, ...]:
        """Configuration anti-patterns of ``pool`` (read at collection, when a pool joins)."""
        return ()

    def oldest_connection(self, pool: Any) -> float | None:
        """Age in seconds of ``pool``'s oldest open connection; None if none or unknown."""
        return None

    def sockets(self, pool: Any) -> tuple[int, ...]:
        """File descriptors of ``pool``'s open connections (the process view)."""
        return ()

    def publish_checkouts(self, ledger: Ledger, pools: list[Any]) -> None:  # noqa: B027
        """At collection, first: for an adapter whose hot path keeps each checkout's time
        on the library's own object (a connection, a request) instead of in
        ``ledger.active``, put what ``pools`` have out now into ``ledger.active`` (the live
        pools of the ledger's series), so that the checkouts out and the leak scan read as
        for any adapter. Optional: the default, for adapters that keep ``ledger.active`` on
        the hot path, does nothing."""

    def find_abandoned(self, ledger: Ledger) -> None:  # noqa: B027 (optional: most need none)
        """At collection, before ``ledger`` is read: settle checkouts whose borrower dropped
        them without returning them, where only a collection can see it (default: none)."""

    @abc.abstractmethod
    def track(self, obj: Any, name: str | None) -> bool:
        """Track the pools of ``obj`` (an engine, client, pool) under ``name``.

        Return False when ``obj`` is not something this adapter knows.
        """


def _class_attribute(owner: type, attribute: str) -> Any:
    """``owner.attribute`` as stored (a function, classmethod or staticmethod), from the
    first class of its MRO that defines it."""
    for klass in owner.__mro__:
        if attribute in klass.__dict__:
            return klass.__dict__[attribute]
    raise AttributeError(f"{owner.__qualname__} has no attribute {attribute!r}")
