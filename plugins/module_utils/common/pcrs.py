# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PCR indexes: the one rule for what counts as one (ASCII decimal 0-23).

Private to the collection. Used for user input (``pcrs`` options and flags) and for
what a node sends (quote PCR maps, stored SealedVolume PCRs).
"""

from __future__ import annotations

import re

PCR_RANGE = range(0, 24)
# ASCII digits only: Python's int() also accepts "١" (Arabic-Indic one) and str.isdigit() "²".
_DECIMAL = re.compile(r"[0-9]+\Z")
MAX_TEXT = 8  # "00000007" is PCR 7 as Go's strconv reads it; longer text is refused before int()


def pcr_index(value):
    """The PCR index ``value`` (an int, or decimal text) names, or None if it names none (0-23)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in PCR_RANGE else None
    if not isinstance(value, str) or len(value) > MAX_TEXT or not _DECIMAL.match(value):
        return None
    index = int(value, 10)
    return index if index in PCR_RANGE else None


def is_decimal(text):
    """ASCII decimal digits only (the index may still be out of range)."""
    return isinstance(text, str) and bool(_DECIMAL.match(text))
