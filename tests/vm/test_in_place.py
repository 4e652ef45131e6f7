# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""In-place encryption done on the host (loop device, no device-mapper) opened by the node in the VM."""

from __future__ import annotations

import hashlib
import json
import os

from support.loopdisk import LoopDisk, sh
from support.swtpm import SwTPM

VM_BOOTS = 1  # for the order of the VM suite (tests/vm/conftest.py)

FAST_PBKDF = ("--pbkdf-algorithm", "pbkdf2", "--pbkdf-iteration-count", "1000")


def test_in_place_encryption_on_host_is_opened_in_guest_with_data_intact(vm_node, tmp_path, host_cli):
    disk_image = str(tmp_path / "disk.img")  # written below, attached at boot as /dev/vda
    node = vm_node(disks=[disk_image])
    content = tmp_path / "content"
    os.makedirs(content / "dir")
    files = {"notes.txt": b"kept through in-place encryption\n", "dir/random.bin": os.urandom(3 * 2**20 + 123)}
    for name, data in files.items():
        (content / name).write_bytes(data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    with LoopDisk(str(tmp_path), [("persistent", 96)]) as disk:
        partition = disk.partitions[0]
        sh("mkfs.ext4", "-q", "-L", "COS_PERSISTENT", "-d", str(content), partition)
        with SwTPM(node.tpm_state) as tpm:  # the node's own TPM, served to the host for the encryption
            result = host_cli("kcrypt", "--json", "encrypt", "--mode", "in_place",
                              "--partition", "device=%s,label=COS_PERSISTENT" % partition,
                              "--tpm-device", tpm.tcti, *FAST_PBKDF)
        encrypted = json.loads(result.stdout)["partitions"]
        assert [(p["device"], p["action"], p["changed"]) for p in encrypted] == [(partition, "in_place", True)]
        assert sh("blkid", "-c", "/dev/null", "-p", "-s", "TYPE", "-o", "value", partition).stdout.decode().strip() == "crypto_LUKS"
        # LoopDisk deletes its image on detach: keep it under another name for the VM (the loop device holds it open).
        os.rename(disk.image, disk_image)
    with open(disk_image, "rb") as image:
        assert files["notes.txt"] not in image.read()  # the data is encrypted on disk...

    boot = node.boot("""set -e
kcrypt --json unlock --label COS_PERSISTENT > /tmp/unlock.json
result unlock "$(cat /tmp/unlock.json)"
rc=0; e2fsck -fn /dev/mapper/vda1 > /tmp/fsck.out 2>&1 || rc=$?
result fsck_rc $rc
result label "$(blkid -c /dev/null -p -s LABEL -o value /dev/mapper/vda1)"
mount -o ro /dev/mapper/vda1 /mnt
for f in notes.txt dir/random.bin; do result "$f" "$(sha256sum /mnt/$f | cut -d' ' -f1)"; done
umount /mnt
""")
    assert boot.ok, boot.output
    opened = json.loads(boot.results["unlock"])["partitions"]
    assert [(p["device"], p["action"]) for p in opened] == [("/dev/vda1", "open")]
    assert boot.results["fsck_rc"] == "0"
    assert boot.results["label"] == "COS_PERSISTENT"
    assert {name: boot.results[name] for name in digests} == digests  # ...and intact inside
