# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""memory.py: when the garbage-collector pacer runs full collections (RSS over a long run: bench/memory.py)."""

from __future__ import annotations

import gc

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import memory


class Clocks:
    def __init__(self):
        self.now, self.cpu, self.collected = 0.0, 0.0, 0

    def collect(self):
        self.collected += 1


def _pacer(clocks):
    return memory.GarbageCollectorPacer(check_interval=1.0, max_interval=10.0, clock=lambda: clocks.now,
                                        cpu_clock=lambda: clocks.cpu, collect=clocks.collect)


def _cycles(count=20000):
    """Garbage that only the cyclic collector frees, enough to leave the young generation."""
    for dummy in range(count):
        node = []
        node.append(node)


def test_collects_when_idle_and_under_sustained_load_only_every_max_interval():
    clocks = Clocks()
    pacer = _pacer(clocks)
    thresholds = gc.get_threshold()
    gc.collect()
    try:
        gc.set_threshold(700, 10, 10)
        _cycles()  # some young collections ran: objects are pending in older generations
        clocks.now, clocks.cpu = 1.0, 0.01  # 1 % CPU in the last second: idle
        assert pacer.step() and clocks.collected == 1
        for second in range(2, 12):  # busy: 80 % CPU every second
            clocks.now, clocks.cpu = float(second), clocks.cpu + 0.8
            _cycles(2000)
            pacer.step()
        assert clocks.collected == 2  # only the max_interval one, at second 11
    finally:
        gc.set_threshold(*thresholds)


def test_an_idle_process_with_nothing_new_is_left_alone():
    clocks = Clocks()
    pacer = _pacer(clocks)
    gc.collect()
    clocks.now = 1.0
    assert not pacer.step() and clocks.collected == 0


def test_tuning_freezes_what_is_loaded_and_raises_the_young_threshold():
    thresholds = gc.get_threshold()
    try:
        memory.tune_garbage_collector()
        assert gc.get_threshold()[0] == memory.GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
