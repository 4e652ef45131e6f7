#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_luks_unlock
short_description: Open or close Kairos-encrypted partitions with a key from the TPM, a KMS or a passphrase
version_added: 0.1.0
description:
  - Opens the selected LUKS partitions, or all of them like Kairos' C(unlock-all). It can also close them.
  - The key comes from the same sources as in M(kairos.kcrypt.kairos_luks_encrypt).
  - As in Kairos, the mapping is named after the kernel partition name, for example C(/dev/mapper/vda5).
    A partition that already has an open mapping is left alone.
  - This is a separate module from M(kairos.kcrypt.kairos_luks_encrypt) on purpose. Opening is routine
    and touches no data, while encrypting can be destructive. A play that only opens partitions cannot
    format one by mistake, and each module keeps a small set of options.
  - Opening needs device-mapper (dm_mod and dm_crypt). On a kernel without it, the task fails and says
    so, in check mode too.
options:
  partitions:
    description:
      - The partitions to open or close. Required unless O(all=true).
    type: list
    elements: dict
    suboptions:
      label:
        description:
          - Selects the partition by its LUKS label, with Kairos' GPT-name fallback for C(COS_OEM) and C(COS_PERSISTENT).
          - With O(key_source=kms), this is the label sent to the KMS.
        type: str
      device:
        description: Selects the partition by device path.
        type: path
      uuid:
        description: Selects the partition by LUKS UUID, or else by GPT partition UUID.
        type: str
      name:
        description:
          - Mapping name. The default is the kernel name of the partition.
          - With O(state=closed), the name alone selects the mapping to close.
        type: str
  all:
    description:
      - Open every LUKS partition on the node, as Kairos' C(unlock-all) does.
      - Each partition is known by its LUKS label or, without one, by its GPT name (C(oem) for C(COS_OEM),
        C(persistent) for C(COS_PERSISTENT)). Partitions with neither are skipped and reported.
      - Only with O(state=opened).
    type: bool
    default: false
  state:
    description:
      - V(opened) opens the partitions. V(closed) closes their mappings, which must not be mounted.
    type: str
    choices: [opened, closed]
    default: opened
  keyslot:
    description:
      - Try only this key slot. Kairos' own unlock tries slot 0 only. This collection always puts the
        partition key in slot 0, so both work the same way.
      - The default tries every slot.
    type: int
  attempts:
    description:
      - How many times to try getting the key and opening each partition before failing, as Kairos'
        unlock loop does (10 attempts).
      - The task stops at once when the key does not open the partition, or when the KMS refuses the TPM.
    type: int
    default: 10
  retry_delay:
    description:
      - Base pause in seconds between attempts. The pause grows linearly, as in Kairos (1 s, 2 s, 3 s, and so on).
    type: float
    default: 1.0
extends_documentation_fragment:
  - kairos.kcrypt.key_source
  - kairos.kcrypt.tpm
  - kairos.kcrypt.offline_key
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
    details:
      - In check mode, the key is fetched and tested against each partition that would be opened. Nothing is opened.
  diff_mode:
    support: none
  idempotent:
    support: full
requirements:
  - cryptsetup, blkid, device-mapper (dm_mod and dm_crypt)
seealso:
  - module: kairos.kcrypt.kairos_luks_encrypt
author:
  - kairos.kcrypt contributors (@kairos-io)
"""

EXAMPLES = r"""
- name: Open every encrypted partition with the offline TPM key (Kairos unlock-all)
  kairos.kcrypt.kairos_luks_unlock:
    all: true

- name: Open COS_PERSISTENT with its key from the KMS
  kairos.kcrypt.kairos_luks_unlock:
    partitions:
      - label: COS_PERSISTENT
    key_source: kms
    challenger_server: https://kms.example.com:8082

- name: Close a data partition
  kairos.kcrypt.kairos_luks_unlock:
    partitions:
      - label: DATA
    state: closed
"""

RETURN = r"""
partitions:
  description: One entry per partition or mapping considered.
  returned: always
  type: list
  elements: dict
  contains:
    device:
      description: Device path of the LUKS partition. Empty when a mapping was closed by name.
      type: str
      sample: /dev/vda5
    name:
      description: Kernel name of the partition.
      type: str
      sample: vda5
    label:
      description: Label the partition is known by.
      type: str
      sample: COS_PERSISTENT
    mapper:
      description: Path of the mapping.
      type: str
      sample: /dev/mapper/vda5
    action:
      description: V(open), V(close), V(none) (already in the wanted state) or V(skip) (no label, in O(all) mode).
      type: str
    changed:
      description: Whether this partition was opened or closed now.
      type: bool
    reason:
      description: Why nothing was done, when that is the case.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import (
    KEY_SOURCE_REQUIRED_IF, KEY_SOURCE_SPEC, OFFLINE_KEY_SPEC, PARTITION_SELECTOR_OPTIONS, TPM_SPEC, generate_argspec, hide_secrets,
    run_or_fail,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import key_source, unlock
from ansible_collections.kairos.kcrypt.plugins.module_utils.node.encryption import Selector


def argument_spec():
    return generate_argspec(
        KEY_SOURCE_SPEC,
        TPM_SPEC,
        OFFLINE_KEY_SPEC,
        # the selectors of kairos.kcrypt.partitions, plus a mapping name (which alone selects a mapping to close)
        partitions=dict(
            type="list",
            elements="dict",
            options=generate_argspec(PARTITION_SELECTOR_OPTIONS, name=dict(type="str")),
            mutually_exclusive=[("device", "uuid")],
            required_one_of=[("label", "device", "uuid", "name")],
        ),
        all=dict(type="bool", default=False),
        state=dict(type="str", default="opened", choices=["opened", "closed"]),
        keyslot=dict(type="int", no_log=False),
        attempts=dict(type="int", default=unlock.DEFAULT_ATTEMPTS),
        retry_delay=dict(type="float", default=1.0),
    )


def targets(params):
    result = []
    for item in params["partitions"] or []:
        selector = None
        if item["label"] or item["device"] or item["uuid"]:
            selector = Selector(label=item["label"] or "", device=item["device"] or "", uuid=item["uuid"] or "")
        result.append(unlock.Target(selector=selector, name=item["name"] or ""))
    return result


def run(module, plans):
    """Open or close the partitions (or, in check mode, predict); ``plans`` is filled as soon as they are known."""
    params = module.params
    if params["state"] == "closed":
        if params["all"]:
            raise KcryptError("all=true is only for state=opened; list the partitions to close")
        plans.extend(unlock.plan_close(targets(params)))
        results = [p.as_result(predicted=True) for p in plans] if module.check_mode else unlock.apply_close(plans)
    else:
        if params["attempts"] < 1:
            raise KcryptError("attempts must be at least 1")
        source = key_source.build(params)
        hide_secrets(module, source)
        plans.extend(unlock.plan_open(None if params["all"] else targets(params)))
        if module.check_mode:
            unlock.verify_keys(plans, source)
            results = [p.as_result(predicted=True) for p in plans]
        else:
            results = unlock.apply_open(
                plans, source, keyslot=params["keyslot"], attempts=params["attempts"], retry_delay=params["retry_delay"]
            )
    changed = any(p.changes for p in plans) if module.check_mode else any(p.done for p in plans)
    return {"changed": changed, "partitions": results}


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        # not required_one_of: all's default (false) would count as given
        required_if=KEY_SOURCE_REQUIRED_IF + [("all", False, ("partitions",))],
        mutually_exclusive=[("partitions", "all")],
        supports_check_mode=True,
    )
    plans = []
    outcome = run_or_fail(module, run, module, plans,
                          failure=lambda: {"changed": any(p.done for p in plans), "partitions": [p.as_result() for p in plans]})
    module.exit_json(**outcome)


if __name__ == "__main__":
    main()
