"""What poolwatch concludes from what it reads, beside the core that reads it.

* ``antipatterns`` — anti-patterns in how a pool is configured or used, found from the
  readings of each collection round;
* ``advice`` — findings and sizing (Little's law) from two observations of a pool: the
  doctor's, ``top``'s and ``PoolSnapshot.sizing``'s;
* ``leaks`` — the leak log: one WARNING per leak, with the borrower's stack;
* ``history`` — a series' counts sampled over minutes, for sizing;
* ``process`` — the process view: file descriptors and TCP connections by owner;
* ``thresholds`` — the alerts' thresholds, generated from ``alerts/config.py``.

Each takes values (readings, snapshots, counts) and keeps its own state; none writes into
the registry, the ledgers or the pools.
"""
