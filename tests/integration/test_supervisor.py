# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger role's supervisor (roles/challenger/files/kcrypt_supervise.py) with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support.process import alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUPERVISE = os.path.join(ROOT, "roles", "challenger", "files", "kcrypt_supervise.py")


def call(action, pidfile, *command, logfile=None, options=()):
    args = [sys.executable, SUPERVISE, action, "--pidfile", str(pidfile)] + list(options)
    if logfile:
        args += ["--logfile", str(logfile)]
    if command:
        args += ["--"] + list(command)
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def wait_for(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def supervised(tmp_path):
    pidfile = tmp_path / "run" / "svc.pid"
    logfile = tmp_path / "log" / "svc.log"
    started = []

    def start(*command, options=()):
        result = call("start", pidfile, *command, logfile=logfile, options=options)
        started.append(result.get("pid"))
        return result

    yield pidfile, logfile, start
    call("stop", pidfile)
    for pid in started:  # never leave one behind, even when a test failed half-way
        if alive(pid) and str(pidfile) in open("/proc/%d/cmdline" % pid).read():
            os.kill(pid, signal.SIGKILL)


SLEEPER = (sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)")


def test_start_is_idempotent_and_stop_ends_both_processes(supervised):
    pidfile, logfile, start = supervised
    first = start(*SLEEPER)
    assert first["changed"] and alive(first["pid"]) and alive(first["child_pid"])
    again = start(*SLEEPER)
    assert again["changed"] is False and again["pid"] == first["pid"]
    stopped = call("stop", pidfile)
    assert stopped["changed"]
    wait_for(lambda: not alive(first["child_pid"]))
    assert not alive(first["pid"]) and not pidfile.exists()
    assert "up" in logfile.read_text()
    assert call("stop", pidfile)["changed"] is False


def test_a_crashed_command_is_restarted(supervised):
    pidfile, _logfile, start = supervised
    first = start(*SLEEPER)
    os.kill(first["child_pid"], signal.SIGKILL)
    wait_for(lambda: call("status", pidfile)["child_pid"] not in (None, first["child_pid"]))
    assert call("status", pidfile)["pid"] == first["pid"]


def test_a_clean_exit_is_not_restarted(supervised):
    pidfile, logfile, start = supervised
    first = start(sys.executable, "-c", "import time; time.sleep(0.5)")
    wait_for(lambda: not alive(first["pid"]))
    assert call("status", pidfile)["running"] is False
    assert "exited cleanly" in logfile.read_text()


def test_a_stale_pid_file_is_not_trusted(supervised, tmp_path):
    pidfile, _logfile, start = supervised
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text("%d\n" % os.getpid())  # a live process that is not the supervisor
    assert call("status", pidfile)["running"] is False
    assert start(*SLEEPER)["changed"]


def test_a_command_that_cannot_start_is_retried_and_logged(supervised):
    pidfile, logfile, start = supervised
    start("/nonexistent/kcrypt-server")
    wait_for(lambda: "cannot start the server" in logfile.read_text())
    assert call("status", pidfile)["running"] is True  # still supervising, with back-off


def test_open_files_is_the_servers_limitnofile(supervised):
    """--open-files N gives the server N as soft and hard RLIMIT_NOFILE, as systemd's LimitNOFILE=N does."""
    import resource

    pidfile, _logfile, start = supervised
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if os.geteuid() == 0 or hard >= 4096 else hard  # root may raise the hard limit; others up to theirs
    result = start(*SLEEPER, options=("--open-files", str(wanted)))
    child = result["child_pid"]
    with open("/proc/%d/limits" % child) as handle:
        line = [entry for entry in handle if entry.startswith("Max open files")][0]
    assert line.split()[3:5] == [str(wanted), str(wanted)]
