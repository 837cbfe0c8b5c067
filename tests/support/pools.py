"""Looking a pool up in ``poolwatch.pools()``, as the tests do in every module."""

from __future__ import annotations

import poolwatch


def one_pool(name: str | None = None, kind: str | None = None) -> poolwatch.PoolSnapshot:
    """The one pool named ``name`` of kind ``kind`` (either left out: any); fails, listing
    every pool, unless exactly one matches."""
    found = [
        s
        for s in poolwatch.pools()
        if (name is None or s.name == name) and (kind is None or s.kind == kind)
    ]
    assert len(found) == 1, poolwatch.pools()
    return found[0]
