# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""ansible_common: the error funnel, secret hiding and argument-spec merging, with a real AnsibleModule."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.testing import patch_module_args

from ansible_collections.kairos.kcrypt.plugins.module_utils import ansible_common
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node.key_source import PassphraseKeySource


def finish(capsys, action):
    """Run ``action`` (which ends the module) and return (exit code, printed result)."""
    with pytest.raises(SystemExit) as ended:
        action()
    return ended.value.code, json.loads(capsys.readouterr().out)


@pytest.fixture
def module():
    with patch_module_args({"passphrase": "given-passphrase-000"}):
        yield AnsibleModule(argument_spec={"passphrase": {"type": "str", "no_log": True}})


def test_a_kcrypt_error_ends_the_task_with_its_text_and_the_progress_so_far(module, capsys):
    done = []

    def work():
        done.append({"device": "/dev/vdb1", "changed": True})
        raise KcryptError("the second partition is busy")

    rc, result = finish(capsys, lambda: ansible_common.run_or_fail(
        module, work, failure=lambda: {"changed": bool(done), "partitions": done}))
    assert (rc, result["failed"], result["msg"], result["changed"], result["partitions"]) == (
        1, True, "the second partition is busy", True, [{"device": "/dev/vdb1", "changed": True}])


def test_success_passes_the_result_through(module):
    assert ansible_common.run_or_fail(module, lambda a, b=0: a + b, 2, b=3) == 5


def test_a_bug_is_not_swallowed(module):
    with pytest.raises(ZeroDivisionError):
        ansible_common.run_or_fail(module, lambda: 1 / 0)


def test_hidden_secrets_never_reach_the_output_even_if_handed_out_later(module, capsys):
    source = PassphraseKeySource(b"first-secret-111")
    ansible_common.hide_secrets(module, source)
    source.handed_out(b"later-secret-222")  # e.g. a re-key's new key, made after hide_secrets
    rc, result = finish(capsys, lambda: module.exit_json(changed=False, note="first-secret-111 later-secret-222"))
    assert rc == 0 and "secret-111" not in result["note"] and "secret-222" not in result["note"]


def test_generate_argspec_copies_groups_and_refuses_a_double_definition():
    spec = ansible_common.generate_argspec(ansible_common.TPM_SPEC, pcrs={"type": "list"})
    spec["tpm_device"]["default"] = "changed"
    assert "default" not in ansible_common.TPM_SPEC["tpm_device"]
    with pytest.raises(ValueError, match="tpm_device is defined twice"):
        ansible_common.generate_argspec(ansible_common.TPM_SPEC, tpm_device={"type": "str"})
