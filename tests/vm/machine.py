# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Boot the test VM under QEMU TCG with a swtpm vTPM, run one payload, read the result off the serial console.

A ``Machine`` is one node: a TPM state directory, its disks and the project
checkout it runs. Each ``boot(payload)`` starts a fresh swtpm on that state
(swtpm ends when the VM powers off) and QEMU, waits for the guest to power
itself off, and returns a ``BootResult`` parsed from the console log, which is
kept in the machine's directory. Both processes are stopped by the PID this
code started, also on timeouts and errors.

Markers the guest prints (see guest/init): ``KCRYPT-VM-BOOTED``, ``-READY``,
``-RESULT <name> <value>`` (from the payload's ``result`` helper) and
``-EXIT <payload exit code>``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from support.process import stop as stop_process

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
RELAY = os.path.join(HERE, "relay.py")
HOST_ALIAS = "10.0.2.2"  # the host as QEMU user networking shows it to the guest
PR_SET_PDEATHSIG = 1

# Shell prepended to every payload: the project's CLIs on PATH and a helper that
# reports a value to the host (on one line: newlines become spaces).
PAYLOAD_PREAMBLE = """\
export PATH=/kcrypt/bin:$PATH
result() { printf 'KCRYPT-VM-RESULT %s %s\\n' "$1" "$(printf '%s' "$2" | tr '\\n' ' ')"; }
"""


class VMError(RuntimeError):
    """The VM did not boot or did not finish; the message names the console log."""


@dataclass
class BootResult:
    name: str
    exit_code: int | None  # the payload's exit code; None when the guest never got there
    output: str  # the console from READY to EXIT: what the payload printed
    results: dict  # name -> value from KCRYPT-VM-RESULT lines
    console_log: str
    seconds: float  # wall time from starting QEMU to its exit
    stamps: dict = field(default_factory=dict)  # seconds after QEMU started when BOOTED/READY/EXIT appeared

    @property
    def ok(self):
        return self.exit_code == 0

    def tail(self, lines=40):
        with open(self.console_log, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])


def parse_console(name, text, console_log, seconds):
    results = {}
    exit_code = None
    output = []
    in_payload = False
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        # a marker may follow payload output that did not end its line
        marker = line.find("KCRYPT-VM-")
        if marker > 0:
            if in_payload:
                output.append(line[:marker])
            line = line[marker:]
        if line.startswith("KCRYPT-VM-RESULT "):
            parts = line.split(" ", 2)
            results[parts[1]] = parts[2] if len(parts) > 2 else ""
            continue
        match = re.match(r"KCRYPT-VM-(BOOTED|READY|EXIT)(?: (-?\d+))?", line)
        if match:
            stage, code = match.groups()
            if stage == "READY":
                in_payload = True
            elif stage == "EXIT":
                in_payload = False
                exit_code = int(code)
            continue
        if in_payload:
            output.append(line)
    return BootResult(name, exit_code, "\n".join(output), results, console_log, seconds)


def _copy_console(stream, path, started, stamps, echo=None):
    """Copy QEMU's console to ``path`` as it comes, noting when each stage marker appears."""
    with open(path, "wb") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if echo:
                echo(line.decode(errors="replace").rstrip("\r\n"))
            match = re.search(rb"KCRYPT-VM-(BOOTED|READY|EXIT)", line)
            if match:
                stamps[match.group(1).decode().lower()] = round(time.monotonic() - started, 2)
    stream.close()


def _die_with_parent():
    """Runs in the child before exec: SIGTERM it if the test process dies, so no VM outlives its test run."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Machine:
    """One test node: its TPM state, disks and checkout; boots any number of times.

    ``tpm_state`` is a provisioned swtpm state directory (see tests/support/swtpm.py);
    it persists across boots like a real TPM. ``disks`` are raw image files, attached
    as /dev/vda, /dev/vdb, ... ``forwards`` are host loopback ports the guest may
    reach at 10.0.2.2:PORT; nothing else is reachable (QEMU ``restrict=on``).
    """

    def __init__(self, image, directory, tpm_state, disks=(), forwards=(), checkout=CHECKOUT, memory=512, timeout=300):
        self.image = image
        self.directory = directory
        self.tpm_state = tpm_state
        self.disks = list(disks)
        self.forwards = list(forwards)
        self.checkout = checkout
        self.memory = memory
        self.timeout = timeout
        self.boots = []
        os.makedirs(directory, exist_ok=True)

    def _qemu_args(self, jobdir, tpm_socket):
        # restrict=on: the guest reaches nothing but the guestfwd ports below. QEMU refuses a
        # guestfwd on its own host address, so the slirp host moves to .254 and 10.0.2.2 becomes
        # a plain forwarding address (the one Kairos docs and the tests use).
        netdev = "user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.254"
        for port in self.forwards:
            # the cmd: form runs relay.py per connection; the tcp: form would serve only one per boot
            netdev += ",guestfwd=tcp:%s:%d-cmd:%s %s %d" % (HOST_ALIAS, port, sys.executable, RELAY, port)
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-m", str(self.memory),
            "-nographic", "-vga", "none", "-no-reboot",
            "-kernel", self.image.kernel, "-initrd", self.image.initrd,
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-chardev", "socket,id=chrtpm,path=%s" % tpm_socket,
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",  # no iPXE ROM: we boot -kernel
            "-virtfs", "local,path=%s,mount_tag=kcrypt,security_model=none,readonly=on" % self.checkout,
            "-virtfs", "local,path=%s,mount_tag=job,security_model=none,readonly=on" % jobdir,
        ]
        for disk in self.disks:
            args += ["-drive", "file=%s,format=raw,if=virtio,cache=unsafe" % disk]
        return args

    def _start_swtpm(self, socket_path, log_path):
        process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=%s" % self.tpm_state,
             "--ctrl", "type=unixio,path=%s" % socket_path, "--log", "file=%s,level=1" % log_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 5
        while not os.path.exists(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                raise VMError("swtpm did not start; see %s" % log_path)
            time.sleep(0.01)
        return process

    def boot(self, payload, name=None, files=None, timeout=None, echo=None, interactive=False):
        """Boot once, run ``payload`` (shell) as init's job, return its BootResult.

        ``files`` ({name: text}) are placed next to the payload in /job. ``echo`` is
        called with each console line as it arrives. ``interactive`` attaches the
        console to this terminal instead (no log, returns None): for tests/vm/run.py.
        """
        name = name or "boot%d" % (len(self.boots) + 1)
        jobdir = os.path.join(self.directory, "%s-job" % name)
        os.makedirs(jobdir, exist_ok=True)
        with open(os.path.join(jobdir, "payload.sh"), "w") as handle:
            handle.write(PAYLOAD_PREAMBLE + payload)
        for filename, text in (files or {}).items():
            with open(os.path.join(jobdir, filename), "w") as handle:
                handle.write(text)
        console_log = os.path.join(self.directory, "%s.console.log" % name)
        # UNIX socket paths are limited to 108 bytes: keep the socket in a short private directory.
        sockdir = tempfile.mkdtemp(prefix="kcrypt-vm-")
        swtpm = qemu = None
        stamps = {}
        started = time.monotonic()
        try:
            swtpm = self._start_swtpm(os.path.join(sockdir, "tpm.sock"), os.path.join(self.directory, "%s.swtpm.log" % name))
            args = self._qemu_args(jobdir, os.path.join(sockdir, "tpm.sock"))
            if interactive:
                qemu = subprocess.Popen(args, preexec_fn=_die_with_parent)
                qemu.wait()
                return None
            qemu = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
            reader = threading.Thread(target=_copy_console, args=(qemu.stdout, console_log, started, stamps, echo), daemon=True)
            reader.start()
            try:
                qemu.wait(timeout=timeout or self.timeout)
            except subprocess.TimeoutExpired:
                stop_process(qemu)
                raise VMError("VM %s did not power off within %d s; console log: %s"
                              % (name, timeout or self.timeout, console_log)) from None
            finally:
                reader.join(timeout=5)
            # swtpm ends by itself when QEMU closes the control channel; give it a moment to save its state.
            try:
                swtpm.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            stop_process(qemu)
            stop_process(swtpm)
            shutil.rmtree(sockdir, ignore_errors=True)
        seconds = time.monotonic() - started
        with open(console_log, "a") as handle:  # for whoever reads the log later
            handle.write("\n# kcrypt-vm: %s took %.1f s (host clock, seconds after QEMU started: %s)\n"
                         % (name, seconds, " ".join("%s=%s" % item for item in stamps.items())))
        with open(console_log, errors="replace") as handle:
            result = parse_console(name, handle.read(), console_log, seconds)
        result.stamps = stamps
        self.boots.append(result)
        if result.exit_code is None:
            raise VMError("VM %s ended (QEMU exit %s) before its payload finished; console log: %s\n%s"
                          % (name, qemu.returncode, console_log, result.tail()))
        return result


def make_persistent_disk(path, size_mib=128, label="COS_PERSISTENT", partname="persistent", content_dir=None):
    """A raw disk image with one GPT partition ``partname`` holding ext4 labelled ``label``.

    Built without loop devices: sgdisk on the file, mke2fs at the partition's offset,
    optionally filled from ``content_dir`` (mke2fs -d). Returns the partition's
    (first sector, sector count).
    """
    with open(path, "wb") as handle:
        handle.truncate(size_mib * 2**20)
    env = dict(os.environ, LANG="C")
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-c", "1:%s" % partname, path], check=True, capture_output=True, env=env)
    info = subprocess.run(["sgdisk", "-i", "1", path], check=True, capture_output=True, text=True, env=env).stdout
    first = int(re.search(r"First sector: (\d+)", info).group(1))
    last = int(re.search(r"Last sector: (\d+)", info).group(1))
    sectors = last - first + 1
    args = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-E", "offset=%d" % (first * 512)]
    if content_dir:
        args += ["-d", content_dir]
    subprocess.run(args + [path, "%dk" % (sectors // 2)], check=True, capture_output=True, env=env)
    return first, sectors
