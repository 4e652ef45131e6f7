# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every module's argument spec against its documentation (with the doc fragments merged, as ansible-doc shows it).

validate-modules checks part of this in sanity; here it is explicit and runs with the unit tests,
so a shared option group (module_utils/ansible_common.py) and its doc fragment cannot drift apart.
"""

from __future__ import annotations

import re

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils import ansible_common

from support.modules import MODULES, import_module

# A string option holding one of these is a secret: Ansible must never log or return it.
SECRET_NAME = re.compile(r"passphrase|password|private_key|token", re.I)

# Option groups and the doc fragment that documents each (docs/developing.md).
GROUPS = {
    "kairos.kcrypt.tpm": ansible_common.TPM_SPEC,
    "kairos.kcrypt.offline_key": ansible_common.OFFLINE_KEY_SPEC,
    "kairos.kcrypt.key_source": ansible_common.KEY_SOURCE_SPEC,
    "kairos.kcrypt.partitions": ansible_common.PARTITIONS_SPEC,
    "kairos.kcrypt.recovery_escrow": ansible_common.RECOVERY_ESCROW_SPEC,
}


class _Built(Exception):
    pass


def module_arguments(name, monkeypatch):
    """The keyword arguments the module's main() gives AnsibleModule (argument_spec, required_if, ...)."""
    module = import_module(name)
    seen = {}

    def fake_module(**kwargs):
        seen.update(kwargs)
        raise _Built()

    monkeypatch.setattr(module, "AnsibleModule", fake_module)
    with pytest.raises(_Built):
        module.main()
    return seen


def differences(spec, documented, where=""):
    """What differs between an argument spec and documented options, one line per finding."""
    found = []
    for name in sorted(set(spec) | set(documented)):
        path = where + name
        if name not in documented:
            found.append("%s: in the argument spec but not documented" % path)
            continue
        if name not in spec:
            found.append("%s: documented but not in the argument spec" % path)
            continue
        option, doc = spec[name], documented[name]
        for key, fallback in (("type", "str"), ("default", None), ("required", False), ("elements", None)):
            if option.get(key, fallback) != doc.get(key, fallback):
                found.append("%s: %s is %r in the spec, %r in the docs" % (path, key, option.get(key, fallback), doc.get(key, fallback)))
        if list(option.get("choices") or []) != list(doc.get("choices") or []):
            found.append("%s: choices are %r in the spec, %r in the docs" % (path, option.get("choices"), doc.get("choices")))
        if sorted(option.get("aliases") or []) != sorted(doc.get("aliases") or []):
            found.append("%s: aliases differ" % path)
        found += differences(option.get("options") or {}, doc.get("suboptions") or {}, path + ".")
    return found


def secret_problems(spec, where=""):
    """Secrets that could reach a log: a secret-named string option without no_log, or no_log on a non-string."""
    found = []
    for name, option in sorted(spec.items()):
        path = where + name
        is_text = option.get("type", "str") == "str" and not option.get("choices")
        if SECRET_NAME.search(name) and is_text and option.get("no_log") is not True:
            found.append("%s: holds a secret but has no no_log=True" % path)
        if option.get("no_log") is True and option.get("type", "str") != "str":
            found.append("%s: no_log=True on a %s option: Ansible can only hide strings reliably" % (path, option.get("type")))
        found += secret_problems(option.get("options") or {}, path + ".")
    return found


def test_every_module_is_checked():
    assert len(MODULES) >= 7 and "kairos_luks_encrypt" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_argument_spec_matches_documentation(name, module_docs, monkeypatch):
    spec = module_arguments(name, monkeypatch)["argument_spec"]
    assert differences(spec, module_docs[name]["options"]) == []


@pytest.mark.parametrize("name", MODULES)
def test_secrets_are_no_log(name, monkeypatch):
    assert secret_problems(module_arguments(name, monkeypatch)["argument_spec"]) == []


@pytest.mark.parametrize("name", MODULES)
def test_a_module_extending_a_group_fragment_takes_that_group_unchanged(name, monkeypatch):
    """A fragment documents its group's spec: a module that extends it takes every option of it, as defined there."""
    spec = module_arguments(name, monkeypatch)["argument_spec"]
    fragments = yaml.safe_load(import_module(name).DOCUMENTATION).get("extends_documentation_fragment", [])
    for fragment, group in GROUPS.items():
        if fragment in fragments:
            assert {option: spec.get(option) for option in group} == group, "%s changes %s" % (name, fragment)


@pytest.mark.parametrize("name", MODULES)
def test_attributes_come_from_the_fragment(name, module_docs):
    """Each module states its support; the descriptions are the kairos.kcrypt.attributes fragment's."""
    own = yaml.safe_load(import_module(name).DOCUMENTATION)
    assert "kairos.kcrypt.attributes" in own["extends_documentation_fragment"]
    assert [key for key, value in own["attributes"].items() if "description" in value] == [], "descriptions written inline"
    merged = module_docs[name]["attributes"]
    assert set(merged) == {"check_mode", "diff_mode", "idempotent"}
    assert all(value.get("support") and value.get("description") for value in merged.values())


def test_differences_finds_what_drifted():
    """The comparison itself: each kind of drift is reported."""
    spec = {"a": {"type": "int", "default": 3}, "b": {"type": "list", "elements": "str", "options": {"c": {"choices": ["x"]}}}, "d": {}}
    docs = {"a": {"type": "int", "default": 4}, "b": {"type": "list", "elements": "int", "suboptions": {"c": {"choices": ["y"]}}}, "e": {}}
    found = "\n".join(differences(spec, docs))
    for expected in ("a: default is 3", "b: elements is 'str'", "b.c: choices", "d: in the argument spec but not documented",
                     "e: documented but not in the argument spec"):
        assert expected in found


def test_secret_problems_finds_a_logged_passphrase():
    assert secret_problems({"x": {"options": {"new_passphrase": {"type": "str"}}}}) == ["x.new_passphrase: holds a secret but has no no_log=True"]
    assert secret_problems({"passphrase": {"type": "str", "no_log": True}, "update_passphrase": {"choices": ["a"]}}) == []


def test_the_key_source_choices_are_the_ones_the_code_knows():
    """ansible_common imports only common/, so the choices are written there again: keep them equal."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.client.kms_client import CLIENT_PROTOCOLS
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node.key_source import KEY_SOURCES

    assert tuple(ansible_common.KEY_SOURCE_SPEC["key_source"]["choices"]) == KEY_SOURCES
    assert tuple(ansible_common.KEY_SOURCE_SPEC["kms_protocol"]["choices"]) == CLIENT_PROTOCOLS
