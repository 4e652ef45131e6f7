# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What "whose is this Secret?" costs (kms/secret_ownership.py). Prints figures, asserts nothing.

    .venv/bin/python bench/secret_ownership.py [--volumes 100,1000] [--kubernetes]

With ``--volumes N`` SealedVolumes in the store (one partition each):

* ``named``: ``issue_passphrase`` for a partition that names its Secret (the steady state, no ownership
  check at all: the figure to compare with bench/store_policy.py's ``known``);
* ``labelled``: ``verdict`` for a Secret our server made (labels decide: no scan);
* ``unlabelled``: ``verdict`` for a Secret made by hand (kubectl, upstream YAML): a scan of every
  SealedVolume. The newest protocol does it once per partition, then names the Secret in the partition.

CPU is this process's (user+sys) per call; wall includes the SQLite reads or the API round trips
(the kmock-based emulator runs as its own process; its CPU is not counted).
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

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_names  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy as pol  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as ownership  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st  # noqa: E402
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store_factory  # noqa: E402

EK = "-----BEGIN PUBLIC KEY-----\nbench\n-----END PUBLIC KEY-----\n"
PART = PartitionRef(label="COS_PERSISTENT")


def measure(call, rounds):
    wall, cpu = [], []
    for _round in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_ms": 1000 * sum(cpu) / len(cpu), "p50_ms": 1000 * statistics.median(wall)}


def fill(store, count):
    for index in range(count):
        tpm_hash = "%064x" % (0xC0000000 + index)
        name = "node-%05d" % index
        store.create_secret(st.new_secret(name + "-cos-persistent", {"passphrase": b"p" * 44},
                                          labels=kube_names.secret_labels(tpm_hash, "COS_PERSISTENT", name)))
        store.create_volume(st.new_volume(name, tpm_hash, [{"label": "COS_PERSISTENT",
                                                            "secret": {"name": name + "-cos-persistent"}}],
                                          attestation={"ekPublicKey": EK}))
    store.create_secret(st.new_secret("by-hand", {"passphrase": b"q" * 44}))


def run(label, store, count, rounds):
    fill(store, count)
    volume = store.get_volume("node-00000")
    tpm_hash = volume["spec"]["TPMHash"]
    policy = pol.Policy(store)
    labelled = store.get_secret("node-00000-cos-persistent")
    by_hand = store.get_secret("by-hand")
    rows = {
        "named": measure(lambda: policy.issue_passphrase(tpm_hash, EK, {}, PART), rounds),
        "labelled": measure(lambda: ownership.verdict(store, tpm_hash, volume, 0, "node-00000-cos-persistent", labelled), rounds),
        "unlabelled": measure(lambda: ownership.verdict(store, tpm_hash, volume, None, "by-hand", by_hand), max(3, rounds // 10)),
    }
    for name, row in rows.items():
        print("%-11s %6d volumes  %-10s  CPU %8.3f ms/call  p50 wall %8.3f ms" % (label, count, name, row["cpu_ms"], row["p50_ms"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--volumes", default="100,1000", help="comma-separated store sizes")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--kubernetes", action="store_true", help="also against the kmock-based API emulator")
    args = parser.parse_args()
    sizes = [int(v) for v in args.volumes.split(",")]
    workdir = tempfile.mkdtemp(prefix="kcrypt-bench-ownership-")
    api = None
    try:
        for count in sizes:
            with store_factory.open_store("sqlite://%s/kms-%d.db" % (workdir, count)) as store:
                run("sqlite", store, count, args.rounds)
        if args.kubernetes:
            from support.kube_api import KubeAPI  # noqa: E402 (test helper, only for this option)
            from support.stores import install_crd  # noqa: E402

            api = KubeAPI(os.path.join(workdir, "kube")).start()
            install_crd(api.kubeconfig)
            for count in sizes:
                url = "kubernetes://?kubeconfig=%s&namespace=bench-%d" % (api.kubeconfig, count)
                with store_factory.open_store(url) as store:
                    run("kubernetes", store, count, args.rounds)
    finally:
        if api is not None:
            api.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
