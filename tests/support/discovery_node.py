# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A fake Kairos node for running bin/kcrypt-discovery-challenger as a process in tests.

Its config directory, kernel command line and plugin log file live under a temporary
directory and reach the CLI through KCRYPT_CONFIG_DIRS, KCRYPT_CMDLINE and
KCRYPT_DISCOVERY_LOG, so nothing on the host (/oem, /proc/cmdline, /var/log) is read or written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "bin", "kcrypt-discovery-challenger")


class DiscoveryNode:
    def __init__(self, base, env, cmdline="BOOT_IMAGE=/vmlinuz root=LABEL=COS_ACTIVE\n"):
        self.oem = os.path.join(str(base), "oem")
        self.cmdline = os.path.join(str(base), "cmdline")
        self.log_file = os.path.join(str(base), "log", "kcrypt-discovery-challenger.log")
        os.makedirs(self.oem, exist_ok=True)
        with open(self.cmdline, "w") as handle:
            handle.write(cmdline)
        self.env = dict(env)
        self.env.update(KCRYPT_CONFIG_DIRS=self.oem, KCRYPT_CMDLINE=self.cmdline, KCRYPT_DISCOVERY_LOG=self.log_file)
        # KCRYPT_MDNS_INTERFACES stays: it keeps test mDNS traffic on this machine.
        for name in ("KCRYPT_DISCOVERY_DEBUG", "KCRYPT_TPM_DEVICE"):
            self.env.pop(name, None)

    def config(self, text, name="90_kcrypt.yaml"):
        """Write a #cloud-config file into the node's /oem."""
        with open(os.path.join(self.oem, name), "w") as handle:
            handle.write("#cloud-config\n" + text)

    def command(self, *args):
        return [sys.executable, CLI, *args]

    def run(self, *args, stdin=None, env=None, timeout=120):
        return subprocess.run(self.command(*args), input=stdin, capture_output=True, check=False,
                              env=dict(self.env, **(env or {})), timeout=timeout)

    def plugin(self, data, env=None, file=""):
        """Send one discovery.password event; ``data`` is the payload string."""
        event = json.dumps({"name": "discovery.password", "data": data, "file": file})
        return self.run("discovery.password", stdin=event.encode(), env=env)

    def log_text(self):
        with open(self.log_file) as handle:
            return handle.read()


def plugin_reply(result):
    """The plugin's JSON reply, checking that stdout held exactly that and the exit code was 0."""
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert list(reply) == ["state", "data", "error", "log"]
    return reply
