"""The one interface every adapter implements, and what the core offers adapters.

An adapter knows one library and nothing about OpenTelemetry. It finds the library's
pools, reads their levels cheaply at collection time, reports events from hooks into the
pool's :class:`~poolwatch._ledger.Ledger`, and undoes everything it did.
"""

from __future__ import annotations

import abc
import functools
import gc
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, ClassVar, Literal, Protocol

from poolwatch._ledger import Ledger
from poolwatch._models import Levels, Misconfiguration
from poolwatch.adapters._patching import around, disguise, function_of, rewrap


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


HookFactory = Callable[[Any, Any], Any]
"""Makes one hook: called with the adapter and the original function, returns its
replacement (a hand-written hook with the original's parameters for ``_hook``, a
``(*args, **kwargs)`` one for ``_wrap``)."""

NOT_OWN = _NotOwn()
"""In :attr:`Adapter._patches`: the owner held no attribute of its own by that name."""


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

    def kind_of(self, pool: Any) -> str | None:
        """The ``pool.kind`` of the series ``pool`` reports into; None if it is not tracked."""

    def replace(self, old: Any, new: Any) -> Ledger | None:
        """``new`` takes ``old``'s place in ``old``'s series (a pool replaced by another, as
        ``Engine.dispose()`` does): ``old`` leaves the series' levels, and ``new`` reports
        into the ledger returned. None if ``old`` is not tracked."""

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
    tells_firsts: ClassVar[bool] = False
    """Whether the hooks tell each connection's first checkout (``Ledger.acquired(first=…)``):
    the reuse count is then checkouts less those firsts, not less the connects made for
    them. A connect is not one checkout's when the library opens connections ahead of
    demand (psycopg_pool's and asyncpg's ``min_size``, connections opened in the
    background), nor when one checkout can open two (SQLAlchemy reconnects inside a
    checkout whose pre-ping or ``checkout`` listener finds the connection dead) or open
    one and still fail (SQLAlchemy, aiohttp, redis-py). ``Ledger._reuses`` says more."""
    connects_in_wait: ClassVar[bool] = False
    """Whether that connect is part of the caller's wait for a connection (SQLAlchemy,
    aiohttp): a slow wait's span then shows it as a child (``_tracing``)."""
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
    urllib3 pools, aiobotocore's are aiohttp connectors), with the versions tested: outside
    them the adapter still hooks, and one WARNING says what may differ."""

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

    def report(self, where: str, error: BaseException) -> None:
        """A failure inside poolwatch (logged once per ``where``, counted, never raised) —
        unless ``uninstrument()`` has begun: a hook still running then meets the marks and
        class defaults it reads gone, which is expected, not a fault."""
        if not self.stopped:
            self.tracker.report(where, error)

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

    def _hook_all(self, table: Iterable[tuple[type, str, HookFactory]]) -> None:
        """:meth:`_hook` each row of ``table``: (owner, attribute, factory), the factory
        called with this adapter and the original function."""
        for owner, attribute, factory in table:
            self._hook(owner, attribute, functools.partial(factory, self))

    def _wrap_all(self, table: Iterable[tuple[type, str, HookFactory]]) -> None:
        """:meth:`_wrap` each row of ``table``, as :meth:`_hook_all` does."""
        for owner, attribute, factory in table:
            self._wrap(owner, attribute, functools.partial(factory, self))

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

    def library_metrics(self) -> frozenset[str]:
        """Semantic-convention metrics the library emits itself now (redis-py's own
        OpenTelemetry metrics, once the application turned them on): poolwatch leaves them
        out of its mirrors, so that no series is exported twice. Read at collection, when
        the mirrors are on."""
        return frozenset()

    def checkouts(self, pools: list[Any]) -> dict[Hashable, float] | None:
        """The checkouts out of ``pools`` now (key: start), read from the library's own
        objects, for an adapter whose hot path keeps each checkout's time there (a
        connection, a request) instead of in ``Ledger.active``: a new dict, read at
        collection, that the ledger's snapshot and sweep take in place of their own table.
        None (the default): ``Ledger.active`` is the table."""
        return None

    def unconnected(self, active: Mapping[Hashable, float]) -> int:
        """Of the checkouts out (``active``), how many have a connection whose connect is
        still to be counted: where the library connects after the checkout (urllib3,
        httpx), such a checkout is not a reuse, though the ledger cannot tell yet. The
        default, 0, is right where the connect is part of the checkout."""
        return 0

    def find_abandoned(self, ledger: Ledger, active: dict[Hashable, float]) -> None:  # noqa: B027
        """At collection, before ``ledger`` is read: settle checkouts whose borrower dropped
        them without returning them, where only a collection can see it (default: none).
        ``active``: the checkouts out (``checkouts()``, or ``ledger.active``); a checkout
        settled here leaves it."""

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


def heap_objects(select: Callable[[type], bool]) -> list[Any]:
    """The objects alive now whose type ``select`` accepts, for pools made before
    ``instrument()``: one pass over the garbage collector's objects, each type judged once.

    Judged per object, the checks (``issubclass`` through an ABC's ``__subclasscheck__``, a
    module name read) cost 0.1 to 0.4 s per adapter in a process of 100,000 objects, and a
    loaded machine multiplied it: Celery kills a prefork child whose ``worker_process_init``
    (where poolwatch is instrumented) takes 4 s. ``type(obj)``, never ``obj.__class__``: a
    proxy's ``__class__`` may run code, or raise."""
    verdicts: dict[type, bool] = {}
    found: list[Any] = []
    for obj in gc.get_objects():
        cls = type(obj)
        try:
            verdict = verdicts.get(cls)
        except TypeError:  # a class whose metaclass makes it unhashable: judged each time
            verdict = _judged(select, cls)
        if verdict is None:
            verdict = verdicts[cls] = _judged(select, cls)
        if verdict:
            found.append(obj)
    return found


def _judged(select: Callable[[type], bool], cls: type) -> bool:
    try:
        return bool(select(cls))
    except Exception:  # a metaclass's __subclasscheck__ failing: not one of ours
        return False
