# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""EK certificate bytes from NV, unwrapped as google/go-attestation v0.6.4 ``ParseEKCertificate``
(attest/tpm.go) does: the TCG NV header ``10 01 00 LL LL``, then the first DER element ("lax")."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.identity import certificate_der as ek_certificate_der

DER = bytes.fromhex("3003020101")  # a minimal DER SEQUENCE stands in for a certificate


@pytest.mark.parametrize("stored, expected", [
    (DER, DER),  # plain DER
    (DER + b"\x00" * 11, DER),  # zero padding after it (go-attestation's "lax" ASN.1 pass)
    (b"\x10\x01\x00\x00\x05" + DER, DER),  # wrapped
    (b"\x10\x01\x00\x00\x05" + DER + b"\xff\xff", DER),  # wrapped, bytes after the announced length
    (b"\x10\x01\x00", b"\x10\x01\x00"),  # too short to be wrapped (go-attestation needs more than 5 bytes)
    (b"\x10\x01\x01\x00\x05" + DER, b"\x10\x01\x01\x00\x05" + DER),  # another tag: left alone
])
def test_unwrap(stored, expected):
    assert ek_certificate_der(stored) == expected


def test_announced_length_longer_than_the_data_is_refused():
    with pytest.raises(ValueError, match="announces a 6-byte certificate in 5 bytes"):
        ek_certificate_der(b"\x10\x01\x00\x00\x06" + DER)
