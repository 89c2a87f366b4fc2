"""Process-wide settings of a long-running Pigeon process (`pigeon serve`, `pigeon worker`).

They belong to the process, not to a `Server`: tests run many servers in one process.
"""

from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc_for_serving() -> None:
    """Keep the cyclic garbage collector's pauses out of message latency.

    Measured on `pigeon bench fanout --members 1000` with the defaults: six full
    collections of 80-120 ms each and middle-generation ones up to 23 ms in 20 s, every one
    a stall of the event loop. Freezing what start-up allocated (modules, functions,
    types: about half of the tracked objects of a loaded server) takes it out of every
    later scan; a larger young generation and rarer older collections make pauses rare.
    Reference counting still frees all acyclic garbage at once; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
