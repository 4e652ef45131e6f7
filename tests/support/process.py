# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stopping a process a test started (never anything else): SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess


def stop(process, timeout=10):
    """Stop ``process`` (a Popen this run started) and reap it; nothing if it has already ended."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def children(pid):
    """PIDs of the running child processes of ``pid``, sorted (from /proc: ppid == pid)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    return sorted(found)


def alive(pid):
    """Running (a zombie waiting for init to reap it does not count)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, TypeError):
        return False


def proc_kib(pid, field, source="status"):
    """The kB figure ``field`` (VmRSS, VmHWM, Pss, ...) of /proc/PID/``source``; 0 once the process is gone."""
    try:
        with open("/proc/%d/%s" % (pid, source)) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
