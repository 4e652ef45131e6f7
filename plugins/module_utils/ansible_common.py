# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every kairos.kcrypt module shares on the Ansible side: argument specs and the error funnel.

Private to the collection. The only module_utils file that imports Ansible: the
rest stays importable by the server and the CLIs without ansible-core.
Each argument spec is documented once, in the doc fragment named beside it.
"""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, MissingDependencyError

# The option of every module that opens a TPM; documented in the kairos.kcrypt.tpm doc fragment.
TPM_ARGUMENT_SPEC = {"tpm_device": {"type": "str", "default": ""}}

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
    "tpm_layout": {"type": "str", "choices": ["go-tpm", "tpmk"]},
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


def run_or_fail(module, work, *args, **kwargs):
    """Call ``work``; report a missing library or a KcryptError with fail_json instead of a traceback."""
    try:
        return work(*args, **kwargs)
    except MissingDependencyError as error:
        module.fail_json(msg=missing_required_lib(error.library), exception=error.traceback_text)
    except KcryptError as error:
        module.fail_json(msg=str(error))


def redact_secrets(module, source):
    """Keep every key ``source`` (a key_source) has handed out out of the module's output and logs."""
    for secret in source.secrets if source is not None else ():
        module.no_log_values.add(secret.decode("utf-8", "replace"))
