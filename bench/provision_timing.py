# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time playbooks/provision.yml on labs of simulated nodes: first run, second run (no change).

    sudo .venv/bin/python bench/provision_timing.py [--nodes 3 10 30 100] [--forks 20] [--profile]

Per lab size: builds a lab in a temporary directory, runs provision.yml (deploys a fresh KMS,
registers and encrypts every node in place, verifies), runs it again (changed=0), then removes
the KMS and the lab. Prints per run the wall time, the wall time per node, the controller's peak
memory and the load average before the run; with two or more lab sizes, the marginal cost of one
more node between neighbouring sizes, (T_big - T_small) / (n_big - n_small), which leaves out
the fixed part (KMS deployment, Ansible start-up).

``ctl CPU`` is the CPU time of the ansible-playbook process itself (the strategy's loop, which
is single-threaded; workers and modules not counted); ``all CPU`` that of ansible-playbook with
every process it started and reaped (workers, modules, cryptsetup: the nodes' work, which on real
machines runs on their own CPUs). On this shared machine wall time cannot go below all CPU / cores.
The controller's memory: ``main`` is the peak RSS of the ansible-playbook process (VmHWM);
``all`` the peak, over samples every 0.5 s, of the summed PSS of ansible-playbook and its forked
workers (PSS shares the pages forks have in common, so the sum is not inflated). Module processes
(the "nodes") are not counted. ``--profile`` prints the slowest tasks of each run.
Asserts only that the runs succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import playbook  # noqa: E402
from support.ports import free_port  # noqa: E402
from support.process import children, proc_kib  # noqa: E402


def _is_controller(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return b"ansible-playbook" in handle.read()
    except OSError:
        return False


class ControllerMemory(threading.Thread):
    """Samples the ansible-playbook process and its forked workers until it exits."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.main_peak_kib = 0
        self.all_peak_kib = 0
        self.main_cpu = 0.0

    def _cpu(self):
        try:
            with open("/proc/%d/stat" % self.pid) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return self.main_cpu

    def run(self):
        while proc_kib(self.pid, "VmHWM"):
            self.main_cpu = self._cpu()
            self.main_peak_kib = max(self.main_peak_kib, proc_kib(self.pid, "VmHWM"))
            workers = [child for child in children(self.pid) if _is_controller(child)]
            pss = sum(proc_kib(pid, "Pss", "smaps_rollup") for pid in [self.pid] + workers)
            self.all_peak_kib = max(self.all_peak_kib, pss)
            time.sleep(0.5)


def run_playbook(path, variables, inventory, forks, settings):
    """ansible-playbook as tests/support/playbook.py runs it, with the memory sampler attached."""
    playbook.ensure_collection_link()
    args = [os.path.join(playbook.BIN, "ansible-playbook"), os.path.join(ROOT, path), "-i", inventory,
            "-e", json.dumps(variables), "--forks", str(forks)]
    env = playbook.environment(dict(settings, KCRYPT_MDNS_INTERFACES="127.0.0.1"))
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    memory = ControllerMemory(process.pid)
    memory.start()
    stdout, stderr = process.communicate(timeout=3600)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    all_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    memory.join()
    run = playbook.Run(args, subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    if run.rc != 0:
        raise SystemExit("%s failed: %r" % (path, run))
    return {"seconds": seconds, "changed": run.changed, "main_mib": memory.main_peak_kib / 1024.0, "main_cpu": memory.main_cpu, "all_cpu": all_cpu,
            "all_mib": memory.all_peak_kib / 1024.0, "run": run, "end": time.time()}


def slowest_tasks(result, count=8):
    """(seconds, task name) of the longest tasks: time from a task's start to the next one's."""
    tasks = [task["task"] for play in result["run"].data["plays"] for task in play["tasks"] if "started" in task["task"]]
    spans = []
    for index, task in enumerate(tasks):
        end = tasks[index + 1]["started"] if index + 1 < len(tasks) else result["end"]
        spans.append((end - task["started"], task["name"]))
    return sorted(spans, reverse=True)[:count]


def kms_absent(inventory):
    with open(os.path.join(ROOT, "playbooks", "vars", "lab_challenger.yml")) as handle:
        variables = yaml.safe_load(handle)
    variables.update({"challenger_state": "absent", "challenger_purge": True})
    playbook.playbook("playbooks/challenger.yml", variables, inventory=inventory)


def one_size(count, forks, profile, settings):
    base = tempfile.mkdtemp(prefix="kcrypt-bench-provision-")
    lab = {"lab_dir": base + "/lab", "lab_inventory_path": base + "/lab/inventory.yml",
           "lab_name": "kcrypt-bp-%d" % os.getpid(), "lab_node_count": count}
    try:
        start = time.monotonic()
        run = playbook.playbook("playbooks/lab_up.yml", lab, timeout=1800)
        if run.rc != 0:
            raise SystemExit("lab_up failed: %r" % run)
        up = time.monotonic() - start
        port = free_port()
        runs = []
        for _run_name in ("first", "second"):
            load = os.getloadavg()[0]
            runs.append(dict(run_playbook("playbooks/provision.yml", {"challenger_port": port},
                                          lab["lab_inventory_path"], forks, settings), load=load))
    finally:
        try:
            if os.path.exists(lab["lab_inventory_path"]):
                kms_absent(lab["lab_inventory_path"])
        finally:
            playbook.playbook("playbooks/lab_down.yml", lab, timeout=1800)
            shutil.rmtree(base, ignore_errors=True)
    if profile:
        for name, result in zip(("first", "second"), runs):
            print("  %d nodes, %s run, slowest tasks:" % (count, name))
            for seconds, task in slowest_tasks(result):
                print("    %6.1f s  %s" % (seconds, task))
    return runs, up


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 30, 100])
    parser.add_argument("--forks", type=int, default=20, help="ansible-playbook --forks (ansible.cfg's default is 20)")
    parser.add_argument("--profile", action="store_true", help="print the slowest tasks of each run")
    parser.add_argument("--strategy", help="ANSIBLE_STRATEGY for provision.yml (linear, free)")
    parser.add_argument("--pipelining", choices=("true", "false"), help="ANSIBLE_PIPELINING for provision.yml")
    args = parser.parse_args()
    settings = {}
    if args.strategy:
        settings["ANSIBLE_STRATEGY"] = args.strategy
    if args.pipelining:
        settings["ANSIBLE_PIPELINING"] = args.pipelining
    print("settings: forks %d%s" % (args.forks, "".join(", %s=%s" % item for item in sorted(settings.items()))))
    header = "%-6s %-6s %-7s %10s %10s %9s %10s %10s %14s %10s %9s %8s"
    row = "%-6d %-6d %-7s %10.1f %10.2f %9d %10.1f %10.1f %14.0f %10.0f %9.1f %8.2f"
    print(header % ("nodes", "forks", "run", "wall (s)", "s/node", "changed", "ctl CPU s", "all CPU s", "ctl main MiB",
                    "ctl all MiB", "lab_up s", "load"))
    firsts = {}
    for count in args.nodes:
        runs, up = one_size(count, args.forks, args.profile, settings)
        firsts[count] = runs[0]["seconds"]
        for name, result in zip(("first", "second"), runs):
            print(row % (count, args.forks, name, result["seconds"], result["seconds"] / count, result["changed"],
                         result["main_cpu"], result["all_cpu"], result["main_mib"], result["all_mib"], up, result["load"]))
        sys.stdout.flush()
    sizes = sorted(firsts)
    for small, big in zip(sizes, sizes[1:]):
        print("first run, %d -> %d nodes: one more node adds %.2f s" % (small, big, (firsts[big] - firsts[small]) / (big - small)))
    print("load average at the end: %.2f %.2f %.2f on %d CPUs" % (os.getloadavg() + (os.cpu_count(),)))


if __name__ == "__main__":
    main()
