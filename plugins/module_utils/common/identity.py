# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TPM identity: EK public key encodings, the "TPM hash", EK certificates as TPMs store them.

Private to the collection. Pure functions over ``cryptography`` so the node
side and the server compute identical values (spec §1.2, checklist 1 and 4).
"""

from __future__ import annotations

import hashlib
import re

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require

serialization = optional_import("cryptography.hazmat.primitives.serialization")

TPM_HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# TCG PC Client Platform TPM Profile, 7.3.2: a certificate in NV may be preceded by tag 0x1001, a 0x00 and
# its 16-bit length (go-attestation's ParseEKCertificate unwraps it too).
NV_CERTIFICATE_HEADER = b"\x10\x01\x00"


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


def der_element_size(data, offset=0):
    """The size of the DER element (tag, length, content) at ``offset``, or 0 when none fits in ``data``."""
    if len(data) < offset + 2 or data[offset] == 0:
        return 0
    length = data[offset + 1]
    header = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < offset + 2 + count:
            return 0
        length = int.from_bytes(data[offset + 2:offset + 2 + count], "big")
        header += count
    size = header + length
    return size if offset + size <= len(data) else 0


def certificate_der(blob):
    """The DER certificate in an EK certificate NV index's content, as go-attestation's ParseEKCertificate reads it:
    the TCG header ``10 01 00 LL LL`` stripped, then the first DER element (zero padding after it dropped).

    Data that is no DER SEQUENCE comes back as it is (parsing it then fails); a header announcing more bytes
    than there are is a ValueError, as in go-attestation (whose EKs() then falls back to the template EK).
    """
    data = bytes(blob or b"")
    if len(data) > 5 and data[:3] == NV_CERTIFICATE_HEADER:
        length = int.from_bytes(data[3:5], "big")
        if len(data) < length + 5:
            raise ValueError("the NV header announces a %d-byte certificate in %d bytes" % (length, len(data) - 5))
        data = data[5:5 + length]
    if not data or data[0] != 0x30:
        return data
    size = der_element_size(data)
    return data[:size] if size else data


def split_certificates(blob):
    """DER certificates stored back to back (TCG EK certificate chain indices), in order; stops at padding."""
    data = bytes(blob or b"")
    certificates, offset = [], 0
    while offset < len(data) and data[offset] == 0x30:
        size = der_element_size(data, offset)
        if not size:
            break
        certificates.append(data[offset:offset + size])
        offset += size
    return certificates
