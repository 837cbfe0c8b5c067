"""Names of PostgreSQL pools, shared by the psycopg_pool and asyncpg adapters.

A pool's name is the server and database it connects to, ``postgresql://db:5432/orders``,
as the SQLAlchemy adapter names an engine: never the user, the password, or any other
connection parameter (a DSN's query string carries ``sslpassword``, ``options``, …). Both
libraries take the same parameters — a libpq connection string (key/value or URL) for
psycopg, a URL DSN for asyncpg, and keyword arguments for either — and fall back on libpq's
environment variables for what is not given (``PGHOST``, ``PGPORT``, ``PGDATABASE``), as
the name does. A Unix-domain socket directory is not a network address: such a pool is
``postgresql://:5432/orders``, with no ``server.address``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from poolwatch import _catalogue as c
from poolwatch._naming import target_name

DEFAULT_PORT = 5432
_ENVIRONMENT = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE"}


def from_environment(parameters: dict[str, str | None]) -> dict[str, str | None]:
    """``parameters`` (host, port, dbname) with what is missing taken from libpq's
    environment variables."""
    return {
        key: parameters.get(key) or os.environ.get(variable) or None
        for key, variable in _ENVIRONMENT.items()
    }


def _is_socket(host: str) -> bool:
    """A Unix-domain socket directory (or Linux abstract socket), not a network host."""
    return host.startswith(("/", "@"))


def _listed(value: str | int | Iterable[str | int] | None) -> list[str]:
    """A libpq list parameter (``"a,b"``, or a list as asyncpg takes it) as strings."""
    if value is None:
        return []
    if isinstance(value, (str, int)):
        items: Iterable[str | int] = str(value).split(",")
    else:
        items = value
    return [str(item).strip() for item in items]


def postgres_target(
    host: str | Iterable[str] | None,
    port: str | int | Iterable[str | int] | None,
    dbname: str | None,
) -> tuple[str, dict[str, str | int]]:
    """The credential-free target of a PostgreSQL pool and its server attributes.

    ``host`` and ``port`` may list several servers (libpq's ``host=a,b port=5432,5433``,
    asyncpg's lists): the name lists them all (``postgresql://a:5432,b:5433/orders``, so
    that two clusters stay two series) and no ``server.address`` is set, since no one
    server is the pool's.
    """
    hosts = [h for h in _listed(host) if h] or [""]
    ports = [p for p in _listed(port) if p]
    if len(ports) <= 1:
        ports = ports * len(hosts)  # one port for every host, as libpq reads it
    numbers = [int(p) if p.isdigit() else None for p in ports] + [None] * len(hosts)
    if len(hosts) == 1:
        only = hosts[0]
        number = numbers[0] if ports else DEFAULT_PORT
        if not only or _is_socket(only):
            return target_name("postgresql", None, number, dbname), {}
        attributes: dict[str, str | int] = {c.SERVER_ADDRESS: only}
        if number is not None:
            attributes[c.SERVER_PORT] = number
        return target_name("postgresql", only, number, dbname), attributes
    servers = []
    for index, each in enumerate(hosts):
        number = numbers[index] if ports else DEFAULT_PORT
        shown = "" if _is_socket(each) else each
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"  # IPv6 literal
        servers.append(f"{shown}:{number}" if number is not None else shown)
    # target_name() would take the list for one IPv6 literal: the database part from it.
    database = target_name("postgresql", None, None, dbname)[len("postgresql://") :]
    return f"postgresql://{','.join(servers)}{database}", {}
