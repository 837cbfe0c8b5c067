"""Started by ``poolwatch run``: instrument the process from ``POOLWATCH_*`` and ``OTEL_*``.

``poolwatch run`` puts this directory first on ``PYTHONPATH``, so Python imports this module
at start-up (the ``site`` module imports ``sitecustomize``). It calls
``poolwatch.instrument()`` — settings come from the environment the command set — and then
imports the application's own ``sitecustomize``, if there is one further along the path.
A failure here is reported on stderr in one line and never stops the application.
"""

from __future__ import annotations

import importlib
import os
import sys


def _instrument() -> None:
    try:
        import poolwatch

        poolwatch.instrument()
    except Exception as error:  # the application runs on, uninstrumented
        print(f"poolwatch run: not instrumenting: {error}", file=sys.stderr)


def _chain() -> None:
    """Import the next ``sitecustomize`` on the path: the one this module shadows."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.pop(__name__, None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if ours is not None and __name__ not in sys.modules:
            sys.modules[__name__] = ours


_instrument()
_chain()
