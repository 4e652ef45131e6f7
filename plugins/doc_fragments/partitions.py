# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The partitions a node module works on (module_utils/ansible_common.py PARTITIONS_SPEC)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  partitions:
    description:
      - The partitions to work on. The list can mix selectors, as Kairos' C(install.encrypted_partitions) does.
      - Give O(partitions[].label), O(partitions[].device) or O(partitions[].uuid) for each;
        O(partitions[].device) and O(partitions[].uuid) exclude each other.
    type: list
    elements: dict
    required: true
    suboptions:
      label:
        description:
          - The partition label.
          - When used alone, it selects the partition by its filesystem or LUKS label, as Kairos does with
            C(blkid). For C(COS_OEM) and C(COS_PERSISTENT), the GPT partition names C(oem) and C(persistent)
            also match. A label found on more than one device is an error.
          - With O(partitions[].device) or O(partitions[].uuid), M(kairos.kcrypt.kairos_luks_encrypt) writes it as the
            LUKS label (without it, the partition keeps its current label); M(kairos.kcrypt.kairos_luks_rekey) ignores it.
        type: str
      device:
        description:
          - The partition's device path, for example V(/dev/vdb1).
        type: path
      uuid:
        description:
          - Selects the partition by the UUID of its filesystem or LUKS header, or else by its GPT partition UUID.
        type: str
"""
