#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_luks_encrypt
short_description: Encrypt data partitions with LUKS2 and a key from the TPM, a Kairos KMS or a passphrase
version_added: 0.1.0
description:
  - Encrypts the selected partitions the way Kairos does. The LUKS2 header carries the partition label,
    and the LUKS UUID is derived from that label.
  - The key comes from the node's TPM (offline mode), from a kcrypt challenger KMS after TPM attestation
    (online mode), or from a given passphrase. See O(key_source).
  - O(mode) chooses how to encrypt, and you must always set it.
  - O(mode=format) creates a new LUKS2 container with an empty ext4 filesystem inside. It runs the same
    commands as Kairos. It needs device-mapper, and it refuses a partition that holds anything unless
    O(wipe=true).
  - O(mode=in_place) keeps the ext2/3/4 filesystem and its data. It shrinks the filesystem by 32 MiB to make
    room for the LUKS header, then encrypts with C(cryptsetup reencrypt). This needs no device-mapper.
    An interrupted run is finished by the next run.
  - A partition that is already encrypted and opens with the key is left alone. If the key does not open
    it, the task fails and the partition is never reformatted.
  - Every check (lookup, key, in use, size, device-mapper) runs for all partitions before anything changes.
    When a check fails, nothing is changed.
options:
  mode:
    description:
      - V(format) creates a new LUKS2 container and ext4 filesystem, and destroys the content.
      - V(in_place) encrypts the existing ext2/3/4 filesystem and keeps its data.
    type: str
    required: true
    choices: [format, in_place]
  wipe:
    description:
      - With O(mode=format), allow formatting partitions that hold a filesystem or any other recognised
        content. That content is destroyed.
      - Partitions that are already LUKS-encrypted are never formatted, even with this option.
    type: bool
    default: false
  type:
    description:
      - LUKS version. Only LUKS2 is offered, because the label that finds a partition again lives in the
        LUKS2 header, and Kairos reads LUKS2.
    type: str
    choices: [luks2]
    default: luks2
  cipher:
    description:
      - Encryption cipher, for example V(aes-xts-plain64). The default is cryptsetup's compiled-in default.
    type: str
  hash:
    description:
      - Hash for the key slot (C(cryptsetup --hash)). The default is cryptsetup's.
    type: str
  keysize:
    description:
      - Volume key size in bits (C(cryptsetup --key-size)). The default is cryptsetup's, which is 512 for aes-xts.
    type: int
  sector_size:
    description:
      - Encryption sector size in bytes (C(cryptsetup --sector-size)).
    type: int
  pbkdf:
    description:
      - How the key slot derives its key from the passphrase.
      - If you set neither O(pbkdf.iteration_time) nor O(pbkdf.iteration_count), generated keys
        (O(key_source=tpm) and O(key_source=kms)) use Kairos' 5 ms iteration time. These keys have 165 to
        256 random bits, so a slower PBKDF adds no security and only slows every boot.
        O(key_source=passphrase) gets cryptsetup's default of 2 seconds.
    type: dict
    suboptions:
      algorithm:
        description:
          - The PBKDF algorithm. The default is cryptsetup's, which is argon2id.
        type: str
        choices: [argon2id, argon2i, pbkdf2]
      iteration_time:
        description:
          - Seconds the PBKDF should take on this machine (C(cryptsetup --iter-time), in seconds here).
        type: float
      iteration_count:
        description:
          - A fixed iteration count, with no benchmark (C(--pbkdf-force-iterations)).
          - For argon2, this is the time cost.
        type: int
      memory:
        description:
          - Memory cost in KiB (argon2 only).
        type: int
      parallel:
        description:
          - Parallel threads (argon2 only).
        type: int
  recovery_key:
    description:
      - Also add a recovery key in a second key slot. It is a random 256-bit key in the format that
        systemd-cryptenroll uses for recovery keys.
      - O(recovery_escrow) says where the key is kept.
      - A partition that already has a recovery key is left as it is.
        M(kairos.kcrypt.kairos_luks_rekey) with O(kairos.kcrypt.kairos_luks_rekey#module:recovery_key=true) replaces it.
    type: bool
    default: false
  verify:
    description:
      - After encrypting, get each key again from a new start and test that it opens every selected
        partition, as a second run in check mode would. With O(key_source=kms) this is a new attestation
        with the KMS, as at boot; with O(key_source=tpm) a new read of the NV blob.
      - Fails the task if a key does not open a partition it just encrypted. The partitions stay encrypted.
      - Does nothing in check mode or when nothing was changed.
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
      - Check mode makes all the checks of a real run. It creates no NV blob, no TPM key, no KMS enrolment and
        escrows no recovery key.
      - With O(key_source=kms), it asks the KMS only for partitions that are already encrypted, to test their
        key. A booting node makes the same request.
  diff_mode:
    support: full
  idempotent:
    support: full
requirements:
  - cryptsetup >= 2.4, blkid, e2fsprogs (e2fsck, resize2fs, dumpe2fs, mkfs.ext4)
  - device-mapper (dm_mod and dm_crypt) for O(mode=format)
seealso:
  - module: kairos.kcrypt.kairos_luks_unlock
  - module: kairos.kcrypt.kairos_tpm_nv
author:
  - kairos.kcrypt contributors (@kairos-io)
"""

EXAMPLES = r"""
- name: Encrypt COS_PERSISTENT in place with the offline TPM key, keeping its data
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - label: COS_PERSISTENT
    mode: in_place

- name: Format two new data partitions with keys from the KMS
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - device: /dev/vdb1
        label: DATA
      - device: /dev/vdb2
        label: LOGS
    mode: format
    key_source: kms
    challenger_server: https://kms.example.com:8082
    certificate: /etc/kcrypt/kms-ca.pem
    verify: true  # attest again and test that the new keys open both partitions

- name: Encrypt with a recovery key and keep the key in a vault
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - label: COS_PERSISTENT
    mode: in_place
    recovery_key: true
  no_log: true
  register: encrypted

- name: Encrypt with a KMS key and escrow a recovery key in the same KMS
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - label: COS_PERSISTENT
    mode: in_place
    key_source: kms
    challenger_server: https://kms.example.com:8082
    recovery_key: true
    recovery_escrow: kms

- name: Preview what would change
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - label: COS_OEM
      - label: COS_PERSISTENT
    mode: in_place
  check_mode: true
  diff: true

- name: Find out the TPM hash to register before encrypting with a KMS key (changes nothing)
  kairos.kcrypt.kairos_luks_encrypt:
    partitions:
      - label: COS_PERSISTENT
    mode: in_place
    key_source: kms
    challenger_server: https://kms.example.com:8082
  check_mode: true
  register: plan
  # plan.tpm_hash goes to kairos.kcrypt.kairos_sealedvolume, plan.partitions[0].label too
"""

RETURN = r"""
tpm_hash:
  description:
    - The node's TPM hash, the identity the KMS knows it by (as M(kairos.kcrypt.kairos_tpm_hash) returns it).
      Read before anything changes, in check mode too, so a dry run can register the node with the KMS.
    - Empty when O(key_source=passphrase) and the node has no usable TPM.
  returned: always
  type: str
  sample: 8b8f4b1d0d3a0e4c0bc9a6a0f4e3d9c2b7c1f0a5e6d4c3b2a1908f7e6d5c4b3a
verified:
  description: Whether O(verify) tested the key of every partition after encrypting (and they opened).
  returned: always
  type: bool
partitions:
  description: One entry per selected partition, in the order given. It never holds the partition key.
  returned: always
  type: list
  elements: dict
  contains:
    device:
      description: Device path.
      type: str
      sample: /dev/vda5
    name:
      description: Kernel name. Kairos names the mapping after it, as in C(/dev/mapper/vda5).
      type: str
      sample: vda5
    label:
      description: LUKS label.
      type: str
      sample: COS_PERSISTENT
    luks_uuid:
      description:
        - LUKS UUID, which Kairos derives from the label as uuid5(NAMESPACE_URL, label).
        - Empty when cryptsetup will pick it (a partition without label), in check mode.
      type: str
      sample: 85c39d0f-4867-5227-8334-f5eec606d9eb
    partuuid:
      description: GPT partition UUID (sent to the KMS as C(uuid)).
      type: str
    key_source:
      description: Where the key came from (V(tpm), V(kms) or V(passphrase)).
      type: str
    action:
      description:
        - What was done, or would be done in check mode.
        - V(none) means it was already encrypted with this key.
        - V(format) or V(in_place) means it was encrypted now.
        - V(resume) means an interrupted in-place encryption was finished.
      type: str
      sample: in_place
    changed:
      description: Whether this partition changed.
      type: bool
    recovery_key_added:
      description: Whether a recovery key was added now (or would be, in check mode).
      type: bool
    recovery_key:
      description: The new recovery key. Only present when it was added by this run. Store it now.
      type: str
      returned: when a recovery key was added with O(recovery_escrow=controller)
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import (
    KEY_SOURCE_REQUIRED_IF, KEY_SOURCE_SPEC, OFFLINE_KEY_SPEC, PARTITIONS_SPEC, RECOVERY_ESCROW_SPEC, TPM_SPEC, generate_argspec, hide_secrets,
    run_or_fail,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, key_source, luks, recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import read_tpm_hash

# The options that say how to format, by the names LuksOptions.from_options takes.
LUKS_OPTIONS = ("type", "cipher", "keysize", "hash", "sector_size", "pbkdf")


def argument_spec():
    return generate_argspec(
        PARTITIONS_SPEC,
        KEY_SOURCE_SPEC,
        TPM_SPEC,
        OFFLINE_KEY_SPEC,
        RECOVERY_ESCROW_SPEC,
        mode=dict(type="str", required=True, choices=list(encryption.MODES)),
        wipe=dict(type="bool", default=False),
        type=dict(type="str", default="luks2", choices=["luks2"]),
        cipher=dict(type="str"),
        hash=dict(type="str"),
        keysize=dict(type="int", no_log=False),
        sector_size=dict(type="int"),
        pbkdf=dict(
            type="dict",
            options=dict(
                algorithm=dict(type="str", choices=list(luks.PBKDF_ALGORITHMS)),
                iteration_time=dict(type="float"),
                iteration_count=dict(type="int"),
                memory=dict(type="int"),
                parallel=dict(type="int"),
            ),
            mutually_exclusive=[("iteration_time", "iteration_count")],
        ),
        recovery_key=dict(type="bool", default=False, no_log=False),
        verify=dict(type="bool", default=False),
    )


def state_text(plans, when):
    """The partition states as YAML-like text, for --diff."""
    lines = []
    for item in plans:
        lines.append("%s:" % item.device.path)
        for key, value in (item.before() if when == "before" else item.after()).items():
            lines.append("  %s: %s" % (key, value))
    return "\n".join(lines) + "\n"


def run(module, results):
    """Plan every partition, then encrypt them (or, in check mode, predict); fills ``results`` as it goes."""
    params = module.params
    request = encryption.EncryptRequest(
        partitions=encryption.selectors(params["partitions"]),
        mode=params["mode"],
        wipe=params["wipe"],
        options=luks.LuksOptions.from_options(**{name: params[name] for name in LUKS_OPTIONS}),
        recovery_key=params["recovery_key"],
        recovery_escrow=recovery.build_escrow(params["recovery_escrow"] if params["recovery_key"] else "controller", params),
    )
    source = key_source.build(params)
    hide_secrets(module, source)
    tpm_hash = node_tpm_hash(source, request)
    plans = encryption.plan(request, source)
    if any(p.add_recovery_key for p in plans) and request.recovery_escrow.returns_key and not module.no_log:
        raise KcryptError(
            "recovery_key=true with recovery_escrow=controller returns the new recovery key in the result: set "
            "'no_log: true' on the task so it stays out of logs (or escrow it with recovery_escrow=kms). Nothing was changed."
        )
    diff = {"before": state_text(plans, "before"), "after": state_text(plans, "after")}
    changed = any(p.changes for p in plans)
    verified = False
    if module.check_mode:
        results.extend(encryption.result(item, source) for item in plans)
    else:
        encryption.apply(plans, request, source, results=results)
        if params["verify"] and changed:
            fresh = key_source.build(params)  # nothing cached: each key is fetched again, as at boot
            hide_secrets(module, fresh)
            try:
                encryption.verify(request, fresh)
            except KcryptError as error:
                raise KcryptError("encrypted, but the key does not open what was encrypted: %s" % error) from None
            verified = True
    return {"changed": changed, "partitions": results, "diff": diff, "tpm_hash": tpm_hash, "verified": verified}


def node_tpm_hash(source, request):
    """The node's TPM hash; empty only when nothing here needs the TPM and it cannot be read."""
    needs_tpm = source.needs_tpm or (request.recovery_key and request.recovery_escrow.name == recovery.ESCROW_KMS)
    try:
        return read_tpm_hash(source.tpm_device)
    except KcryptError:  # no TPM, or no tpm2-pytss to talk to one
        if needs_tpm:
            raise
        return ""


def main():
    module = AnsibleModule(argument_spec=argument_spec(), required_if=KEY_SOURCE_REQUIRED_IF, supports_check_mode=True)
    results = []
    outcome = run_or_fail(module, run, module, results,
                          failure=lambda: {"changed": any(r["changed"] for r in results), "partitions": results,
                                           "tpm_hash": "", "verified": False})
    module.exit_json(**outcome)


if __name__ == "__main__":
    main()
