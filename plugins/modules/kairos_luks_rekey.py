#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_luks_rekey
short_description: Change the LUKS key of encrypted partitions without a moment without a working key
version_added: 0.1.0
description:
  - Re-keys LUKS2 partitions that M(kairos.kcrypt.kairos_luks_encrypt) encrypted. It adds the new key in a new
    key slot, checks that the new key opens it, and only then removes the old key slots.
  - Key slots marked as recovery keys (added with O(kairos.kcrypt.kairos_luks_encrypt#module:recovery_key)) are kept.
  - A LUKS2 token of type C(kcrypt-rekey) records the key slot of the re-key round O(rekey_id). It holds no secret.
    With it, a second run with the same O(rekey_id) changes nothing, and a run that was interrupted completes.
  - With O(key_source=tpm) (offline mode) the module does everything in one run. It draws a new random passphrase,
    adds it to every partition, checks it, replaces the NV blob in one atomic TPM write, reads the blob back,
    and removes the old key slots.
  - With O(key_source=passphrase) the old key is O(passphrase) and the new one O(new_passphrase).
  - With O(key_source=kms) the KMS must be switched to the new key between two runs of this module, so there
    are two steps. O(step=add) adds O(new_passphrase) with the key the KMS serves now. Then the KMS Secret is
    updated, for example with C(kcrypt-challenger add --update-passphrase). O(step=finish) checks that the KMS
    now serves the new key and that it opens the partition, then removes the old key slots.
    The C(kairos.kcrypt.rekey) playbook runs these steps.
  - With O(recovery_key=true) the recovery key is rotated too, after the main key's round (O(step=all), or
    O(step=finish) with O(key_source=kms)). O(step=recovery) rotates only the recovery key. A new recovery key is
    added and kept first (returned, or escrowed in the KMS with O(recovery_escrow=kms)); only then are the old
    recovery-key slots removed. Rotate it after every use of the recovery key.
options:
  new_passphrase:
    description:
      - The new key. Required with O(key_source=kms) and O(key_source=passphrase). Not used with O(key_source=tpm),
        which draws a random one.
      - It is used as is, with no trailing newline added or removed.
    type: str
  rekey_id:
    description:
      - A name for this re-key round, for example V(2026-12).
      - Running again with the same name changes nothing once the round is complete, and completes an interrupted
        one. A new name starts a new round.
      - Required with O(key_source=tpm) and O(key_source=kms), whose new key is random on each run. With
        O(key_source=passphrase) the new passphrase identifies the round.
    type: str
  step:
    description:
      - V(all) does the whole re-key. It is for O(key_source=tpm) and O(key_source=passphrase).
      - V(add) only adds the new key. V(finish) only removes the old key slots, once the source serves the new key.
        O(key_source=kms) needs V(add), then the KMS update, then V(finish).
      - V(recovery) leaves the main key alone and only rotates the recovery key (O(recovery_key) is implied),
        authorised by the key the source serves now.
    type: str
    choices: [all, add, finish, recovery]
    default: all
  recovery_key:
    description:
      - Rotate the partition's recovery key in this round (O(rekey_id)), or add one where there is none.
        The new key is kept as O(recovery_escrow) says before the old recovery-key slots are removed.
      - A partition whose recovery key of round O(rekey_id) is in place and alone is left as it is.
      - Needs O(rekey_id) with every key source.
    type: bool
    default: false
extends_documentation_fragment:
  - kairos.kcrypt.partitions
  - kairos.kcrypt.key_source
  - kairos.kcrypt.tpm
  - kairos.kcrypt.offline_key
  - kairos.kcrypt.recovery_escrow
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
    details:
      - Check mode reads the current key and tests it, and changes no key slot, token or NV blob. It escrows nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - With the same O(rekey_id) (or O(new_passphrase) for O(key_source=passphrase)).
requirements:
  - cryptsetup >= 2.4
seealso:
  - module: kairos.kcrypt.kairos_luks_encrypt
  - module: kairos.kcrypt.kairos_sealedvolume
author:
  - kairos.kcrypt contributors (@kairos-io)
"""

EXAMPLES = r"""
- name: Re-key COS_PERSISTENT in offline mode (new NV blob)
  kairos.kcrypt.kairos_luks_rekey:
    partitions:
      - label: COS_PERSISTENT
    key_source: tpm
    rekey_id: "2026-12"

- name: Change a passphrase
  kairos.kcrypt.kairos_luks_rekey:
    partitions:
      - device: /dev/vdb1
    key_source: passphrase
    passphrase: "{{ vault_old_passphrase }}"
    new_passphrase: "{{ vault_new_passphrase }}"

- name: KMS, step 1 of 3 - add the new key with the key the KMS serves now
  kairos.kcrypt.kairos_luks_rekey:
    partitions:
      - label: COS_PERSISTENT
    key_source: kms
    challenger_server: https://kms.example.com:8082
    new_passphrase: "{{ new_key }}"
    rekey_id: "2026-12"
    step: add
  register: added

# step 2: store new_key in the partition's Secret on the KMS (the kairos.kcrypt.rekey playbook does it)

- name: KMS, step 3 of 3 - the KMS serves the new key; remove the old key slots
  kairos.kcrypt.kairos_luks_rekey:
    partitions:
      - label: COS_PERSISTENT
    key_source: kms
    challenger_server: https://kms.example.com:8082
    rekey_id: "2026-12"
    step: finish

- name: After the recovery key was used, replace it and its copy in the KMS
  kairos.kcrypt.kairos_luks_rekey:
    partitions:
      - label: COS_PERSISTENT
    key_source: kms
    challenger_server: https://kms.example.com:8082
    rekey_id: "2026-12-recovery"
    step: recovery
    recovery_escrow: kms
"""

RETURN = r"""
partitions:
  description: One entry per partition, in the order given. It never holds a key.
  returned: always
  type: list
  elements: dict
  contains:
    device:
      description: Device path.
      type: str
      sample: /dev/vda5
    name:
      description: Kernel name.
      type: str
      sample: vda5
    label:
      description: LUKS label.
      type: str
      sample: COS_PERSISTENT
    luks_uuid:
      description: LUKS UUID.
      type: str
    partuuid:
      description: GPT partition UUID.
      type: str
    added:
      description: Whether the new key was added now (or would be, in check mode).
      type: bool
    removed_slots:
      description: Key slots removed now (or that would be, in check mode).
      type: list
      elements: int
    changed:
      description: Whether this partition changed.
      type: bool
    recovery_key_rotated:
      description: Whether a new recovery key was added now and the old recovery-key slots removed (or would be, in check mode).
      type: bool
    recovery_key:
      description: The new recovery key. Store it now.
      type: str
      returned: when a recovery key was rotated with O(recovery_escrow=controller)
nv_rewritten:
  description: With O(key_source=tpm), whether the NV blob was replaced (or would be, in check mode).
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import (
    KEY_SOURCE_REQUIRED_IF, KEY_SOURCE_SPEC, OFFLINE_KEY_SPEC, PARTITIONS_SPEC, RECOVERY_ESCROW_SPEC, TPM_SPEC, generate_argspec, hide_secrets,
    run_or_fail,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, key_source, luks, recovery, rekey


def argument_spec():
    return generate_argspec(
        PARTITIONS_SPEC,
        KEY_SOURCE_SPEC,
        TPM_SPEC,
        OFFLINE_KEY_SPEC,
        RECOVERY_ESCROW_SPEC,
        new_passphrase=dict(type="str", no_log=True),
        rekey_id=dict(type="str"),
        step=dict(type="str", default="all", choices=list(rekey.STEPS) + ["recovery"]),
        recovery_key=dict(type="bool", default=False, no_log=False),
    )


def check_request(params, source):
    """KcryptError when the options do not fit the key source (before anything is read or changed)."""
    name, step = source.name, params["step"]
    if rotates_recovery(params) and not params["rekey_id"]:
        raise KcryptError("rotating the recovery key needs rekey_id to name the round (a second run with it changes nothing)")
    if step == "recovery":
        if params["new_passphrase"]:
            raise KcryptError("step=recovery changes only the recovery key; new_passphrase is not used")
        return
    if name in ("tpm", "kms") and not params["rekey_id"]:
        raise KcryptError("key_source=%s draws a new random key on each run: give rekey_id to name the round" % name)
    if name == "tpm" and params["new_passphrase"]:
        raise KcryptError("key_source=tpm draws the new key itself; new_passphrase is not used")
    if name == "tpm" and step != "all":
        raise KcryptError("key_source=tpm re-keys in one run: use step=all")
    if name == "kms" and step == "all":
        raise KcryptError(
            "key_source=kms needs the KMS updated between adding and removing keys: run step=add, update the "
            "KMS Secret, then step=finish (the kairos.kcrypt.rekey playbook does this)"
        )
    if name in ("kms", "passphrase") and step in ("all", "add") and not params["new_passphrase"]:
        raise KcryptError("key_source=%s step=%s needs new_passphrase" % (name, step))


def rotates_recovery(params):
    """Whether this run rotates the recovery key: step=recovery, or recovery_key=true at the end of a round."""
    return params["step"] == "recovery" or (params["recovery_key"] and params["step"] in ("all", "finish"))


def entry(device, outcome, recovery_outcome=None):
    recovery_outcome = recovery_outcome or {"rotated": False, "removed_slots": [], "recovery_key": None}
    result = {
        "device": device.path,
        "name": device.name,
        "label": device.label,
        "luks_uuid": device.uuid,
        "partuuid": device.partuuid,
        "added": outcome["added"],
        "removed_slots": outcome["removed_slots"] + recovery_outcome["removed_slots"],
        "changed": bool(outcome["added"] or outcome["removed_slots"] or recovery_outcome["rotated"]),
        "recovery_key_rotated": recovery_outcome["rotated"],
    }
    if recovery_outcome["recovery_key"] is not None:
        result["recovery_key"] = recovery_outcome["recovery_key"].decode("ascii")
    return result


def current_key(params, source, fresh):
    """``key_for(device)`` of the recovery rotation: the key that opens the partition after the main-key round.

    A passphrase round changed it to new_passphrase; the TPM and the KMS are asked again (``fresh``, a new
    key source: the NV blob was rewritten, the KMS Secret updated).
    """
    def key_for(device):
        if source.name == "passphrase":
            new = params["new_passphrase"]
            return new.encode("utf-8") if new and params["step"] == "all" else source.existing_key(device)
        return fresh.existing_key(device, device.label)
    return key_for


def run(module):
    """Re-key every partition (and rotate its recovery key); the result's fields."""
    params = module.params
    source = key_source.build(params)
    hide_secrets(module, source)
    check_request(params, source)
    escrow = recovery.build_escrow(params["recovery_escrow"] if rotates_recovery(params) else "controller", params)
    if rotates_recovery(params) and escrow.returns_key and not module.no_log:
        raise KcryptError("rotating the recovery key with recovery_escrow=controller returns the new key in the result: set "
                          "'no_log: true' on the task so it stays out of logs (or escrow it with recovery_escrow=kms). "
                          "Nothing was changed.")
    fresh = None
    if source.name != "passphrase":
        fresh = key_source.build(params)
        hide_secrets(module, fresh)
    devices = rekey.encrypted_devices(encryption.selectors(params["partitions"]))
    options = rekey.new_key_options(source)
    rekey_id = params["rekey_id"] or None
    if params["step"] == "recovery":
        outcomes, rewritten = {d.path: {"added": False, "removed_slots": []} for d in devices}, False
    elif source.name == "tpm":
        outcomes, rewritten = rekey.rekey_tpm(devices, source, rekey_id, options, module.check_mode, module.debug)
    else:
        new_key = params["new_passphrase"].encode("utf-8") if params["new_passphrase"] else None
        outcomes = rekey.rekey_with_source(devices, source, params["step"], new_key, rekey_id, options, module.check_mode)
        rewritten = False
    recovered = {}
    if rotates_recovery(params):
        if module.check_mode and any(o["added"] for o in outcomes.values()):
            # the main key is not really added in check mode, so the key after the round cannot open anything yet
            recovered = {d.path: {"rotated": not recovery.round_done(luks.read_header(d.path), rekey_id),
                                  "removed_slots": [], "recovery_key": None} for d in devices}
        else:
            recovered = rekey.rotate_recovery(devices, current_key(params, source, fresh), escrow, rekey_id, options,
                                              module.check_mode)
    entries = [entry(d, outcomes[d.path], recovered.get(d.path)) for d in devices]
    return {"changed": any(e["changed"] for e in entries) or rewritten, "partitions": entries, "nv_rewritten": rewritten}


def main():
    module = AnsibleModule(argument_spec=argument_spec(), required_if=KEY_SOURCE_REQUIRED_IF, supports_check_mode=True)
    module.exit_json(**run_or_fail(module, run, module))


if __name__ == "__main__":
    main()
