# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every kairos.kcrypt module shares on the Ansible side: argument specs and the error funnel.

Private to the collection. The only module_utils file that imports Ansible: the
rest stays importable by the server and the CLIs without ansible-core.

Each ``*_SPEC`` below is one option group, documented once, in the doc fragment named
beside it; a module merges the groups it takes with ``generate_argspec`` and lists the
same fragments in ``extends_documentation_fragment``.
tests/unit/plugins/modules/test_documentation.py checks the two against each other.
"""

from __future__ import annotations

import copy

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, MissingDependencyError

# kairos.kcrypt.tpm: the TPM to open. Unset means $KCRYPT_TPM_DEVICE, /dev/tpmrm0, /dev/tpm0
# (or, for key_source=auto, the node's Kairos config first).
TPM_SPEC = {
    "tpm_device": {"type": "str"},
}

# kairos.kcrypt.offline_key: where offline mode keeps its passphrase. Unset means the node's
# Kairos config (key_source=auto), else upstream's defaults (tpm/device.py DEFAULT_NV_INDEX, DEFAULT_C_INDEX).
OFFLINE_KEY_SPEC = {
    "nv_index": {"type": "str"},
    "c_index": {"type": "str"},
}

# kairos.kcrypt.key_source: where a partition's key comes from (with TPM_SPEC and OFFLINE_KEY_SPEC).
# No defaults for what key_source=auto may take from the Kairos config: unset (None) means
# "the node's config, else the documented default" (node/key_source.build applies them).
KEY_SOURCE_SPEC = {
    "key_source": {"type": "str", "default": "tpm", "choices": ["tpm", "kms", "passphrase", "auto"]},
    "passphrase": {"type": "str", "no_log": True},
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

# kairos.kcrypt.recovery_escrow: where kairos_luks_encrypt and kairos_luks_rekey keep a new recovery key
# (node/recovery.py ESCROWS). With kms, the KMS is the one the key_source group names.
RECOVERY_ESCROW_SPEC = {
    "recovery_escrow": {"type": "str", "default": "controller", "choices": ["controller", "kms"]},
}

PARTITION_SELECTOR_OPTIONS = {
    "label": {"type": "str"},
    "device": {"type": "path"},
    "uuid": {"type": "str"},
}

# kairos.kcrypt.partitions: the ``partitions`` option of kairos_luks_encrypt and kairos_luks_rekey,
# one selector per item.
PARTITIONS_SPEC = {
    "partitions": {
        "type": "list",
        "elements": "dict",
        "required": True,
        "options": PARTITION_SELECTOR_OPTIONS,
        "mutually_exclusive": [("device", "uuid")],
        "required_one_of": [("label", "device", "uuid")],
    },
}


def generate_argspec(*groups, **own):
    """One argument spec from option groups and a module's own options.

    Each group is copied, so no module can change another's spec; an option defined twice
    is a programming error and raises ValueError.
    """
    spec = {}
    for options in groups + (own,):
        for name, definition in options.items():
            if name in spec:
                raise ValueError("option %s is defined twice" % name)
            spec[name] = copy.deepcopy(definition)
    return spec


def run_or_fail(module, work, *args, failure=None, **kwargs):
    """The error funnel of every module: return ``work(*args, **kwargs)``, or end the task.

    A missing Python library fails with missing_required_lib's message (the import's
    traceback goes in ``exception``); a KcryptError with its own message, which never
    holds a secret, and no traceback. ``failure``, if given, is called then and returns
    the extra result fields to report (what was done before the error). Anything else is
    a bug in the collection and keeps Ansible's traceback.
    """
    try:
        return work(*args, **kwargs)
    except MissingDependencyError as error:
        module.fail_json(msg=missing_required_lib(error.library), exception=error.traceback_text)
    except KcryptError as error:
        module.fail_json(msg=str(error), **(failure() if failure else {}))


def hide_secrets(module, source):
    """Keep every key ``source`` (a node key source) hands out, now and later, out of the module's output and logs."""
    source.on_secret(lambda secret: module.no_log_values.add(secret.decode("utf-8", "replace")))
