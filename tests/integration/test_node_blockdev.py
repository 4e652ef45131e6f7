# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Partition lookup and in-use checks on real partitioned loop devices (blkid, sysfs, no udev)."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from support.loopdisk import make_ext4, sh, unique_label
from support.node_fixtures import loop_disks, mounter  # noqa: F401  # pylint: disable=unused-import


def test_probe_reports_filesystem_and_gpt_fields(loop_disks):
    disk = loop_disks([("oem", 16), ("persistent", 40)])
    label = unique_label()
    make_ext4(disk.partitions[1], label)
    device = blockdev.probe(disk.partitions[1])
    assert device.fstype == "ext4"
    assert device.label == label
    assert device.partlabel == "persistent"
    assert device.name == disk.partitions[1].rsplit("/", 1)[1]
    assert device.size == 40 * 1024 * 1024
    assert device.partuuid and device.uuid
    empty = blockdev.probe(disk.partitions[0])
    assert empty.fstype == "" and empty.label == "" and empty.kairos_label == "COS_OEM"


def test_find_by_label_uuid_and_kairos_gpt_fallback(loop_disks):
    disk = loop_disks([("oem", 16), ("persistent", 24), ("data", 0)], size_mib=64)
    label = unique_label()
    make_ext4(disk.partitions[2], label)
    found = blockdev.find_by_label(label)
    assert found.path == disk.partitions[2]
    # COS_PERSISTENT: no device in scope has the label, so the GPT name "persistent" decides (spec §6.1)
    assert blockdev.find_by_label("COS_PERSISTENT", scope=disk.partitions).path == disk.partitions[1]
    assert blockdev.find_by_label("COS_OEM", scope=disk.partitions).path == disk.partitions[0]
    assert blockdev.find_by_uuid(found.uuid).path == disk.partitions[2]
    assert blockdev.find_by_uuid(found.partuuid).path == disk.partitions[2]
    with pytest.raises(blockdev.PartitionNotFound, match="no partition has the label KT_MISSING"):
        blockdev.find_by_label("KT_MISSING", scope=disk.partitions)
    with pytest.raises(blockdev.PartitionNotFound, match="no partition has the UUID"):
        blockdev.find_by_uuid("00000000-0000-4000-8000-000000000000", scope=disk.partitions)


def test_label_on_two_devices_is_an_error(loop_disks):
    disk = loop_disks([("a", 16), ("b", 16)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    make_ext4(disk.partitions[1], label)
    with pytest.raises(KcryptError, match="matches more than one device"):
        blockdev.find_by_label(label)


def test_in_use_detects_a_mount(loop_disks, mounter):
    disk = loop_disks([("data", 24)])
    make_ext4(disk.partitions[0], unique_label())
    assert blockdev.in_use(disk.partitions[0]) is None
    target = mounter(disk.partitions[0])
    assert blockdev.in_use(disk.partitions[0]) == "mounted on %s" % target


def test_ambivalent_signatures_are_refused(loop_disks):
    disk = loop_disks([("data", 24)])
    make_ext4(disk.partitions[0], unique_label())
    # an ISO9660 volume descriptor next to the ext4 superblock: blkid cannot tell which one is real
    with open(disk.partitions[0], "r+b") as device:
        device.seek(32768)
        device.write(b"\x01CD001")
    assert sh("blkid", "-c", "/dev/null", "-p", disk.partitions[0], check=False).returncode == 8
    with pytest.raises(KcryptError, match="more than one signature"):
        blockdev.probe(disk.partitions[0])


def test_not_a_block_device(tmp_path):
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    with pytest.raises(KcryptError, match="is not a block device"):
        blockdev.probe(str(regular))
    with pytest.raises(blockdev.PartitionNotFound, match="does not exist"):
        blockdev.probe(str(tmp_path / "missing"))


@pytest.mark.skipif(blockdev._misc_has_device_mapper(), reason="this kernel has device-mapper")
def test_device_mapper_absent_here_and_control_node_untouched():
    import os

    existed = os.path.exists("/dev/mapper/control")
    assert blockdev.device_mapper_available() is False
    assert os.path.exists("/dev/mapper/control") == existed
