#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_recovery_key
short_description: Read the recovery keys that nodes escrowed in the kairos.kcrypt KMS (audited)
version_added: 0.1.0
description:
  - Nodes escrow the recovery key of a partition in the KMS with
    O(kairos.kcrypt.kairos_luks_encrypt#module:recovery_escrow=kms). The KMS never serves it to a node.
    This module is the administrator's way to read it, like C(kcrypt-challenger recovery show).
  - Without O(reveal=true) it only says, per partition of the node's SealedVolume, whether a recovery key is
    escrowed and when.
  - Every read is recorded in the store's audit trail first, with who (the user running the module, on which
    host), when, which SealedVolume, partition and Secret, and O(reason). When the record cannot be written,
    nothing is read. C(kcrypt-challenger recovery audit) lists the records.
  - With O(backend=kubernetes), recovery keys are Secrets in O(recovery_namespace), which the KMS can write but
    not read. The credentials used here need the C(kcrypt-recovery-reader) Role of C(deploy/kubernetes/rbac.yaml).
  - With O(backend=embedded), run it on the KMS host, usually with C(delegate_to).
options:
  tpm_hash:
    description:
      - The node's TPM hash (64 hex characters). Its first SealedVolume is used.
      - Give O(tpm_hash) or O(name).
    type: str
  name:
    description: The SealedVolume's name.
    type: str
  partition:
    description: Only this partition of the SealedVolume (its label, device name or UUID). The default is every partition.
    type: str
  reveal:
    description:
      - V(true) returns the keys in RV(recovery_keys[].recovery_key). The task must set C(no_log) to V(true); the
        module refuses otherwise.
      - V(false) only reports whether a key is escrowed. The read is recorded all the same.
    type: bool
    default: false
  reason:
    description: Why the key is read (a ticket, a sentence). It is recorded with the read; at most 500 characters.
    type: str
    default: ""
  backend:
    description:
      - V(embedded) uses the KMS's SQLite store at O(store_path), on the host the task runs on.
      - V(kubernetes) uses the SealedVolumes in O(namespace) and the recovery Secrets in O(recovery_namespace).
    type: str
    choices: [embedded, kubernetes]
    default: embedded
  store_path:
    description: Path of the embedded store's database. Used with O(backend=embedded).
    type: path
    default: /var/lib/kcrypt-challenger/kms.db
  key_file:
    description: The embedded store's encryption key file. The default is the database path plus C(.key).
    type: path
  kubeconfig:
    description:
      - Path of the kubeconfig file. Used with O(backend=kubernetes).
      - If omitted, the in-cluster service account is used when the task runs in a pod, then E(KUBECONFIG),
        then C(~/.kube/config).
    type: path
  context:
    description: The kubeconfig context to use. Used with O(backend=kubernetes).
    type: str
  namespace:
    description: Namespace of the SealedVolumes. Used with O(backend=kubernetes).
    type: str
    default: kcrypt
  recovery_namespace:
    description: Namespace of the recovery-key Secrets and audit Events. The default is O(namespace) plus C(-recovery).
    type: str
extends_documentation_fragment:
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reading changes nothing the module manages, so check mode reads (and records the read) as a normal run does.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - Never reports a change. Each run adds a record to the audit trail.
requirements:
  - cryptography >= 41
  - kubernetes >= 28 (for O(backend=kubernetes))
seealso:
  - module: kairos.kcrypt.kairos_luks_encrypt
  - module: kairos.kcrypt.kairos_luks_rekey
author:
  - kairos.kcrypt contributors (@kairos-io)
"""

EXAMPLES = r"""
- name: Is a recovery key escrowed for node3?
  kairos.kcrypt.kairos_recovery_key:
    tpm_hash: "{{ hostvars['node3'].tpm_hash }}"
  delegate_to: kms.example.org
  register: escrow

- name: Read node3's recovery key for COS_PERSISTENT (audited)
  kairos.kcrypt.kairos_recovery_key:
    tpm_hash: "{{ hostvars['node3'].tpm_hash }}"
    partition: COS_PERSISTENT
    reveal: true
    reason: "INC-1234: mainboard replaced"
  delegate_to: kms.example.org
  no_log: true
  register: recovery
"""

RETURN = r"""
recovery_keys:
  description: One entry per partition of the SealedVolume (or the one O(partition) names).
  returned: always
  type: list
  elements: dict
  contains:
    sealedvolume:
      description: The SealedVolume's name.
      type: str
    tpm_hash:
      description: The node's TPM hash.
      type: str
    partition:
      description: The partition's label (else its device name or UUID).
      type: str
    secret:
      description: The name of the recovery-key Secret.
      type: str
    escrowed:
      description: Whether a recovery key is escrowed for the partition.
      type: bool
    escrowed_at:
      description: When the node escrowed it (RFC 3339, UTC); empty when none is.
      type: str
    recovery_key:
      description: The recovery key.
      type: str
      returned: with O(reveal=true), for partitions with an escrowed key
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store


def open_backend(params):
    if params["backend"] == "kubernetes":
        return open_store("kubernetes://", kubeconfig=params["kubeconfig"], context=params["context"],
                          namespace=params["namespace"], recovery_namespace=params["recovery_namespace"])
    return open_store("sqlite://" + params["store_path"], key_file=params["key_file"], create=False)


def view(item):
    result = {key: item[key] for key in ("sealedvolume", "tpm_hash", "partition", "secret", "escrowed", "escrowed_at")}
    if item["recovery_key"] is not None:
        result["recovery_key"] = item["recovery_key"].decode("utf-8", "replace")
    return result


def run(module):
    """Read (audited) the recovery keys the options name; the result's fields."""
    params = module.params
    if params["reveal"] and not module.no_log:
        raise KcryptError("reveal=true returns recovery keys in the result: set 'no_log: true' on the task so they stay "
                          "out of logs. Nothing was read.")
    store = open_backend(params)
    try:
        actor = recovery.local_actor("kairos.kcrypt.kairos_recovery_key")
        found = recovery.reveal(store, params["tpm_hash"] or params["name"], actor, partition=params["partition"],
                                show_key=params["reveal"], reason=params["reason"])
    finally:
        store.close()
    # the keys are the result the task asked for: no_log on the task (checked above) keeps them out of logs
    return {"changed": False, "recovery_keys": [view(item) for item in found]}


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(
            tpm_hash=dict(type="str"),
            name=dict(type="str"),
            partition=dict(type="str"),
            reveal=dict(type="bool", default=False),
            reason=dict(type="str", default=""),
            backend=dict(type="str", choices=["embedded", "kubernetes"], default="embedded"),
            store_path=dict(type="path", default="/var/lib/kcrypt-challenger/kms.db"),
            key_file=dict(type="path", no_log=False),
            kubeconfig=dict(type="path"),
            context=dict(type="str"),
            namespace=dict(type="str", default="kcrypt"),
            recovery_namespace=dict(type="str"),
        ),
        required_one_of=[("tpm_hash", "name")],
        mutually_exclusive=[("tpm_hash", "name")],
        supports_check_mode=True,
    )
    module.exit_json(**run_or_fail(module, run, module))


if __name__ == "__main__":
    main()
