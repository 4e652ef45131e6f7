# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline mode on a real kernel: format COS_PERSISTENT with the TPM's NV blob, reboot, unlock, read back."""

from __future__ import annotations

import json

from support.swtpm import SwTPM

# Cheap PBKDF for tests (the node's defaults are a documented production choice).
VM_BOOTS = 2  # for the order of the VM suite (tests/vm/conftest.py)

FAST_PBKDF = "--pbkdf-algorithm pbkdf2 --pbkdf-iteration-count 1000"


def test_offline_format_then_unlock_from_tpm_nv(vm_node, persistent_disk, host_cli):
    node = vm_node(disks=[persistent_disk])

    first = node.boot("""set -e
kcrypt --json encrypt --mode format --label COS_PERSISTENT --wipe %s > /tmp/encrypt.json
result encrypt "$(cat /tmp/encrypt.json)"
kcrypt --json unlock --label COS_PERSISTENT > /dev/null
result inner "$(blkid -c /dev/null -p -o export /dev/mapper/vda1 | grep -E '^(TYPE|LABEL)=' | tr '\\n' ' ')"
mount /dev/mapper/vda1 /mnt
echo "written on the first boot" > /mnt/proof.txt
umount /mnt
kcrypt --json close --label COS_PERSISTENT > /dev/null
result mapped_after_close "$(ls /dev/mapper | grep -v control || true)"
""" % FAST_PBKDF)
    assert first.ok, first.output
    encrypted = json.loads(first.results["encrypt"])["partitions"]
    assert [(p["device"], p["action"], p["key_source"], p["label"]) for p in encrypted] == [
        ("/dev/vda1", "format", "tpm", "COS_PERSISTENT")
    ]
    assert first.results["inner"].split() == ["LABEL=COS_PERSISTENT", "TYPE=ext4"]
    assert first.results["mapped_after_close"] == ""

    # Between boots: the disk holds a LUKS2 header labelled COS_PERSISTENT, and the passphrase
    # lives only in the TPM's NV index (read through the same TPM state on the host).
    with open(persistent_disk, "rb") as disk:
        disk.seek(2048 * 512)
        header = disk.read(4096)
        json_area = disk.read(int.from_bytes(header[8:16], "big") - 4096)
    assert header[:6] == b"LUKS\xba\xbe" and header[6:8] == b"\x00\x02"
    assert header[24:72].rstrip(b"\x00") == b"COS_PERSISTENT"
    # checklist 43/44: uuid5(NAMESPACE_URL, label), and allow-discards stored by `refresh --persistent`
    assert header[168:208].rstrip(b"\x00") == b"85c39d0f-4867-5227-8334-f5eec606d9eb"
    assert "allow-discards" in json.loads(json_area.split(b"\x00", 1)[0])["config"].get("flags", [])
    with SwTPM(node.tpm_state) as tpm:
        nv = json.loads(host_cli("kcrypt", "--json", "checknv", "--tpm-device", tpm.tcti).stdout)
    assert nv["exists"] is True and nv["size"] > 0

    second = node.boot("""set -e
kcrypt --json unlock-all > /tmp/unlock.json
result unlock "$(cat /tmp/unlock.json)"
mount -o ro /dev/mapper/vda1 /mnt
result content "$(cat /mnt/proof.txt)"
umount /mnt
""")
    assert second.ok, second.output
    opened = json.loads(second.results["unlock"])["partitions"]
    assert [(p["device"], p["action"], p["mapper"]) for p in opened] == [("/dev/vda1", "open", "/dev/mapper/vda1")]
    assert second.results["content"] == "written on the first boot"
