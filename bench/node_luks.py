# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Node benchmark: what the PBKDF choice costs, and how fast in-place encryption is, on this machine.

    sudo .venv/bin/python bench/node_luks.py [--size-mib 512] [--runs 3]

Measured on a loop device (root needed), through the collection's own code:

* format the LUKS2 header (``luksFormat``) and test a key (``open --test-passphrase``, which is
  what every unlock pays) with: upstream's ``--iter-time 5`` (our default for generated keys),
  cryptsetup's default (our default for typed passphrases, argon2id ~2 s), and the tests'
  pbkdf2 with 1000 iterations;
* in-place encryption (e2fsck + shrink + ``cryptsetup reencrypt --encrypt``) of a
  ``--size-mib`` partition, in MiB/s.

Prints figures only; asserts nothing. Loop devices are detached at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _checkout  # noqa: E402

_checkout.setup()

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, key_source, luks  # noqa: E402
from support.loopdisk import LoopDisk, make_ext4, sh  # noqa: E402

PBKDFS = [
    ("upstream --iter-time 5 (default for tpm/kms keys)", luks.LuksOptions(iter_time_ms=5)),
    ("cryptsetup default (default for typed passphrases)", luks.LuksOptions()),
    ("pbkdf2, 1000 iterations (tests)", luks.LuksOptions(pbkdf="pbkdf2", iterations=1000)),
]


def timed(function):
    started = time.monotonic()
    function()
    return time.monotonic() - started


def bench_pbkdf(device, runs):
    print("%-52s %12s %14s  %s" % ("PBKDF", "format (s)", "key test (s)", "keyslot"))
    for name, options in PBKDFS:
        formats, tests = [], []
        for run in range(runs):
            formats.append(timed(lambda: luks.format_device(device, b"bench passphrase", options)))
            tests.append(timed(lambda: luks.test_passphrase(device, b"bench passphrase")))
        kdf = luks.read_header(device).keyslots["0"]["kdf"]
        detail = "%s time=%s memory=%s KiB" % (kdf["type"], kdf.get("time", kdf.get("iterations")), kdf.get("memory", "-"))
        print("%-52s %12.3f %14.3f  %s" % (name, statistics.median(formats), statistics.median(tests), detail))
        sh("wipefs", "-a", "-q", device)


def bench_in_place(directory, size_mib, runs):
    speeds = []
    for run in range(runs):
        with LoopDisk(directory, [("data", size_mib)]) as disk:
            device = disk.partitions[0]
            make_ext4(device, "BENCH")
            sh("dd", "if=/dev/urandom", "of=%s" % device, "bs=1M", "seek=64", "count=%d" % max(size_mib // 4, 1), "conv=notrunc")
            make_ext4(device, "BENCH")
            source = key_source.PassphraseKeySource(b"bench passphrase")
            request = encryption.EncryptRequest(partitions=(encryption.Selector(device=device),), mode="in_place",
                                                options=luks.LuksOptions(pbkdf="pbkdf2", iterations=1000))
            plans = encryption.plan(request, source)
            seconds = timed(lambda: encryption.apply(plans, request, source))
            speeds.append(size_mib / seconds)
    print("in-place encryption of %d MiB: median %.0f MiB/s (runs: %s)" % (size_mib, statistics.median(speeds), ", ".join("%.0f" % s for s in speeds)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices)")
    print("load average: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
    with tempfile.TemporaryDirectory(prefix="kcrypt-bench-node-") as directory:
        with LoopDisk(directory, [("pbkdf", 32)]) as disk:
            bench_pbkdf(disk.partitions[0], args.runs)
        bench_in_place(directory, args.size_mib, args.runs)


if __name__ == "__main__":
    main()
