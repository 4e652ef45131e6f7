# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validation of user-supplied TPM handles, NV indices, PCR lists and device strings (no TPM needed)."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, TPMError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import (
    parse_handle,
    parse_nv_index,
    parse_pcr_list,
    parse_persistent_handle,
    resolve_tcti,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0x1500000", 0x1500000),  # upstream default, written without the leading zero
        ("0x01500000", 0x1500000),
        ("22020096", 0x1500000),  # decimal, as strconv.ParseUint(s, 0, 32) accepts
        ("0124000000", 0o124000000),  # leading zero = octal, like Go
        ("0o124000000", 0o124000000),
        (0x1500000, 0x1500000),
        (" 0x1500000 ", 0x1500000),
    ],
)
def test_handle_formats_like_go(value, expected):
    assert parse_handle(value, "nv_index") == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("0xZZ", "nv_index='0xZZ' is not a valid TPM handle"),
        ("", "is not a valid TPM handle"),
        ("0x100000000", "does not fit in 32 bits"),
        ("-1", "does not fit in 32 bits"),
        (True, "not a boolean"),
        ("08", "is not a valid TPM handle"),  # 8 is not an octal digit
    ],
)
def test_malformed_handles(value, message):
    with pytest.raises(KcryptError, match=message):
        parse_handle(value, "nv_index")


def test_ranges():
    assert parse_nv_index("0x1500000") == 0x01500000
    assert parse_persistent_handle("0x81000008") == 0x81000008
    with pytest.raises(KcryptError, match="c_index=0x1500000 is outside the allowed range 0x81000000-0x81ffffff"):
        parse_persistent_handle("0x1500000")
    with pytest.raises(KcryptError, match="nv_index=0x81000008 is outside the allowed range"):
        parse_nv_index("0x81000008")


def test_pcr_lists():
    assert parse_pcr_list([11, 0, 7, 7]) == [0, 7, 11]
    assert parse_pcr_list("0,7,11") == [0, 7, 11]
    assert parse_pcr_list([]) == []
    with pytest.raises(KcryptError, match="PCR 24 is out of range"):
        parse_pcr_list([24])
    with pytest.raises(KcryptError, match="'x' is not a PCR index"):
        parse_pcr_list("0,x")


def test_tcti_strings(monkeypatch):
    monkeypatch.delenv("KCRYPT_TPM_DEVICE", raising=False)
    assert resolve_tcti("swtpm:host=127.0.0.1,port=2321") == "swtpm:host=127.0.0.1,port=2321"
    assert resolve_tcti("device:/dev/tpm0") == "device:/dev/tpm0"
    monkeypatch.setenv("KCRYPT_TPM_DEVICE", "mssim:port=2321")
    assert resolve_tcti("") == "mssim:port=2321"
    assert resolve_tcti("swtpm:port=1") == "swtpm:port=1"  # the option wins over the environment
    with pytest.raises(TPMError, match="neither a device path nor a TCTI string"):
        resolve_tcti("tpm0")
