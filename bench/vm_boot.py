# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Figures for the test VM (docs/vm.md): image size and build time, boot stages, node steps in the guest.

    .venv/bin/python bench/vm_boot.py [--boots 3]

Prints; asserts nothing. Times are wall clock on the host (the guest's clock is
unreliable during early boot under TCG) and depend heavily on what else runs on
the machine: TCG is CPU-bound. Run it on an idle machine for comparable numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.swtpm import provision  # noqa: E402
from vm import image  # noqa: E402
from vm.machine import Machine, make_persistent_disk  # noqa: E402

STEPS = """
step() { echo "BENCH $1"; }
step python_start; python3 -c pass
step import_tpm2_pytss; python3 -c 'import tpm2_pytss'
step import_cryptography; python3 -c 'import cryptography.x509'
step tpm_hash; kcrypt-discovery-challenger > /dev/null
step encrypt_format_fast_pbkdf
kcrypt --json encrypt --mode format --label COS_PERSISTENT --wipe --pbkdf-algorithm pbkdf2 --pbkdf-iteration-count 1000 >/dev/null
step unlock_offline; kcrypt --json unlock --label COS_PERSISTENT > /dev/null
step close; kcrypt --json close --label COS_PERSISTENT > /dev/null
step cryptsetup_default_argon2_format; printf x | cryptsetup luksFormat --batch-mode --key-file - /dev/vda1
step end
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=3, help="trivial boots to time (default 3)")
    args = parser.parse_args()

    started = time.monotonic()
    img = image.ensure_image()
    manifest = img.manifest
    print("image: %s" % img.directory)
    print("  ensure_image (resolve inputs; build only if missing): %.1f s" % (time.monotonic() - started))
    print("  build timings when it was built: %s" % manifest["timings"])
    print("  kernel %s: %.1f MiB; initramfs (uncompressed cpio): %.1f MiB; %d Debian packages"
          % (manifest["kernel_version"], manifest["kernel_bytes"] / 2**20, manifest["initrd_bytes"] / 2**20, len(manifest["debs"])))

    with tempfile.TemporaryDirectory(prefix="kcrypt-vm-bench-") as workdir:
        provision(os.path.join(workdir, "tpm"))
        disk = os.path.join(workdir, "disk.img")
        make_persistent_disk(disk)
        machine = Machine(img, workdir, os.path.join(workdir, "tpm"), disks=[disk])
        stages = {"booted": [], "ready": [], "exit": []}
        for number in range(args.boots):
            result = machine.boot("true\n", name="trivial%d" % number)
            for stage in stages:
                stages[stage].append(result.stamps[stage])
        print("trivial boot, seconds after QEMU starts (median of %d, min, max):" % args.boots)
        for stage, values in stages.items():
            print("  %-7s %5.1f  %5.1f  %5.1f" % (stage, statistics.median(values), min(values), max(values)))

        marks = []
        origin = time.monotonic()

        def echo(line):
            if line.startswith("BENCH "):
                marks.append((line.split()[1], time.monotonic() - origin))

        result = machine.boot(STEPS, name="steps", echo=echo)
        print("node steps in the guest (one boot, exit %s):" % result.exit_code)
        for (name, at), (_next, until) in zip(marks, marks[1:]):
            print("  %-34s %5.1f s" % (name, until - at))


if __name__ == "__main__":
    main()
