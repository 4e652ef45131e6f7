# -*- coding: utf-8 -*-
"""The one rule for PCR indexes (common/pcrs.py)."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.pcrs import is_decimal, pcr_index


@pytest.mark.parametrize("value, index", [
    ("0", 0), ("7", 7), ("23", 23), ("007", 7), (11, 11),
    ("24", None), (24, None), (-1, None), ("-1", None), ("", None), (" 7", None), ("7 ", None),
    ("\u0661", None),  # Arabic-Indic one: int() would take it
    ("\u00b2", None),  # superscript two: str.isdigit() is True, int() raises
    ("1" * 9, None), (True, None), (None, None), (7.0, None),
])
def test_pcr_index(value, index):
    assert pcr_index(value) == index


def test_is_decimal_is_ascii_only():
    assert is_decimal("99") and not is_decimal("\u0661") and not is_decimal("x") and not is_decimal(3)
