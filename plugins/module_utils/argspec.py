# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by the node modules (plain data: no Ansible import).

Private to the collection: the API may change without notice.
Documented once in the doc fragments ``kairos.kcrypt.tpm`` and ``kairos.kcrypt.key_source``;
the ``kcrypt`` CLI offers the same names as flags.
"""

from __future__ import annotations

TPM_ARGS = {
    "tpm_device": {"type": "str", "default": ""},
    "nv_index": {"type": "str", "default": "0x1500000"},
    "c_index": {"type": "str", "default": "0x81000008"},
}

# No defaults here for what key_source=auto may take from the Kairos config: unset (None)
# means "the node's config, else the documented default" (key_source.build applies them).
KEY_SOURCE_ARGS = {
    "key_source": {"type": "str", "default": "tpm", "choices": ["tpm", "kms", "passphrase", "auto"]},
    "passphrase": {"type": "str", "no_log": True},
    "tpm_device": {"type": "str"},
    "nv_index": {"type": "str"},
    "c_index": {"type": "str"},
    "challenger_server": {"type": "str"},
    "certificate": {"type": "str"},
    "mdns": {"type": "bool"},
    "mdns_interfaces": {"type": "list", "elements": "str"},
    "kms_protocol": {"type": "str", "choices": ["attestation", "legacy"]},
    "kms_attempts": {"type": "int", "default": 30},
    "kms_retry_delay": {"type": "float", "default": 1.0},
}

KEY_SOURCE_REQUIRED_IF = [
    ("key_source", "passphrase", ("passphrase",)),
    ("key_source", "kms", ("challenger_server",)),
]

PARTITION_SELECTOR_ARGS = {
    "label": {"type": "str"},
    "device": {"type": "path"},
    "uuid": {"type": "str"},
}

# The ``partitions`` option of kairos_luks_encrypt and kairos_luks_rekey: one selector per item.
PARTITIONS_ARG = {
    "type": "list",
    "elements": "dict",
    "required": True,
    "options": PARTITION_SELECTOR_ARGS,
    "mutually_exclusive": [("device", "uuid")],
    "required_one_of": [("label", "device", "uuid")],
}
