# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Maintenance of offline mode's NV area: check, read, clean up.

Private to the collection: the API may change without notice.
The equivalent of ``kairos-agent kcrypt checknv|readnv|cleanupnv`` (spec §5.4), for
the ``kairos_tpm_nv`` module and the ``kcrypt`` CLI. Removing the index destroys the
only copy of the offline passphrase: partitions encrypted with it can then only be
opened with a recovery key.
"""

from __future__ import annotations

from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, TPMError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM, parse_nv_index, parse_persistent_handle


def check(tpm_device, nv_index):
    """{"nv_index", "exists", "size"}: whether the index holds data. Reads only; decrypts nothing."""
    index = parse_nv_index(nv_index)
    with TPM(tpm_device) as tpm:
        data = tpm.nv_read(index)
    return {"nv_index": "0x%x" % index, "exists": data is not None, "size": len(data) if data is not None else 0}


def read(tpm_device, nv_index, c_index):
    """(status, passphrase): {"nv_index", "c_index", "exists", "decryptable"[, "error"]} and the
    passphrase, None when the index is absent or the key at ``c_index`` cannot decrypt it.
    """
    index = parse_nv_index(nv_index)
    handle = parse_persistent_handle(c_index)
    status = {"nv_index": "0x%x" % index, "c_index": "0x%x" % handle, "exists": False, "decryptable": False}
    passphrase = None
    with TPM(tpm_device) as tpm:
        status["exists"] = tpm.nv_exists(index)
        if status["exists"]:
            try:
                passphrase = blob.read_nv_passphrase(tpm, index, handle)
            except TPMError:
                raise
            except KcryptError as error:  # a blob this key cannot decrypt: a finding, not a failure
                status["error"] = str(error)
    status["decryptable"] = passphrase is not None
    return status, passphrase


def cleanup(tpm_device, nv_index, confirmed, check_mode=False):
    """Remove the index. Refuses without ``confirmed``. Returns {"nv_index", "existed", "removed"}."""
    index = parse_nv_index(nv_index)
    if not confirmed:
        raise KcryptError(
            "cleaning up NV index 0x%x destroys the offline passphrase; partitions encrypted with it can no "
            "longer be unlocked by the TPM. Confirm explicitly to proceed." % index
        )
    with TPM(tpm_device) as tpm:
        existed = tpm.nv_exists(index)
        removed = existed and not check_mode and tpm.nv_undefine(index)
    return {"nv_index": "0x%x" % index, "existed": existed, "removed": bool(removed)}
