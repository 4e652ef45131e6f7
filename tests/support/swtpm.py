# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Start and stop software TPMs (swtpm) on free loopback ports for tests.

Each SwTPM owns a state directory and one swtpm process, found and stopped by
the PID this code started. Provisioning (swtpm_setup) costs ~1 s, so callers
that only need "some TPM" copy a provisioned state instead of creating a new one;
a copy has the same EK (same TPM hash) as its source.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from support.process import stop as stop_process


def free_port_pair(host="127.0.0.1"):
    """A port P with P+1 also free on ``host`` (swtpm uses P for commands, P+1 for control)."""
    for dummy in range(200):
        with socket.socket() as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on %s" % host)


def provision(state_dir, ek_cert=True):
    """Manufacture a TPM 2.0 state in ``state_dir``.

    With ``ek_cert`` the RSA EK is created, persisted at 0x81010001 and certified
    (NV 0x01c00002), like a TPM from a vendor; without it the TPM has neither and
    the EK comes from the TCG default template.
    """
    os.makedirs(state_dir, exist_ok=True)
    args = ["swtpm_setup", "--tpm2", "--tpmstate", state_dir, "--overwrite", "--pcr-banks", "sha256"]
    if ek_cert:
        args.append("--create-ek-cert")
    # swtpm_setup reads a config from the user's home; point it at the packaged defaults.
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError("swtpm_setup failed: %s%s" % (result.stdout, result.stderr))


class SwTPM:
    """One swtpm process serving the TPM state in ``state_dir`` on 127.0.0.1."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.port = None
        self.process = None

    @property
    def tcti(self):
        return "swtpm:host=127.0.0.1,port=%d" % self.port

    def start(self, attempts=5):
        for dummy in range(attempts):
            self.port = free_port_pair()
            log = open(os.path.join(self.state_dir, "swtpm.log"), "ab")
            self.process = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2",
                    "--tpmstate", "dir=%s" % self.state_dir,
                    "--server", "type=tcp,port=%d,bindaddr=127.0.0.1" % self.port,
                    "--ctrl", "type=tcp,port=%d,bindaddr=127.0.0.1" % (self.port + 1),
                    "--flags", "not-need-init,startup-clear",
                ],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
            log.close()
            if self._wait_listening():
                return self
            self.stop()  # lost the race for the port pair: try another
        raise RuntimeError("swtpm did not start; see %s/swtpm.log" % self.state_dir)

    def _wait_listening(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", self.port + 1)) == 0:
                    return True
            time.sleep(0.01)
        return False

    def stop(self):
        """Stop the process this object started; waits for it so the state is flushed to disk."""
        stop_process(self.process, timeout=5)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class SwTPMFactory:
    """Hands out started SwTPMs under ``base_dir``, cloning provisioned templates; stops them all at the end."""

    def __init__(self, base_dir):
        self.base_dir = base_dir
        self._templates = {}
        self._started = []
        self._count = 0

    def _template(self, ek_cert):
        if ek_cert not in self._templates:
            path = os.path.join(self.base_dir, "template-%s" % ("ekcert" if ek_cert else "plain"))
            provision(path, ek_cert=ek_cert)
            self._templates[ek_cert] = path
        return self._templates[ek_cert]

    def __call__(self, ek_cert=True, fresh=False):
        """A started swtpm. ``fresh`` provisions a new identity instead of cloning the shared one."""
        self._count += 1
        state_dir = os.path.join(self.base_dir, "tpm%d" % self._count)
        if fresh:
            provision(state_dir, ek_cert=ek_cert)
        else:
            shutil.copytree(self._template(ek_cert), state_dir)
        tpm = SwTPM(state_dir)
        self._started.append(tpm)
        return tpm.start()

    def stop_all(self):
        for tpm in self._started:
            tpm.stop()
        self._started = []
