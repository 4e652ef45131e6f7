# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PartitionRef: what a node may declare (sizes, characters, something named) and how it is shown in logs."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef


@pytest.mark.parametrize("ref", [
    PartitionRef(label="COS_PERSISTENT", device_name="vda5", uuid="85c39d0f-4867-5227-8334-f5eec606d9eb"),
    PartitionRef(label="L" * 255),  # btrfs's longest label
    PartitionRef(label="é" * 127),  # 254 bytes of UTF-8
    PartitionRef(label="my data"),  # ext4 labels may hold spaces
    PartitionRef(label="データ"),  # and any printable text
    PartitionRef(device_name="/dev/nvme0n1p12"),
    PartitionRef(device_name="cciss!c0d0p1"),  # sysfs writes '!' for '/'
    PartitionRef(device_name="n" * 64),
    PartitionRef(uuid="1234-ABCD"),  # FAT
    PartitionRef(uuid="0a1b2c3d-02"),  # MBR PARTUUID
    PartitionRef(label="COS_OEM", uuid="unknown"),  # upstream's placeholder next to a real identifier
])
def test_what_real_partitions_carry_is_accepted(ref):
    assert ref.problem() is None


@pytest.mark.parametrize("ref, problem", [
    (PartitionRef(label="L" * 256), "label is longer than 255 bytes (256 bytes)"),
    (PartitionRef(label="é" * 128), "label is longer than 255 bytes (256 bytes)"),  # bytes, not characters
    (PartitionRef(label="COS\tPERSISTENT"), "label holds control characters"),
    (PartitionRef(label="COS\x7f"), "label holds control characters"),
    (PartitionRef(label="x\udcff"), "label holds control characters or bytes that are not UTF-8"),  # aiohttp's surrogate escape
    (PartitionRef(label="a\u200bb"), "label holds control characters"),  # zero-width space: not printable
    (PartitionRef(device_name="n" * 65), "name is longer than 64 bytes"),
    (PartitionRef(device_name="vda5 "), "name holds characters other than"),
    (PartitionRef(device_name="../../etc"), None),  # only characters are checked: the name is compared, never opened
    (PartitionRef(uuid="u" * 65), "uuid is longer than 64 bytes"),
    (PartitionRef(uuid="{0a1b}"), "uuid holds characters other than"),
    (PartitionRef(), "the request names no partition"),
    (PartitionRef(uuid="unknown"), "the request names no partition"),
])
def test_what_no_partition_carries_is_refused(ref, problem):
    if problem is None:
        assert ref.problem() is None
    else:
        assert problem in ref.problem()


def test_unknown_uuid_identifies_nothing():
    """Upstream would match every partition registered with uuid 'unknown'; we match none."""
    assert PartitionRef(uuid="unknown").is_empty()
    assert not PartitionRef(label="COS_OEM", uuid="unknown").matches({"label": "COS_PERSISTENT", "uuid": "unknown"})
    assert PartitionRef(label="COS_OEM", uuid="unknown").matches({"label": "COS_OEM"})
    assert PartitionRef(uuid="u-1").matches({"uuid": "u-1"})


def test_describe_is_bounded_and_escaped():
    text = PartitionRef(label="L" * 30000, device_name="vda5").describe()
    assert len(text) < 120 and "(30000 characters)" in text and text.endswith("name=vda5")
    assert PartitionRef(label="a\tb").describe() == "label=a\\tb"
    assert PartitionRef().describe() == "(no identifier)"
