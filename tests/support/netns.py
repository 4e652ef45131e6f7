# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two network namespaces joined by a veth pair, for tests that need a private 'LAN'.

Everything is named after a caller-given prefix plus this process's PID, and deleted
on exit even when the test fails (deleting a namespace also deletes its veth end).
Traffic between the namespaces never reaches the host's interfaces.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class VethPair:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    addr_a: str
    addr_b: str

    def exec_args(self, side):
        """argv prefix to run a command inside namespace ``side`` ("a" or "b")."""
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]


@contextlib.contextmanager
def veth_namespaces(prefix, subnet="10.213.%d" % (os.getpid() % 250)):
    """Yield a VethPair: namespaces ``<prefix>-<pid>-a``/``-b``, addresses ``<subnet>.1/.2``."""
    pid = os.getpid()
    pair = VethPair(
        ns_a="%s-%d-a" % (prefix, pid),
        ns_b="%s-%d-b" % (prefix, pid),
        # link names are limited to 15 characters
        if_a=("kd%da" % pid)[:15],
        if_b=("kd%db" % pid)[:15],
        addr_a=subnet + ".1",
        addr_b=subnet + ".2",
    )
    created = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", pair.if_a, "netns", pair.ns_a, "type", "veth", "peer", "name", pair.if_b, "netns", pair.ns_b)
        for ns, ifname, addr in ((pair.ns_a, pair.if_a, pair.addr_a), (pair.ns_b, pair.if_b, pair.addr_b)):
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)
