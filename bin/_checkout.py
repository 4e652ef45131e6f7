# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Lets the CLIs in bin/ run from a git checkout as well as from an installed collection.

The collection's Python code imports itself as ``ansible_collections.kairos.kcrypt``.
An installed collection (ansible-galaxy, or the challenger role's virtualenv) already
provides that package; a checkout does not, so map the package name onto it.
"""

import importlib.util
import os
import sys
import types

CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def setup():
    if "ansible_collections.kairos.kcrypt" in sys.modules:
        return
    if not os.path.isfile(os.path.join(CHECKOUT, "galaxy.yml")):
        # bin/ of an installed collection: ../../.. is the collections root
        root = os.path.dirname(os.path.dirname(os.path.dirname(CHECKOUT)))
        if root not in sys.path:
            sys.path.insert(0, root)
        return
    try:
        spec = importlib.util.find_spec("ansible_collections")
    except (ImportError, ValueError):
        spec = None
    parent = sys.modules.get("ansible_collections")
    if parent is None:
        parent = types.ModuleType("ansible_collections")
        parent.__path__ = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
        sys.modules["ansible_collections"] = parent
    kairos = types.ModuleType("ansible_collections.kairos")
    kairos.__path__ = []
    kcrypt = types.ModuleType("ansible_collections.kairos.kcrypt")
    kcrypt.__path__ = [CHECKOUT]
    sys.modules["ansible_collections.kairos"] = kairos
    sys.modules["ansible_collections.kairos.kcrypt"] = kcrypt
    parent.kairos = kairos
    kairos.kcrypt = kcrypt
