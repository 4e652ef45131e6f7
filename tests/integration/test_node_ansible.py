# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node modules through real ansible-playbook runs (check / real / idempotent / idempotent check)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev
from support.loopdisk import make_ext4, opens_with, unique_label
from support.node_fixtures import loop_disks  # noqa: F401  # pylint: disable=unused-import

pytestmark = pytest.mark.slow(minutes=2)
PLAYBOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playbooks")


def ensure_collection_link(repo_root):
    """What scripts/setup.sh does: make the checkout visible as ansible_collections/kairos/kcrypt."""
    link = os.path.join(repo_root, ".collections", "ansible_collections", "kairos", "kcrypt")
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink("../../..", link)


def run_playbook(repo_root, env, playbook, extra_vars, tmp_path):
    ensure_collection_link(repo_root)
    variables = dict(extra_vars, ansible_python_interpreter=sys.executable)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(variables))
    command = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", "localhost,", "-c", "local",
               "-v", "-e", "@%s" % vars_file, os.path.join(PLAYBOOKS, playbook)]
    return subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, check=False)


def test_offline_playbook(swtpm, loop_disks, repo_root, subprocess_env, tmp_path):
    disk = loop_disks([("persistent", 48), ("spare", 36)])
    label, spare_label = unique_label(), unique_label()
    make_ext4(disk.partitions[0], label)
    make_ext4(disk.partitions[1], spare_label)
    result = run_playbook(repo_root, subprocess_env, "node_offline.yml", {
        "tpm_device": swtpm.tcti,
        "label": label,
        "device": disk.partitions[0],
        "spare_label": spare_label,
        "device_mapper": blockdev._misc_has_device_mapper(),
        "secrets_dir": str(tmp_path),
    }, tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "failed=0" in result.stdout

    # the partition stays encrypted; the spare one (refused format) is untouched
    assert blockdev.probe(disk.partitions[0]).fstype == "crypto_LUKS"
    assert blockdev.probe(disk.partitions[1]).fstype == "ext4"
    # the secrets the no_log tasks saw never reach the (verbose) output
    secrets = {name: (tmp_path / name).read_text() for name in ("nv_passphrase", "recovery_key")}
    assert len(secrets["nv_passphrase"]) == 32 and len(secrets["recovery_key"]) == 71
    for value in secrets.values():
        assert value not in result.stdout and value not in result.stderr
    assert opens_with(disk.partitions[0], secrets["recovery_key"].encode())


def test_passphrase_never_in_output(loop_disks, repo_root, subprocess_env, tmp_path):
    """An explicit passphrase is no_log; the module's results and diff never carry it."""
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    secret = "Sup3r-Secret-Passphrase-%s" % label
    playbook = tmp_path / "passphrase.yml"
    playbook.write_text("""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Encrypt with a passphrase (check, real, idempotent)
      kairos.kcrypt.kairos_luks_encrypt:
        partitions: [{label: "%(label)s"}]
        mode: in_place
        key_source: passphrase
        passphrase: "%(secret)s"
        pbkdf: {algorithm: pbkdf2, iteration_count: 1000}
      diff: true
      check_mode: "{{ item == 'check' }}"
      loop: [check, real, again]
      register: runs
    - ansible.builtin.assert:
        that:
          - runs.results[0] is changed
          - runs.results[1] is changed
          - runs.results[2] is not changed
""" % {"label": label, "secret": secret})
    ensure_collection_link(repo_root)
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", "localhost,", "-c", "local", "-vvv",
         "-e", "ansible_python_interpreter=%s" % sys.executable, str(playbook)],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    assert secret not in result.stdout and secret not in result.stderr
    assert opens_with(disk.partitions[0], secret.encode())


def run_module(repo_root, env, module, args, tmp_path, check=False):
    """One ad hoc module run; returns (rc, result dict) read back from ansible's tree callback."""
    ensure_collection_link(repo_root)
    tree = tmp_path / ("tree-%d" % len(list(tmp_path.glob("tree-*"))))
    command = [os.path.join(os.path.dirname(sys.executable), "ansible"), "localhost", "-i", "localhost,", "-c", "local",
               "-e", "ansible_python_interpreter=%s" % sys.executable, "-m", "kairos.kcrypt.%s" % module,
               "-a", json.dumps(args), "--tree", str(tree), "--diff"] + (["--check"] if check else [])
    completed = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, check=False)
    result_file = tree / "localhost"
    assert result_file.exists(), completed.stdout + completed.stderr
    return completed.returncode, json.loads(result_file.read_text())


def test_kms_four_steps_and_quarantine(swtpm_factory, loop_disks, repo_root, subprocess_env, tmp_path):
    from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server, store_factory as store
    from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
    from support.challenger import ChallengerThread

    node = swtpm_factory(ek_cert=True)
    disk = loop_disks([("persistent", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    kms_store = store.open_store("sqlite://%s/kms.db" % tmp_path)
    try:
        with ChallengerThread(server.Challenger(policy.Policy(kms_store), ready_check=kms_store.ping)) as kms:
            args = {"partitions": [{"label": label}], "mode": "in_place", "key_source": "kms", "challenger_server": kms.url,
                    "tpm_device": node.tcti, "kms_attempts": 2, "kms_retry_delay": 0.1,
                    "pbkdf": {"algorithm": "pbkdf2", "iteration_count": 1000}}
            # verify: after encrypting, the module attests again and tests the new key (the role's last step)
            steps = [run_module(repo_root, subprocess_env, "kairos_luks_encrypt", dict(args, verify=True), tmp_path, check=check)
                     for check in (True, False, False, True)]
            assert [rc for rc, result in steps] == [0, 0, 0, 0], steps
            assert [r["changed"] for rc, r in steps] == [True, True, False, False]
            assert [r["partitions"][0]["action"] for rc, r in steps] == ["in_place", "in_place", "none", "none"]
            assert [r["verified"] for rc, r in steps] == [False, True, False, False]
            # attestations: the encryption's, the verification's, then one per run that tests the key
            # (the first dry run asks for nothing: the partition was not encrypted yet)
            assert successful_attestations(kms.url) == 4
            (volume,) = kms_store.list_volumes()
            # the dry run already tells the TPM hash to register, and it is the one the KMS enrolled
            with TPM(node.tcti) as tpm:
                expected_hash = tpm.endorsement_key().tpm_hash
            assert [r["tpm_hash"] for rc, r in steps] == [expected_hash] * 4
            assert volume["spec"]["TPMHash"] == expected_hash
            entry = volume["spec"]["partitions"][0]
            passphrase = kms_store.get_secret(entry["secret"]["name"])["data"][entry["secret"]["path"]]
            assert opens_with(disk.partitions[0], passphrase)
            assert all(passphrase.decode() not in json.dumps(r) for rc, r in steps)

            volume["spec"]["quarantined"] = True
            kms_store.update_volume(volume)
            header = luks_header_bytes(disk.partitions[0])
            rc, refused = run_module(repo_root, subprocess_env, "kairos_luks_encrypt", dict(args, kms_attempts=30), tmp_path)
            assert rc != 0, refused
            assert refused["msg"].startswith("attestation failed: Attestation verification failed: ")
            assert "TPM is quarantined" in refused["msg"]
            assert luks_header_bytes(disk.partitions[0]) == header
            with TPM(node.tcti):
                pass  # the TPM is still usable: nothing was left loaded
    finally:
        kms_store.close()
        node.stop()


def successful_attestations(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(re.search(r'kcrypt_attestations_total\{protocol="attestation",outcome="success"\} (\d+)', text).group(1))


def luks_header_bytes(device):
    with open(device, "rb") as handle:
        return handle.read(16 * 1024 * 1024)
