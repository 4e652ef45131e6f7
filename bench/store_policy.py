# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cost of the policy + store part of one attestation, per backend. Prints figures, asserts nothing.

    .venv/bin/python bench/store_policy.py [--count 2000] [--kubernetes]

* ``known``: ``issue_passphrase`` for an enrolled TPM (lookup, verification, Secret read): what
  every boot after the first costs.
* ``tofu``: a first contact (free-name check, Secret create, SealedVolume create).
* ``learn``: a contact that learns one PCR (one update with resourceVersion).

CPU is this process's CPU time (user+sys) per call. For SQLite it is the whole cost, since
``synchronous=FULL`` fsyncs count as wall time, not CPU. ``--kubernetes`` also runs against the
kmock-based API emulator, which runs as its own process: its CPU is not counted here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _checkout  # noqa: E402

_checkout.setup()

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy as pol  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store_factory as st  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef  # noqa: E402

EK = "-----BEGIN PUBLIC KEY-----\nbench\n-----END PUBLIC KEY-----\n"
PCRS = {"0": "00" * 32, "7": "07" * 32, "11": "0b" * 32}
PART = PartitionRef(label="COS_PERSISTENT", device_name="vda5")


def measure(calls):
    wall, cpu = [], []
    for call in calls:
        c0, w0 = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    wall.sort()
    return {"n": len(wall), "cpu_ms": 1000 * sum(cpu) / len(cpu), "p50_ms": 1000 * statistics.median(wall),
            "p99_ms": 1000 * wall[int(len(wall) * 0.99) - 1]}


def run(name, kms_store, count):
    policy = pol.Policy(kms_store)
    hashes = ["%064x" % (0xB0000000 + i) for i in range(count)]
    results = {"tofu": measure(lambda h=h: policy.issue_passphrase(h, EK, PCRS, PART) for h in hashes)}
    results["known"] = measure(lambda h=h: policy.issue_passphrase(h, EK, PCRS, PART) for h in hashes)
    for tpm_hash in hashes:  # let PCR 0 be learned again on the next contact
        volume = kms_store.find_volume(tpm_hash)
        volume["spec"]["attestation"]["pcrValues"]["pcrs"]["0"] = ""
        kms_store.update_volume(volume)
    results["learn"] = measure(lambda h=h: policy.issue_passphrase(h, EK, PCRS, PART) for h in hashes)
    for kind, figures in results.items():
        print("%-11s %-6s n=%-5d cpu/call=%.3f ms  wall p50=%.3f ms  p99=%.3f ms"
              % (name, kind, figures["n"], figures["cpu_ms"], figures["p50_ms"], figures["p99_ms"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--kubernetes", action="store_true", help="also measure against the API emulator")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="kcrypt-bench-store-")
    try:
        with st.open_store("sqlite://%s/kms.db" % work) as kms_store:
            run("sqlite", kms_store, args.count)
        if args.kubernetes:
            from support.kube_api import KubeAPI
            from support.stores import install_crd

            api = KubeAPI(os.path.join(work, "kube")).start()
            try:
                install_crd(api.kubeconfig)
                with st.open_store("kubernetes://?kubeconfig=%s&namespace=bench" % api.kubeconfig) as kms_store:
                    run("kubernetes", kms_store, min(args.count, 300))
            finally:
                api.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
