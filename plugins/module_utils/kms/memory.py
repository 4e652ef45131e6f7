# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The garbage collector of a long-running challenger: short pauses during bursts, bounded memory over days.

Private to the collection. Used by cli/challenger.py.

With Python's default thresholds the collector ran ~300 times per 4000 attestations, and its full
collections (14-24 ms each) landed in the middle of bursts: the p99 of 500 nodes at once went from
217-244 ms to 255-266 ms. Raising the thresholds alone (young objects every 100000 allocations, older
generations almost never) fixed that and broke the other half: objects that outlive one young collection
(reference cycles of connections still in flight at that moment) were only freed by the rare older
collections, and RSS grew 46 MB over 77,000 attestations (11 MB with the defaults; issue 14.8).

So the thresholds stay high for bursts, and ``GarbageCollectorPacer`` runs the full collection at moments
that cost nobody anything: when the process has been nearly idle for a second, and, under sustained
load, at least every ``max_interval`` seconds (one pause of a few ms to ~20 ms, not one per ~4000
allocations). After each, glibc's ``malloc_trim`` returns the freed heap to the system. ``bench/memory.py``
shows RSS flat over a long run.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time

GC_YOUNG_THRESHOLD = 100000
IDLE_CPU_SHARE = 0.05  # a second in which the process used less CPU than this counts as idle
PENDING_ALLOCATIONS = 1000  # an idle event loop allocates a few per second: not worth a collection
CHECK_INTERVAL = 1.0
MAX_INTERVAL = 10.0


def _malloc_trim():
    """glibc's malloc_trim(0): hand freed heap pages back to the system, or None where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS: nothing to trim with
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def collect_and_trim(trim=_malloc_trim()):
    """A full collection, then the freed heap returned to the system: glibc keeps freed memory in its arenas
    (a burst of large frames leaves RSS at its high-water mark otherwise)."""
    gc.collect()
    if trim is not None:
        trim()


def tune_garbage_collector():
    """Freeze everything loaded so far (modules, settings: never scanned again, and shared copy-on-write with
    forked workers), then collect young objects every GC_YOUNG_THRESHOLD allocations instead of 700. The older
    generations are left to GarbageCollectorPacer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


class GarbageCollectorPacer:
    """Runs full collections when the process is idle, and at least every ``max_interval`` seconds.

    ``clock``/``cpu_clock``/``collect`` are replaceable for tests.
    """

    def __init__(self, check_interval=CHECK_INTERVAL, max_interval=MAX_INTERVAL, clock=time.monotonic,
                 cpu_clock=time.process_time, collect=collect_and_trim):
        self.check_interval, self.max_interval = float(check_interval), float(max_interval)
        self.clock, self.cpu_clock, self.collect = clock, cpu_clock, collect
        self.collections = 0
        self._last_full = clock()
        self._last_check, self._last_cpu = self._last_full, cpu_clock()

    def step(self):
        """One check: collect if idle with something to collect, or if the last full collection is too old."""
        now, cpu = self.clock(), self.cpu_clock()
        elapsed = now - self._last_check
        idle = elapsed > 0 and (cpu - self._last_cpu) < IDLE_CPU_SHARE * elapsed
        self._last_check, self._last_cpu = now, cpu
        young, older, oldest = gc.get_count()
        pending = older or oldest or young > PENDING_ALLOCATIONS  # anything since the last full collection
        if (idle and pending) or now - self._last_full >= self.max_interval:
            self.collect()
            self.collections += 1
            self._last_full = self.clock()
            self._last_cpu = self.cpu_clock()  # the collection's own CPU is not load
            return True
        return False

    async def run(self):
        while True:
            await asyncio.sleep(self.check_interval)
            self.step()
