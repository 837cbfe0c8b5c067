"""One in-situ reading of one library, in a process laid out in memory by a seed of its own.

    python benchmarks/in_situ.py LIBRARY URL CONFIG SEED

``LIBRARY`` is a key of ``bench_http.LIBRARIES``, ``CONFIG`` the run's ``HTTPConfig`` as a
JSON object. Prints the reading (``bench_http.measure_layout``) as one JSON line.
``bench_http.run_in_situ`` runs it ``in_situ_layouts`` times per library, with seeds 1, 2,
..., and ``PYTHONHASHSEED`` set to the seed.

Why a process per reading: what the same hooks cost inside a request depends on where
CPython happens to put the objects involved — the library's, poolwatch's, and the
interpreter's own caches keyed by address — and one process is one such arrangement. Five
processes that differed in a few hundred kilobytes allocated at start-up (and, as any two
processes do, in where the kernel put their memory) read httpx's hooks at 1.9, 2.0, 2.7,
3.1 and 3.7 µs of CPU per request, each to within ±0.3 µs (docs/performance.md). So
before anything else is imported, this script allocates a seeded number of objects of
seeded sizes and frees every other one: every module, function, pool and connection made
afterwards lands elsewhere in the low address bits too, which the kernel's address
randomisation leaves alone, and the readings of several processes sample what an
application's process may meet. The seed does not reproduce a layout (the kernel's
randomisation differs every time); it makes each reading's start-up different.
"""

from __future__ import annotations

import random
import sys


def scatter(seed: int) -> list[bytes]:
    """Allocate a seeded set of objects of seeded sizes (small ones from CPython's own
    allocator, larger ones from malloc) and free every other one; the rest must be kept."""
    rng = random.Random(seed)
    kept = [bytes(rng.randrange(1, 2048)) for _ in range(rng.randrange(100, 2000))]
    del kept[::2]
    return kept


def main(argv: list[str]) -> None:
    library_key, url, config_json, seed_text = argv
    seed = int(seed_text)
    layout = scatter(seed)

    import dataclasses
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import bench_http

    config = bench_http.HTTPConfig(**json.loads(config_json))
    library = bench_http.LIBRARIES[library_key]()
    reading = bench_http.measure_layout(library, url, config, seed)
    print(json.dumps(dataclasses.asdict(reading)), flush=True)
    del layout


if __name__ == "__main__":
    main(sys.argv[1:])
