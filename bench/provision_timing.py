# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time playbooks/provision.yml on labs of simulated nodes: first run, second run (no change).

    sudo .venv/bin/python bench/provision_timing.py [--nodes 3 10]

Per lab size: builds a lab in a temporary directory, runs provision.yml (deploys a fresh KMS,
registers and encrypts every node in place, verifies), runs it again (changed=0), then removes
the KMS and the lab. Prints the wall times, the wall time per node, and (with two or more lab
sizes) the marginal cost of one more node, (T_big - T_small) / (n_big - n_small), which leaves
out the fixed part (KMS deployment, Ansible start-up). Asserts only that the runs succeed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import playbook  # noqa: E402
from support.ports import free_port  # noqa: E402


def timed_provision(inventory, port):
    env = {"KCRYPT_MDNS_INTERFACES": "127.0.0.1"}
    start = time.monotonic()
    run = playbook.playbook("playbooks/provision.yml", {"challenger_port": port}, inventory=inventory, env=env, timeout=1800)
    seconds = time.monotonic() - start
    if run.rc != 0:
        raise SystemExit("provision.yml failed: %r" % run)
    return seconds, run.changed


def kms_absent(inventory):
    with open(os.path.join(ROOT, "playbooks", "vars", "lab_challenger.yml")) as handle:
        variables = yaml.safe_load(handle)
    variables.update({"challenger_state": "absent", "challenger_purge": True})
    playbook.playbook("playbooks/challenger.yml", variables, inventory=inventory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10])
    args = parser.parse_args()
    print("%-6s %10s %14s %18s %12s" % ("nodes", "first (s)", "per node (s)", "second (s)", "lab_up (s)"))
    firsts = {}
    for count in args.nodes:
        base = tempfile.mkdtemp(prefix="kcrypt-bench-provision-")
        lab = {"lab_dir": base + "/lab", "lab_inventory_path": base + "/lab/inventory.yml",
               "lab_name": "kcrypt-bp-%d" % os.getpid(), "lab_node_count": count}
        try:
            start = time.monotonic()
            run = playbook.playbook("playbooks/lab_up.yml", lab)
            if run.rc != 0:
                raise SystemExit("lab_up failed: %r" % run)
            up = time.monotonic() - start
            port = free_port()
            first = timed_provision(lab["lab_inventory_path"], port)[0]
            second, changed = timed_provision(lab["lab_inventory_path"], port)
        finally:
            if os.path.exists(lab["lab_inventory_path"]):
                kms_absent(lab["lab_inventory_path"])
            playbook.playbook("playbooks/lab_down.yml", lab)
            shutil.rmtree(base, ignore_errors=True)
        firsts[count] = first
        print("%-6d %10.1f %14.1f %10.1f (ch=%d) %12.1f" % (count, first, first / count, second, changed, up))
    if len(firsts) > 1:
        small, big = min(firsts), max(firsts)
        print("one more node adds %.1f s to the first run" % ((firsts[big] - firsts[small]) / (big - small)))
    print("load average: %.2f %.2f %.2f on %d CPUs" % (os.getloadavg() + (os.cpu_count(),)))


if __name__ == "__main__":
    main()
