# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Optional third-party imports, recorded instead of raised.

Private to the collection. Modules import module_utils on the target host,
where a library may be missing; the import must not fail there, so each
module can report ``missing_required_lib`` with the traceback instead.
"""

from __future__ import annotations

import importlib
import traceback

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import MissingDependencyError

# The pip requirement to name in messages, by import name.
REQUIREMENTS = {
    "tpm2_pytss": "tpm2-pytss >= 2.1",
    "cryptography": "cryptography >= 41",
    "aiohttp": "aiohttp >= 3.9",
    "websocket": "websocket-client >= 1.6",
    "zeroconf": "zeroconf >= 0.131",
    "kubernetes": "kubernetes >= 28",
    "yaml": "PyYAML >= 6",
}

_FAILED = {}


def optional_import(name):
    """Import ``name`` and return it, or return None and remember why not."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # OSError: a C library the binding needs is absent
        _FAILED[name.split(".")[0]] = traceback.format_exc()
        return None


def require(name, reason):
    """Raise MissingDependencyError if ``name`` could not be imported earlier."""
    top = name.split(".")[0]
    if top in _FAILED:
        raise MissingDependencyError(REQUIREMENTS.get(top, top), reason, _FAILED[top])
