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
_LAZY = {}  # import name -> the LazyModule standing for it, until require() or first use imports it


def optional_import(name, lazy=False):
    """Import ``name`` and return it, or return None and remember why not.

    ``lazy``: return a stand-in that imports on first use (or at ``require``), for a library that
    is slow to import and needed on one path only (the ``kubernetes`` client costs ~0.5 s of CPU:
    every SQLite registration and every start of the server would pay it for nothing).
    """
    if lazy:
        return _LAZY.setdefault(name, LazyModule(name))
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # OSError: a C library the binding needs is absent
        _FAILED[name.split(".")[0]] = traceback.format_exc()
        return None


class LazyModule(object):
    """A module imported at its first attribute access, or by ``require``."""

    def __init__(self, name):
        self.name = name
        self.module = None

    def load(self):
        """The module, or None (the failure is recorded for ``require``)."""
        if self.module is None:
            self.module = optional_import(self.name)
        return self.module

    def __getattr__(self, attribute):
        module = self.load()
        if module is None:
            top = self.name.split(".")[0]
            raise MissingDependencyError(REQUIREMENTS.get(top, top), "here", _FAILED.get(top))
        return getattr(module, attribute)


def require(name, reason):
    """Raise MissingDependencyError if ``name`` cannot be imported (a lazy import is tried now)."""
    top = name.split(".")[0]
    for lazy in list(_LAZY.values()):
        if lazy.name.split(".")[0] == top:
            lazy.load()
    if top in _FAILED:
        raise MissingDependencyError(REQUIREMENTS.get(top, top), reason, _FAILED[top])
