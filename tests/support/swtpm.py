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


class Manufacturer:
    """A TPM vendor: its own swtpm-localca CA (a root and an intermediate that signs EK certificates).

    swtpm_setup's default configuration shares one local CA (/var/lib/swtpm-localca) between every
    TPM; a Manufacturer points swtpm_setup at a CA of its own (``--config``), which swtpm_localca
    creates on the first TPM it certifies. Both CAs of every manufacturer are named
    swtpm-localca-rootca / swtpm-localca, as swtpm makes them: only signatures tell them apart. The TPM
    attributes in the certificates come from the TPM (swtpm: manufacturer id:00001014, model swtpm).
    """

    def __init__(self, base_dir):
        self.dir = base_dir
        self.ca_dir = os.path.join(base_dir, "ca")
        os.makedirs(self.ca_dir, exist_ok=True)
        self.setup_config = os.path.join(base_dir, "swtpm_setup.conf")
        localca = os.path.join(base_dir, "swtpm-localca.conf")
        options = os.path.join(base_dir, "swtpm-localca.options")
        with open(localca, "w") as handle:
            handle.write("statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n" % (
                self.ca_dir, self.signing_key, self.intermediate, os.path.join(self.ca_dir, "certserial")))
        with open(options, "w") as handle:
            handle.write("--platform-manufacturer kcrypt-tests\n--platform-version 1.0\n--platform-model lab\n")
        with open(self.setup_config, "w") as handle:
            handle.write("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\n"
                         "active_pcr_banks = sha256\n" % (shutil.which("swtpm_localca") or "/usr/bin/swtpm_localca", localca, options))

    @property
    def signing_key(self):
        return os.path.join(self.ca_dir, "signkey.pem")

    @property
    def intermediate(self):
        """PEM of the CA that signs the EK certificates."""
        return os.path.join(self.ca_dir, "issuercert.pem")

    @property
    def root(self):
        return os.path.join(self.ca_dir, "swtpm-localca-rootca-cert.pem")


def write_nv_certificate(tcti, index, der):
    """Replace NV ``index`` with ``der`` under the platform hierarchy, as a vendor writes its EK certificate
    (0x01c00002) or chain (0x01c00100...); swtpm's platform authorisation is empty."""
    env = dict(os.environ, TPM2TOOLS_TCTI=tcti, TSS2_LOG="all+NONE")
    handle = "0x%08x" % index
    subprocess.run(["tpm2_nvundefine", "-C", "p", handle], env=env, capture_output=True, check=False)  # absent is fine
    attributes = "ppwrite|ppread|ownerread|authread|no_da|platformcreate"
    for args in (["tpm2_nvdefine", "-C", "p", "-s", str(len(der)), "-a", attributes, handle],
                 ["tpm2_nvwrite", "-C", "p", "-i", "-", handle]):
        result = subprocess.run(args, env=env, input=der if args[0] == "tpm2_nvwrite" else None, capture_output=True, check=False)
        if result.returncode:
            raise RuntimeError("%s failed: %s" % (" ".join(args), result.stderr.decode(errors="replace")))


def provision(state_dir, ek_cert=True, manufacturer=None):
    """Manufacture a TPM 2.0 state in ``state_dir``.

    With ``ek_cert`` the RSA EK is created, persisted at 0x81010001 and certified
    (NV 0x01c00002), like a TPM from a vendor; without it the TPM has neither and
    the EK comes from the TCG default template. ``manufacturer`` (a Manufacturer)
    certifies it with that vendor's CA instead of swtpm's shared local CA.
    """
    os.makedirs(state_dir, exist_ok=True)
    args = ["swtpm_setup", "--tpm2", "--tpmstate", state_dir, "--overwrite", "--pcr-banks", "sha256"]
    if ek_cert:
        args.append("--create-ek-cert")
    if manufacturer is not None:
        args += ["--config", manufacturer.setup_config]
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

    def __call__(self, ek_cert=True, fresh=False, manufacturer=None):
        """A started swtpm. ``fresh`` provisions a new identity instead of cloning the shared one; a ``manufacturer``
        (a Manufacturer) certifies a new identity with its CA."""
        self._count += 1
        state_dir = os.path.join(self.base_dir, "tpm%d" % self._count)
        if fresh or manufacturer is not None:
            provision(state_dir, ek_cert=ek_cert, manufacturer=manufacturer)
        else:
            shutil.copytree(self._template(ek_cert), state_dir)
        tpm = SwTPM(state_dir)
        self._started.append(tpm)
        return tpm.start()

    def stop_all(self):
        for tpm in self._started:
            tpm.stop()
        self._started = []
