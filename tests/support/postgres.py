"""The throw-away PostgreSQL cluster the tests use: the demo's own (poolwatch/_demo/postgres.py)."""

from poolwatch._demo.postgres import PostgresCluster, PostgresError, find_bin_dir

__all__ = ["PostgresCluster", "PostgresError", "find_bin_dir"]
