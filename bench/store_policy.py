# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Cost of the policy + store part of one attestation, per backend. Prints figures, asserts nothing.

    .venv/bin/python bench/store_policy.py [--count 2000] [--kubernetes [--fleet-sizes 100 1000 10000]]

* ``known``: ``issue_passphrase`` for an enrolled TPM (lookup, verification, Secret read): what
  every boot after the first costs.
* ``tofu``: a first contact (free-name check, Secret create, SealedVolume create).
* ``learn``: a contact that learns one PCR (one update with resourceVersion).

CPU is this process's CPU time (user+sys) per call. For SQLite it is the whole cost, since
``synchronous=FULL`` fsyncs count as wall time, not CPU. ``--kubernetes`` also runs against the
kmock-based API emulator, which runs as its own process: its CPU is not counted here.

``--kubernetes`` then fills one namespace of the emulator up to each of ``--fleet-sizes``
SealedVolumes (each with its Secret, enrolled by the policy as at a first boot) and measures, on
a sample of the fleet: finding a known TPM (``lookup``: the label selector), a whole attestation
of a known TPM (``attest``: lookup, Secret read), a TPM the store does not know (``unknown``:
the label, then the unlabelled volumes), and what a lookup cost before the label index (``full
list``: every SealedVolume of the namespace). Per call: this process's CPU, wall p50/p99, the
items the API sent, and the emulator's CPU (it filters a list in memory, as the API server's
watch cache does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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


def _emulator_cpu(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ItemCounter(object):
    """Counts the items the API sends in list answers (wraps the store's CustomObjectsApi)."""

    def __init__(self, api):
        self._api, self.items = api, 0

    def __getattr__(self, name):
        return getattr(self._api, name)

    def list_namespaced_custom_object(self, *args, **kwargs):
        response = self._api.list_namespaced_custom_object(*args, **kwargs)
        self.items += len(json.loads(response.data)["items"])
        return response


def measure_fleet_call(kms_store, counter, emulator_pid, calls):
    counter.items = 0
    emulator_before = _emulator_cpu(emulator_pid)
    figures = measure(calls)
    figures["items"] = counter.items / figures["n"]
    figures["emulator_ms"] = 1000 * (_emulator_cpu(emulator_pid) - emulator_before) / figures["n"]
    return figures


def fleet_sizes(kubeconfig, emulator_pid, sizes, sample):
    """One namespace grown to each size; the per-call cost of lookups at that size."""
    url = "kubernetes://?kubeconfig=%s&namespace=fleet" % kubeconfig
    enrolled = []
    print("%-8s %-10s %8s %10s %10s %8s %12s" % ("volumes", "call", "cpu ms", "p50 ms", "p99 ms", "items", "emulator ms"))
    with st.open_store(url) as kms_store:
        policy = pol.Policy(kms_store)

        def enrol(tpm_hash):
            policy.issue_passphrase(tpm_hash, EK, PCRS, PART)
            return tpm_hash

        for size in sizes:
            started = time.monotonic()
            wanted = ["%064x" % random.getrandbits(256) for _count in range(size - len(enrolled))]
            with ThreadPoolExecutor(8) as pool:  # the emulator is one process; threads hide its latency
                enrolled.extend(pool.map(enrol, wanted))
            fill = time.monotonic() - started
            kms_store.custom = counter = ItemCounter(kms_store.custom)
            known = random.sample(enrolled, min(sample, len(enrolled)))
            unknown = ["%064x" % random.getrandbits(256) for _known in known]
            rows = [
                ("lookup", [lambda h=h: kms_store.find_volume(h) for h in known]),
                ("attest", [lambda h=h: policy.issue_passphrase(h, EK, PCRS, PART) for h in known]),
                ("unknown", [lambda h=h: kms_store.find_volume(h) for h in unknown]),
                ("full list", [kms_store.list_volumes for _repeat in range(max(3, min(20, 20000 // size)))]),
            ]
            for name, calls in rows:
                figures = measure_fleet_call(kms_store, counter, emulator_pid, calls)
                print("%-8d %-10s %8.3f %10.2f %10.2f %8.1f %12.2f" % (
                    size, name, figures["cpu_ms"], figures["p50_ms"], figures["p99_ms"], figures["items"],
                    figures["emulator_ms"]))
            kms_store.custom = counter._api
            print("%-8d (filled in %.0f s)" % (size, fill))
            sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--kubernetes", action="store_true", help="also measure against the API emulator")
    parser.add_argument("--fleet-sizes", type=int, nargs="*", default=[100, 1000, 10000],
                        help="with --kubernetes: SealedVolumes in the namespace for the lookup figures (none: skip)")
    parser.add_argument("--sample", type=int, default=200, help="calls measured per figure at each fleet size")
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
                if args.fleet_sizes:
                    fleet_sizes(api.kubeconfig, api.process.pid, sorted(args.fleet_sizes), args.sample)
            finally:
                api.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
