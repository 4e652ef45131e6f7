# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TPM-encrypted passphrases: offline mode's NV blob and legacy "generated_by: tpm" keys.

Private to the collection. Byte-compatible with upstream (spec §6.4): a 32-char
``[0-9a-z]`` passphrase, encrypted in software with RSA-OAEP-SHA256 (empty label)
under the RSA key persisted at ``c_index``, decrypted by the TPM. Unlike upstream,
``c_index`` is honoured for encryption too, so a non-default handle works end to end.
"""

from __future__ import annotations

import secrets
import string

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import DEFAULT_C_INDEX, DEFAULT_NV_INDEX, DEFAULT_TPM_LAYOUT  # noqa: F401  (re-exported

padding = optional_import("cryptography.hazmat.primitives.asymmetric.padding")
hashes = optional_import("cryptography.hazmat.primitives.hashes")

PASSPHRASE_ALPHABET = string.digits + string.ascii_lowercase
PASSPHRASE_LENGTH = 32


def new_tpm_passphrase():
    """32 characters of ``[0-9a-z]`` (upstream's shape, ~165 bits), from the OS CSPRNG."""
    return "".join(secrets.choice(PASSPHRASE_ALPHABET) for dummy in range(PASSPHRASE_LENGTH)).encode("ascii")


def _oaep():
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def encrypt_blob(tpm, plaintext, c_index=DEFAULT_C_INDEX, layout=DEFAULT_TPM_LAYOUT):
    """RSA-OAEP-SHA256 ciphertext of ``plaintext`` under the key at ``c_index`` (created with ``layout``'s template if absent)."""
    require("cryptography", "to encrypt the passphrase")
    public_key = tpm.owner_key_public(c_index, layout=layout)[0]
    return public_key.encrypt(plaintext, _oaep())


def decrypt_blob(tpm, blob, c_index=DEFAULT_C_INDEX):
    """The plaintext of a blob made by encrypt_blob (or by a Kairos node), decrypted by the TPM."""
    return tpm.rsa_decrypt(c_index, blob)


def read_nv_passphrase(tpm, nv_index=DEFAULT_NV_INDEX, c_index=DEFAULT_C_INDEX):
    """The offline passphrase stored at ``nv_index``, or None when the index is not defined."""
    blob = tpm.nv_read(nv_index)
    if blob is None:
        return None
    try:
        return decrypt_blob(tpm, blob, c_index)
    except KcryptError as error:
        raise KcryptError(
            "NV index 0x%x holds %d bytes that the key at 0x%x cannot decrypt (%s); "
            "check c_index, or clean up the index if it is stale" % (nv_index, len(blob), c_index, error)
        ) from None


def create_nv_passphrase(tpm, nv_index=DEFAULT_NV_INDEX, c_index=DEFAULT_C_INDEX, layout=DEFAULT_TPM_LAYOUT):
    """Generate a passphrase, store its encryption at ``nv_index`` and return it. The index must not exist.

    ``layout`` (device.TPM_LAYOUTS) says how a missing key and the new index are created.
    """
    passphrase = new_tpm_passphrase()
    tpm.nv_write(nv_index, encrypt_blob(tpm, passphrase, c_index, layout), layout)
    return passphrase


def nv_passphrase(tpm, nv_index=DEFAULT_NV_INDEX, c_index=DEFAULT_C_INDEX, layout=DEFAULT_TPM_LAYOUT):
    """Offline mode's passphrase: read from NV (either layout), or generated and stored on first use.

    Returns (passphrase, created).
    """
    existing = read_nv_passphrase(tpm, nv_index, c_index)
    if existing is not None:
        return existing, False
    return create_nv_passphrase(tpm, nv_index, c_index, layout), True
