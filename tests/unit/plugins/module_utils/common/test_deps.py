# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Optional imports: eager and lazy, present and missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import deps
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import MissingDependencyError


def test_lazy_module_is_imported_at_first_use_or_require():
    lazy = deps.optional_import("json.decoder", lazy=True)
    assert isinstance(lazy, deps.LazyModule) and lazy.module is None
    assert lazy.JSONDecodeError.__name__ == "JSONDecodeError"
    assert lazy.module is not None
    deps.require("json", "to test")  # present: no error


def test_missing_lazy_module_fails_at_require_with_the_requirement():
    lazy = deps.optional_import("kcrypt_no_such_library.sub", lazy=True)
    with pytest.raises(MissingDependencyError, match="kcrypt_no_such_library is required to test"):
        deps.require("kcrypt_no_such_library", "to test")
    with pytest.raises(MissingDependencyError):
        lazy.anything


def test_the_embedded_store_does_not_import_the_kubernetes_client():
    """Opening a SQLite store (the module, the server, the admin commands) must not pay for the client."""
    code = ("import sys; from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store_factory, registration; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))))
    collections_root = os.path.join(root, ".collections")  # as scripts/setup.sh links the checkout
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=collections_root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
