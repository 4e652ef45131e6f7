# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time the lab playbooks: lab_up (new lab), lab_up again (no change), lab_down.

    sudo .venv/bin/python bench/lab_timings.py [--nodes 3 10] [--netns]

Builds each lab in a temporary directory with a lab name and network of its own, and always
removes it. Prints one line per lab size; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import playbook  # noqa: E402


def timed(path, variables):
    start = time.monotonic()
    run = playbook.playbook(path, variables)
    seconds = time.monotonic() - start
    if run.rc != 0:
        raise SystemExit("%s failed: %r" % (path, run))
    return seconds, run.changed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--netns", action="store_true", help="every node in its own network namespace")
    args = parser.parse_args()
    print("%-6s %-6s %12s %16s %12s" % ("nodes", "netns", "lab_up (s)", "again (s)", "lab_down (s)"))
    for count in args.nodes:
        base = tempfile.mkdtemp(prefix="kcrypt-bench-lab-")
        variables = {"lab_dir": base + "/lab", "lab_inventory_path": base + "/lab/inventory.yml",
                     "lab_name": "kcrypt-bench-%d" % os.getpid(), "lab_node_count": count,
                     "lab_netns": args.netns, "lab_network": "10.213.%d.0/24" % (20 + os.getpid() % 80)}
        try:
            up = timed("playbooks/lab_up.yml", variables)[0]
            again, changed = timed("playbooks/lab_up.yml", variables)
            down = timed("playbooks/lab_down.yml", {"lab_dir": variables["lab_dir"]})[0]
        finally:
            playbook.playbook("playbooks/lab_down.yml", {"lab_dir": variables["lab_dir"]})
            shutil.rmtree(base, ignore_errors=True)
        print("%-6d %-6s %12.1f %10.1f (ch=%d) %12.1f" % (count, "yes" if args.netns else "no", up, again, changed, down))
    print("load average: %.2f %.2f %.2f on %d CPUs" % (os.getloadavg() + (os.cpu_count(),)))


if __name__ == "__main__":
    main()
