# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules' main(): argument handling and the one error funnel (ansible_common.run_or_fail).

Each module runs for real under AnsibleModule (arguments parsed, result printed after no_log
redaction). The failures are real ones of our code (a bad option value, a missing device)
except "a library is missing", which is made by marking the library as failed to import,
exactly as common/deps.py records a failed import on a host without it.
"""

from __future__ import annotations

import pytest
from ansible.module_utils.basic import missing_required_lib

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import deps
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import MissingDependencyError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, rekey, unlock

HASH = "a" * 64
MISSING = "/nonexistent/kcrypt-test/disk1"

# (module, arguments, part of Ansible's own message about them)
BAD_ARGUMENTS = [
    ("kairos_tpm_hash", {"pcrs": ["seven"]}, "pcrs"),
    ("kairos_tpm_nv", {"operation": "erase"}, "value of operation must be one of: check, read, cleanup"),
    ("kairos_kms_discover", {}, "one of the following is required: host, challenger_server"),
    ("kairos_sealedvolume", {}, "missing required arguments: tpm_hash"),
    ("kairos_luks_encrypt", {"partitions": [{"label": "DATA"}]}, "missing required arguments: mode"),
    ("kairos_luks_encrypt", {"partitions": [{"device": "/dev/x", "uuid": "u"}], "mode": "format"}, "mutually exclusive: device|uuid"),
    ("kairos_luks_unlock", {}, "all is False but all of the following are missing: partitions"),
    ("kairos_luks_unlock", {"all": True, "partitions": [{"label": "DATA"}]}, "mutually exclusive: partitions|all"),
    ("kairos_luks_rekey", {"partitions": [{"label": "DATA"}], "key_source": "kms"},
     "key_source is kms but all of the following are missing: challenger_server"),
    ("kairos_challenger_tls", {"path": "/tmp/x"}, "missing required arguments: common_name, subject_alt_names"),
    ("kairos_k8s_objects", {"objects": [{}], "state": "gone"}, "value of state must be one of: present, absent"),
]

# (module, arguments, the KcryptError text our code gives): real failures, nothing stubbed
OUR_ERRORS = [
    ("kairos_tpm_hash", {"pcrs": [24]}, "pcrs: PCR 24 is out of range (0-23)"),
    ("kairos_tpm_nv", {"operation": "cleanup"}, "destroys the offline passphrase"),
    ("kairos_tpm_nv", {"nv_index": "0x81000000"}, "nv_index=0x81000000 is outside the allowed range"),
    ("kairos_kms_discover", {"host": "kms.local", "timeout": 0}, "timeout must be a positive number of seconds"),
    ("kairos_sealedvolume", {"tpm_hash": "not-a-hash"}, "tpm_hash"),
    ("kairos_sealedvolume", {"tpm_hash": HASH, "store_path": "relative/kms.db"}, "absolute"),
    ("kairos_luks_encrypt",
     {"partitions": [{"device": MISSING}], "mode": "in_place", "key_source": "passphrase", "passphrase": "long-test-passphrase"},
     MISSING),
    ("kairos_luks_encrypt", {"partitions": [{"label": "DATA"}], "mode": "format", "c_index": "0x1500000"},
     "c_index=0x1500000 is outside the allowed range"),
    ("kairos_luks_unlock", {"all": True, "state": "closed"}, "all=true is only for state=opened"),
    ("kairos_luks_unlock", {"all": True, "attempts": 0}, "attempts must be at least 1"),
    ("kairos_luks_rekey", {"partitions": [{"label": "DATA"}]}, "give rekey_id to name the round"),
    ("kairos_challenger_tls", {"path": MISSING, "common_name": "kms", "subject_alt_names": ["kms"]}, "must look like DNS:name or IP:address"),
    ("kairos_k8s_objects", {"objects": [{"kind": "Service"}]}, "object 0 is not a Kubernetes object"),
]

# (module, arguments, library made missing, patch: (object, attribute) that raises it instead, when no path reaches it here)
MISSING_LIBRARIES = [
    ("kairos_tpm_hash", {}, "tpm2_pytss", None),
    ("kairos_tpm_nv", {"operation": "check"}, "tpm2_pytss", None),
    ("kairos_kms_discover", {"host": "kms.local", "timeout": 1}, "zeroconf", None),
    ("kairos_sealedvolume", {"tpm_hash": HASH, "backend": "kubernetes"}, "kubernetes", None),
    ("kairos_luks_encrypt", {"partitions": [{"label": "DATA"}], "mode": "in_place"}, "tpm2_pytss", (encryption, "plan")),
    ("kairos_luks_unlock", {"all": True}, "tpm2_pytss", (unlock, "plan_open")),
    ("kairos_luks_rekey", {"partitions": [{"label": "DATA"}], "rekey_id": "r1"}, "tpm2_pytss", (rekey, "encrypted_devices")),
    ("kairos_challenger_tls", {"path": MISSING, "common_name": "kms", "subject_alt_names": ["DNS:kms"]}, "cryptography", None),
    ("kairos_k8s_objects", {"objects": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}]}, "kubernetes", None),
]


@pytest.mark.parametrize("name, args, expected", BAD_ARGUMENTS, ids=[c[0] + "-" + "-".join(c[1]) for c in BAD_ARGUMENTS])
def test_bad_arguments_fail_with_ansibles_message(run_module, name, args, expected):
    run = run_module(name, args)
    assert (run.rc, run.failed) == (1, True)
    assert expected in run.msg


@pytest.mark.parametrize("name, args, expected", OUR_ERRORS, ids=[c[0] + "-" + "-".join(c[1]) for c in OUR_ERRORS])
def test_our_errors_fail_with_their_text_and_no_traceback(run_module, name, args, expected):
    run = run_module(name, args)
    assert (run.rc, run.failed) == (1, True)
    assert expected in run.msg
    assert "Traceback" not in run.stdout and "exception" not in run.result


@pytest.mark.parametrize("name, args, library, patch", MISSING_LIBRARIES, ids=[c[0] for c in MISSING_LIBRARIES])
def test_a_missing_library_fails_with_missing_required_lib(run_module, monkeypatch, name, args, library, patch):
    monkeypatch.setitem(deps._FAILED, library, "Traceback (most recent call last):\nModuleNotFoundError: No module named %r\n" % library)
    if patch is not None:
        def needs_library(*_args, **_kwargs):
            deps.require(library, "for this test")
        monkeypatch.setattr(patch[0], patch[1], needs_library)
    run = run_module(name, args)
    assert (run.rc, run.failed) == (1, True)
    assert run.msg == missing_required_lib(deps.REQUIREMENTS[library])


def test_a_failed_run_keeps_passphrases_out_of_the_result(run_module):
    run = run_module("kairos_luks_rekey", {
        "partitions": [{"device": MISSING}], "key_source": "passphrase",
        "passphrase": "old-secret-1234", "new_passphrase": "new-secret-5678",
    })
    assert run.failed and MISSING in run.msg
    assert "secret-1234" not in run.stdout and "secret-5678" not in run.stdout
    assert run.result["invocation"]["module_args"]["passphrase"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"


def test_check_mode_of_a_read_only_module_reports_no_change(run_module, monkeypatch):
    """The funnel passes a successful result through unchanged (kairos_sealedvolume, state=absent, no store)."""
    run = run_module("kairos_sealedvolume", {"tpm_hash": HASH, "state": "absent", "store_path": MISSING + ".db"}, check_mode=True)
    assert (run.rc, run.result["changed"], run.result["sealedvolume"], run.result["secrets"]) == (0, False, {}, [])


def test_missing_dependency_error_names_the_pip_requirement():
    error = MissingDependencyError(deps.REQUIREMENTS["tpm2_pytss"], "to talk to the TPM")
    assert missing_required_lib(error.library).startswith("Failed to import the required Python library (tpm2-pytss >= 2.1)")


def test_challenger_tls_reports_check_mode_then_makes_the_files_once(run_module, tmp_path):
    args = {"path": str(tmp_path / "tls"), "common_name": "kms", "subject_alt_names": ["DNS:kms", "IP:127.0.0.1"]}
    checked = run_module("kairos_challenger_tls", args, check_mode=True)
    assert (checked.rc, checked.result["changed"]) == (0, True) and not (tmp_path / "tls").exists()
    made = run_module("kairos_challenger_tls", args)
    assert (made.rc, made.result["changed"], made.result["certificate"]) == (0, True, str(tmp_path / "tls" / "server.crt"))
    assert made.result["ca_certificate"] == (tmp_path / "tls" / "ca.crt").read_text()
    assert "PRIVATE KEY" not in made.stdout
    again = run_module("kairos_challenger_tls", args)
    assert (again.rc, again.result["changed"], again.result["reasons"]) == (0, False, [])
