# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's modules as Python objects, for unit tests of their entry points (tests/unit/plugins/modules)."""

from __future__ import annotations

import importlib
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES_DIR = os.path.join(ROOT, "plugins", "modules")
MODULES = sorted(name[:-3] for name in os.listdir(MODULES_DIR) if name.endswith(".py") and not name.startswith("_"))


def import_module(name):
    return importlib.import_module("ansible_collections.kairos.kcrypt.plugins.modules." + name)


class ModuleRun:
    """One run of a module's main(): ``rc`` (0 after exit_json, 1 after fail_json) and the printed ``result``."""

    def __init__(self, rc, stdout):
        self.rc = rc
        self.stdout = stdout
        self.result = json.loads(stdout)

    @property
    def failed(self):
        return bool(self.result.get("failed"))

    @property
    def msg(self):
        return self.result.get("msg", "")
