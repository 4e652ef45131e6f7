# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small process supervisor for hosts without systemd (containers, CI machines).

Installed by the kairos.kcrypt ``challenger`` role next to the server. It gives the
challenger what its systemd unit gives it elsewhere: one background instance with a
PID file, output appended to a log file, the service user's identity, and a restart
after a failure (``Restart=on-failure``, with back-off) but not after a clean stop.

    kcrypt_supervise.py start   --pidfile P --logfile L [--user U] [--group G] [--open-files N] -- COMMAND...
    kcrypt_supervise.py stop    --pidfile P
    kcrypt_supervise.py restart --pidfile P --logfile L [...] -- COMMAND...
    kcrypt_supervise.py status  --pidfile P

Every call prints one JSON object (``changed``, ``running``, ``pid``, ``child_pid``).

Why a program and not a module (unlike the role's TLS and Kubernetes steps, which are the
kairos_challenger_tls and kairos_k8s_objects modules): the supervisor is a daemon that
must outlive the Ansible task and be restartable by the handler, an operator or a boot
script, so it runs from a file installed on the host; an Ansible module only lives in a
temporary directory for the length of one task. ``start``/``stop``/``restart``/``status``
stay in this same file, so the rule that decides which process is the service (below)
exists once.
``start`` does nothing when the instance of that PID file runs already. The PID file
holds the supervisor's PID; ``<pidfile>.child`` the server's. A PID is trusted only
while that process's command line still names the PID file, so a stale file (after a
reboot, with the PID reused) is never mistaken for the service.

``--open-files N`` is systemd's ``LimitNOFILE=N``: the server starts with N as its soft and hard
RLIMIT_NOFILE (set before the privileges are dropped, so it may be raised above the supervisor's own).
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import resource
import signal
import subprocess
import sys
import time

STOP_TIMEOUT = 10.0  # seconds a stopping server gets before SIGKILL (systemd's TimeoutStopSec, shorter)
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # restart delay after a failure, doubled each time
HEALTHY_AFTER = 60.0  # a run this long resets the back-off


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def parent_of(pid):
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def read_pid(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def running_supervisor(pidfile):
    """The PID of the live supervisor of this PID file, or 0."""
    pid = read_pid(pidfile)
    argv = cmdline(pid) if pid > 0 else []
    if os.path.abspath(pidfile) in argv and any(os.path.basename(arg) == "kcrypt_supervise.py" for arg in argv):
        return pid
    return 0


def status(pidfile):
    pid = running_supervisor(pidfile)
    child = read_pid(pidfile + ".child") if pid else 0
    if child and not cmdline(child):
        child = 0
    return {"running": bool(pid), "pid": pid or None, "child_pid": child or None}


def write_pid(path, pid):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as handle:
        handle.write("%d\n" % pid)
    os.replace(tmp, path)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def identity(user, group):
    """(uid, gid, supplementary gids) to run the server as, or None to keep ours."""
    if not user:
        return None
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    groups = os.getgrouplist(entry.pw_name, gid)
    return entry.pw_uid, gid, groups


def set_open_files(limit):
    """LimitNOFILE=limit for this process and what it runs; as much as allowed when not privileged."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        except (ValueError, OSError):
            pass  # keep the inherited limit; the server logs the one it got


def supervise(args):
    """The daemon: run the command, restart it after failures, stop it on SIGTERM."""
    ident = identity(args.user, args.group)
    stopping = {"flag": False}
    child = {"process": None}

    def on_term(signum, frame):
        stopping["flag"] = True
        if child["process"] is not None and child["process"].poll() is None:
            child["process"].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def drop_privileges():
        os.setsid()
        if args.open_files:
            set_open_files(args.open_files)
        if ident:
            uid, gid, groups = ident
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)

    backoff = BACKOFF_FIRST
    try:
        while not stopping["flag"]:
            started = time.monotonic()
            log("starting: %s" % " ".join(args.command))
            try:
                child["process"] = subprocess.Popen(args.command, stdin=subprocess.DEVNULL, stdout=sys.stdout,
                                                    stderr=sys.stderr, cwd=args.workdir or "/", preexec_fn=drop_privileges)
            except (OSError, subprocess.SubprocessError) as error:
                log("cannot start the server: %s" % error)
                rc = "not started"
            else:
                write_pid(args.pidfile + ".child", child["process"].pid)
                rc = wait(child["process"], stopping)
            if stopping["flag"]:
                break
            if rc == 0:
                log("exited cleanly; not restarting")
                break
            if time.monotonic() - started >= HEALTHY_AFTER:
                backoff = BACKOFF_FIRST
            log("exited with status %s; restarting in %.0f s" % (rc, backoff))
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stopping["flag"]:
                time.sleep(0.1)
            backoff = min(backoff * 2, BACKOFF_MAX)
    finally:
        remove(args.pidfile + ".child")
        remove(args.pidfile)
        log("supervisor stopped")


def wait(process, stopping):
    """Wait for the server; after a SIGTERM give it STOP_TIMEOUT seconds, then SIGKILL."""
    deadline = None
    while True:
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if stopping["flag"]:
            deadline = deadline or time.monotonic() + STOP_TIMEOUT
            if time.monotonic() > deadline:
                process.kill()


def log(message):
    sys.stderr.write("%s kcrypt_supervise: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S%z"), message))
    sys.stderr.flush()


def start(args):
    current = status(args.pidfile)
    if current["running"]:
        return dict(current, changed=False)
    if not args.command:
        raise SystemExit("start: no command given (after --)")
    for path in (args.pidfile, args.logfile):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first == 0:  # detach: new session, second fork, stdio to the log
        os.close(ready_r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.umask(0o027)
        os.chdir("/")
        log_fd = os.open(args.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        write_pid(args.pidfile, os.getpid())
        os.write(ready_w, b"1")
        os.close(ready_w)
        try:
            supervise(args)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.waitpid(first, 0)
    os.read(ready_r, 1)  # the PID file is written
    os.close(ready_r)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not status(args.pidfile)["child_pid"]:
        time.sleep(0.05)
    return dict(status(args.pidfile), changed=True)


def stop(args):
    pid = running_supervisor(args.pidfile)
    if not pid:
        return {"changed": False, "running": False, "pid": None, "child_pid": None}
    child = read_pid(args.pidfile + ".child")
    child = child if child > 0 and parent_of(child) == pid else 0  # only the supervisor's own child
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT + 5
    while cmdline(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            if child and cmdline(child):
                os.kill(child, signal.SIGKILL)
            remove(args.pidfile + ".child")
            remove(args.pidfile)
            break
        time.sleep(0.05)
    return {"changed": True, "running": False, "pid": None, "child_pid": None}


def restart(args):
    stop(args)
    return dict(start(args), changed=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        command = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="kcrypt_supervise.py", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("action", choices=("start", "stop", "restart", "status"))
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--logfile", default="")
    parser.add_argument("--user", default="")
    parser.add_argument("--group", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--open-files", dest="open_files", type=int, default=0,
                        help="RLIMIT_NOFILE of the server (soft and hard), like systemd's LimitNOFILE")
    args = parser.parse_args(argv)
    args.pidfile = os.path.abspath(args.pidfile)
    args.command = command
    if args.action in ("start", "restart") and not args.logfile:
        parser.error("--logfile is required to start")
    actions = {"start": start, "stop": stop, "restart": restart,
               "status": lambda a: dict(status(a.pidfile), changed=False)}
    try:
        result = actions[args.action](args)
    except (OSError, KeyError) as error:
        json.dump({"failed": True, "changed": False, "msg": "%s: %s" % (args.action, error)}, sys.stdout)
        sys.stderr.write("kcrypt_supervise %s: %s\n" % (args.action, error))
        return 1
    json.dump(result, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
