# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a lab (kairos.kcrypt.lab) left on this machine, found independently of the role, and a last
resort that removes it after a failed test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

from support.playbook import ROOT

HELPER = os.path.join(ROOT, "roles", "lab", "files", "kcrypt_lab.py")


def load_helper():
    spec = importlib.util.spec_from_file_location("kcrypt_lab_helper", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def processes(lab_dir):
    """(pid, argv) of every process whose command line names a path in lab_dir: the nodes' swtpms
    (dir=<lab>/nodes/<node>/tpm) and a KMS deployed into the lab (its supervisor, server, workers)."""
    marker = str(lab_dir).rstrip("/").encode() + b"/"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    argv = [arg for arg in handle.read().split(b"\0") if arg]
            except OSError:
                continue
            if any(marker in arg for arg in argv):
                found.append((int(entry), b" ".join(argv).decode(errors="replace")))
    return found


def leftovers(lab_dir, name):
    """Everything on this machine that belongs to the lab in lab_dir (empty when it is gone)."""
    found = [("process", pid) for pid, _argv in processes(lab_dir)]
    listing = json.loads(subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True, check=False).stdout
                         or '{"loopdevices": []}')
    for loop in listing["loopdevices"]:
        if (loop.get("back-file") or "").startswith(str(lab_dir)):
            found.append(("loop", loop["name"]))
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.splitlines():
        if line.split()[0].startswith(name + "-"):
            found.append(("netns", line.split()[0]))
    bridge = load_helper().Lab(str(lab_dir)).bridge
    if subprocess.run(["ip", "link", "show", "dev", bridge], capture_output=True, check=False).returncode == 0:
        found.append(("bridge", bridge))
    if os.path.exists(lab_dir):
        found.append(("dir", str(lab_dir)))
    return found


def force_remove(lab_dir, name):
    """Last resort after a failed test: remove what the lab made, by the same identities."""
    for kind, what in leftovers(lab_dir, name):
        if kind == "process":
            subprocess.run(["kill", "-9", str(what)], check=False)
        elif kind == "loop":
            subprocess.run(["partx", "--delete", what], capture_output=True, check=False)
            subprocess.run(["losetup", "--detach", what], check=False)
        elif kind == "netns":
            subprocess.run(["ip", "netns", "delete", what], check=False)
        elif kind == "bridge":
            subprocess.run(["ip", "link", "delete", what], check=False)
    subprocess.run(["rm", "-rf", str(lab_dir)], check=False)
