# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Discovery-client benchmark: what a booting node waits for, on this machine.

    .venv/bin/python bench/discovery.py [--runs 5]

Measures, with a swtpm as the node's TPM and ``kcrypt-challenger serve`` on 127.0.0.1:

* mDNS announce  — Announcer.start() (zeroconf probing + announcement);
* mDNS resolve   — mdns.resolve() of an announced name on 127.0.0.1;
* config read    — client_config.read_settings() over 20 cloud-config files + a cmdline;
* CLI root       — ``kcrypt-discovery-challenger`` printing the TPM hash (process start included);
* CLI get        — ``get`` of an enrolled node (process start, transient AK, attestation);
* CLI get --mdns — the same, resolving the KMS with mDNS first;
* plugin mode    — a ``discovery.password`` event with the newest payload.

Prints median and max wall time per step; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _checkout  # noqa: E402

_checkout.setup()

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kairos_config as client_config
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns  # noqa: E402
from support.challenger import ChallengerProcess  # noqa: E402
from support.discovery_node import DiscoveryNode  # noqa: E402
from support.swtpm import SwTPMFactory  # noqa: E402
from support.ports import free_port  # noqa: E402


def timed(runs, action):
    times = []
    for dummy in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def report(name, times):
    print("%-16s median %7.3f s   max %7.3f s   (n=%d)" % (name, statistics.median(times), max(times), len(times)))


def check(result):
    if result.returncode != 0:
        raise SystemExit("failed: %s" % result.stderr.decode()[-500:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print("load average: %.2f %.2f %.2f" % os.getloadavg())
    work = tempfile.mkdtemp(prefix="kcrypt-bench-discovery-")
    tpms = SwTPMFactory(work)
    try:
        tpm = tpms(ek_cert=True)
        host = "bench-%s.local" % uuid.uuid4().hex[:8]
        port = free_port()

        announcers = []

        def announce():
            announcers.append(mdns.Announcer("a%d-%s" % (len(announcers), host), port,
                                             interfaces=["127.0.0.1"], instance="bench%d" % len(announcers)).start())

        report("mDNS announce", timed(runs, announce))
        report("mDNS resolve", timed(runs, lambda: mdns.resolve("a0-" + host, timeout=10, interfaces=["127.0.0.1"])))
        for announcer in announcers:
            announcer.stop()

        oem = os.path.join(work, "oem")
        os.makedirs(oem)
        for index in range(20):
            with open(os.path.join(oem, "%02d.yaml" % index), "w") as handle:
                handle.write("#cloud-config\nstages: {}\nkcrypt:\n  challenger:\n    challenger_server: http://kms:%d\n" % index)
        cmdline = os.path.join(work, "cmdline")
        with open(cmdline, "w") as handle:
            handle.write("BOOT_IMAGE=/vmlinuz root=LABEL=COS_ACTIVE kcrypt.challenger.mdns=false rd.neednet=1\n")
        report("config read", timed(runs, lambda: client_config.read_settings([oem], cmdline)))

        node = DiscoveryNode(os.path.join(work, "node"), os.environ)
        report("CLI root", timed(runs, lambda: check(node.run("--tpm-device", tpm.tcti))))

        args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % work,
                "--mdns-host", host, "--mdns-interface", "127.0.0.1"]
        with ChallengerProcess(args, port, log_path=os.path.join(work, "kms.log")):
            get = ["get", "--partition-label", "COS_PERSISTENT", "--tpm-device", tpm.tcti]
            check(node.run(*get, "--challenger-server", "http://127.0.0.1:%d" % port))  # enrol first
            report("CLI get", timed(runs, lambda: check(node.run(*get, "--challenger-server", "http://127.0.0.1:%d" % port))))
            report("CLI get --mdns", timed(runs, lambda: check(node.run(
                *get, "--challenger-server", "http://%s" % host, "--mdns", "--mdns-interfaces", "127.0.0.1"))))
            node.config("kcrypt:\n  tpm_device: %s\n" % tpm.tcti)
            event = json.dumps({"partition": {"name": "vda5", "label": "COS_PERSISTENT"},
                                "challenger_server": "http://127.0.0.1:%d" % port})
            report("plugin mode", timed(runs, lambda: check(node.plugin(event))))
    finally:
        tpms.stop_all()
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main()
