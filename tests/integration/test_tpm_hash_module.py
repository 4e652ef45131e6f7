# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kairos_tpm_hash through real ansible / ansible-playbook, the node CLI, and the built collection tarball."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM

VENV_BIN = os.path.dirname(sys.executable)


def ansible(repo_root, env, *args, cwd=None):
    env = dict(env)
    env["ANSIBLE_STDOUT_CALLBACK"] = "kcrypt_test_json"
    env["ANSIBLE_CALLBACK_PLUGINS"] = os.path.join(repo_root, "tests", "support", "callback_plugins")
    env["ANSIBLE_LOAD_CALLBACK_PLUGINS"] = "1"
    return subprocess.run(
        [os.path.join(VENV_BIN, args[0])] + list(args[1:]),
        cwd=cwd or repo_root, env=env, capture_output=True, text=True, check=False,
    )


def adhoc_result(proc):
    """The module result of a single-host ad hoc run with the json callback."""
    data = json.loads(proc.stdout)
    return data["plays"][0]["tasks"][0]["hosts"]["localhost"]


def expected_hash(swtpm):
    with TPM(swtpm.tcti) as tpm:
        return tpm.endorsement_key().tpm_hash


@pytest.mark.parametrize("module", ["kairos.kcrypt.kairos_tpm_hash", "kairos_tpm_hash"], ids=["fqcn", "short"])
def test_adhoc(repo_root, subprocess_env, swtpm, module):
    proc = ansible(repo_root, subprocess_env, "ansible", "localhost", "-m", module, "-a", "tpm_device=%s pcrs=0,7,11" % swtpm.tcti)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = adhoc_result(proc)
    assert result["changed"] is False
    assert result["tpm_hash"] == expected_hash(swtpm)
    assert result["ek_certificate_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert sorted(result["pcr_values"]) == ["0", "11", "7"]
    assert all(len(v) == 64 for v in result["pcr_values"].values())


def test_adhoc_without_ek_certificate(repo_root, subprocess_env, swtpm_plain):
    proc = ansible(repo_root, subprocess_env, "ansible", "localhost", "-m", "kairos_tpm_hash", "-a", "tpm_device=%s" % swtpm_plain.tcti)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = adhoc_result(proc)
    assert result["ek_certificate_pem"] is None
    assert result["tpm_hash"] == expected_hash(swtpm_plain)
    assert result["pcr_values"] == {}


def test_environment_variable_ad_hoc(repo_root, subprocess_env, swtpm):
    env = dict(subprocess_env, KCRYPT_TPM_DEVICE=swtpm.tcti)
    proc = ansible(repo_root, env, "ansible", "localhost", "-m", "kairos_tpm_hash")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert adhoc_result(proc)["tpm_hash"] == expected_hash(swtpm)


def test_playbook_check_mode(repo_root, subprocess_env, swtpm, tmp_path):
    playbook = tmp_path / "read.yml"
    playbook.write_text(
        """
- name: Read TPM identity
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Read the TPM hash
      kairos.kcrypt.kairos_tpm_hash:
        tpm_device: "%s"
        pcrs: [7]
      register: tpm
    - name: Check it
      ansible.builtin.assert:
        that:
          - tpm is not changed
          - tpm.tpm_hash | length == 64
          - tpm.pcr_values['7'] | length == 64
"""
        % swtpm.tcti
    )
    for extra in ([], ["--check"]):
        proc = ansible(repo_root, subprocess_env, "ansible-playbook", str(playbook), *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        stats = json.loads(proc.stdout)["stats"]["localhost"]
        assert stats["failures"] == 0 and stats["changed"] == 0 and stats["ok"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        ("tpm_device=swtpm:host=127.0.0.1,port=1", "cannot open the TPM at swtpm:host=127.0.0.1,port=1"),
        ("tpm_device=/dev/no-such-tpm", "no TPM at /dev/no-such-tpm; set tpm_device"),
        ("tpm_device=tpm0x99", "neither a device path nor a TCTI string"),
        ("pcrs=24", "PCR 24 is out of range"),
        ("pcrs=seven", "cannot be converted to an int"),
        ("bogus=1", "Unsupported parameters"),
    ],
)
def test_bad_input(repo_root, subprocess_env, args, message):
    proc = ansible(repo_root, subprocess_env, "ansible", "localhost", "-m", "kairos_tpm_hash", "-a", args)
    assert proc.returncode != 0
    result = adhoc_result(proc)
    assert result["failed"] is True
    assert message in result["msg"]
    # ansible-core >= 2.19 adds "(traceback unavailable)" when the module raised nothing
    assert result.get("exception", "(traceback unavailable)") == "(traceback unavailable)"
    assert "Traceback (most recent call last)" not in proc.stdout + proc.stderr


def test_missing_library_reported(repo_root, subprocess_env, tmp_path):
    """A Python without tpm2-pytss gets missing_required_lib, not a traceback."""
    proc = ansible(
        repo_root, subprocess_env, "ansible", "localhost", "-m", "kairos_tpm_hash",
        "-e", "ansible_python_interpreter=/usr/bin/python3",
    )
    if subprocess.run(["/usr/bin/python3", "-c", "import tpm2_pytss"], capture_output=True, check=False).returncode == 0:
        pytest.skip("the system Python has tpm2-pytss")
    result = adhoc_result(proc)
    assert result["failed"] is True
    assert "Failed to import the required Python library (tpm2-pytss" in result["msg"]


def test_cli_root_prints_hash_without_newline(repo_root, subprocess_env, swtpm):
    cli = os.path.join(repo_root, "bin", "kcrypt-discovery-challenger")
    proc = subprocess.run([sys.executable, cli, "--tpm-device", swtpm.tcti], env=subprocess_env, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_hash(swtpm).encode()
    assert proc.stderr == b""


def test_cli_root_error(repo_root, subprocess_env):
    cli = os.path.join(repo_root, "bin", "kcrypt-discovery-challenger")
    proc = subprocess.run([sys.executable, cli, "--tpm-device", "/dev/no-such-tpm"], env=subprocess_env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: no TPM at /dev/no-such-tpm")
    assert "Traceback" not in proc.stderr


def test_built_tarball_installs_and_runs(repo_root, subprocess_env, swtpm, tmp_path):
    """ansible-galaxy collection build + install, then the module from the installed copy."""
    build = subprocess.run(
        [os.path.join(VENV_BIN, "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path), repo_root],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    tarball = next(tmp_path.glob("kairos-kcrypt-*.tar.gz"))
    install_dir = tmp_path / "collections"
    install = subprocess.run(
        [os.path.join(VENV_BIN, "ansible-galaxy"), "collection", "install", "-p", str(install_dir), str(tarball)],
        capture_output=True, text=True, check=False, cwd=str(tmp_path),  # away from the checkout's ansible.cfg
    )
    assert install.returncode == 0, install.stdout + install.stderr
    installed = install_dir / "ansible_collections" / "kairos" / "kcrypt"
    assert (installed / "plugins" / "modules" / "kairos_tpm_hash.py").is_file()
    assert not (installed / ".venv").exists() and not (installed / "tests" / "output").exists()
    env = dict(subprocess_env)
    env.pop("ANSIBLE_CONFIG")
    env["ANSIBLE_COLLECTIONS_PATH"] = str(install_dir)
    proc = ansible(repo_root, env, "ansible", "localhost", "-m", "kairos.kcrypt.kairos_tpm_hash", "-a", "tpm_device=%s" % swtpm.tcti, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert adhoc_result(proc)["tpm_hash"] == expected_hash(swtpm)
    doc = subprocess.run(
        [os.path.join(VENV_BIN, "ansible-doc"), "kairos.kcrypt.kairos_tpm_hash"], env=env, capture_output=True, text=True, cwd=str(tmp_path), check=False
    )
    assert doc.returncode == 0 and "tpm_hash" in doc.stdout and "tpm_device" in doc.stdout, doc.stderr
