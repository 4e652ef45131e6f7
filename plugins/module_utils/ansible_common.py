# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every kairos.kcrypt module shares on the Ansible side.

Private to the collection. The only module_utils file that imports Ansible: the
rest stays importable by the server and the CLIs without ansible-core.
"""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.kairos.kcrypt.plugins.module_utils.errors import KcryptError, MissingDependencyError

# The option of every module that opens a TPM; documented in the kairos.kcrypt.tpm doc fragment.
TPM_ARGUMENT_SPEC = {"tpm_device": {"type": "str", "default": ""}}


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
