# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TPM identity: EK public key encodings and the "TPM hash".

Private to the collection. Pure functions over ``cryptography`` so the node
side and the server compute identical values (spec §1.2, checklist 1 and 4).
"""

from __future__ import annotations

import hashlib
import re

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require

serialization = optional_import("cryptography.hazmat.primitives.serialization")

TPM_HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def spki_der(public_key):
    """DER SubjectPublicKeyInfo, as Go's x509.MarshalPKIXPublicKey writes it."""
    require("cryptography", "to encode the EK public key")
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(public_key):
    """``PUBLIC KEY`` PEM with 64-character lines and a trailing newline (Go pem.EncodeToMemory)."""
    require("cryptography", "to encode the EK public key")
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def tpm_hash(public_key):
    """Lowercase hex SHA-256 of the DER SPKI of the EK public key."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def load_spki(der):
    """Parse a DER SubjectPublicKeyInfo; raises ValueError on anything else."""
    require("cryptography", "to parse an EK public key")
    return serialization.load_der_public_key(der)


def is_tpm_hash(value):
    return isinstance(value, str) and bool(TPM_HASH_PATTERN.match(value))
