# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where a new recovery key is kept (module_utils/ansible_common.py RECOVERY_ESCROW_SPEC)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  recovery_escrow:
    description:
      - Where a new recovery key is kept. The key is always escrowed or returned before it becomes the partition's
        recovery key (and before an older recovery key is removed), so the kept key opens the partition.
      - V(controller) returns the new key once, in RV(partitions[].recovery_key), and never again. Store it somewhere
        safe, such as a vault. The task must set C(no_log) to V(true) so the key stays out of logs; the module refuses
        to run otherwise.
      - V(kms) escrows the key in the kairos.kcrypt KMS named by O(challenger_server) (with O(certificate), O(mdns)),
        whatever O(key_source) is, and replaces the key escrowed for the partition before. The node proves its TPM as
        it does to get a key over the attestation protocol, and the KMS stores the key for this partition of the
        node's own SealedVolume, which must exist (a node that gets its keys from the KMS has one). The KMS never
        serves it to a node. An administrator reads it with C(kcrypt-challenger recovery show) or
        M(kairos.kcrypt.kairos_recovery_key), and every read is audited. The result never holds the key.
    type: str
    choices: [controller, kms]
    default: controller
"""
