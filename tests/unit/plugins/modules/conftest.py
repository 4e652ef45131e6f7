# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures for the modules' entry points: run a module's main() as Ansible would, read what it printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ansible.module_utils.testing import patch_module_args

from support.modules import MODULES, ModuleRun, import_module
from support.playbook import ROOT, ensure_collection_link


@pytest.fixture
def run_module(capsys):
    """``run_module(name, args, check_mode=False, no_log=False)`` runs the module's real main() with ``args``.

    Nothing is stubbed on the Ansible side: AnsibleModule parses the arguments, and exit_json /
    fail_json print the result (after no_log redaction) and exit, as on a managed host.
    """

    def run(name, args, check_mode=False, no_log=False):
        module = import_module(name)
        internal = {"_ansible_check_mode": check_mode, "_ansible_no_log": no_log}
        with patch_module_args(dict(args, **internal)):
            with pytest.raises(SystemExit) as ended:
                module.main()
        out = capsys.readouterr().out
        return ModuleRun(ended.value.code, out)

    return run


@pytest.fixture(scope="session")
def module_docs():
    """{module name: its documentation after the doc fragments are merged}, as ansible-doc shows it."""
    ensure_collection_link()
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"))
    command = [os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "--json", "-t", "module"]
    done = subprocess.run(command + ["kairos.kcrypt." + name for name in MODULES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return {name.rsplit(".", 1)[-1]: entry["doc"] for name, entry in json.loads(done.stdout).items()}
