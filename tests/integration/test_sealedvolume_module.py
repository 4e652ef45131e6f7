# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kairos.kcrypt.kairos_sealedvolume through real ansible-playbook runs, against every store backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy

pytestmark = pytest.mark.slow(minutes=3)
PLAYBOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playbooks")
PASSPHRASE = "module-static-Passphrase-42"


def ensure_collection_link(repo_root):
    """What scripts/setup.sh does: make the checkout visible as ansible_collections/kairos/kcrypt."""
    link = os.path.join(repo_root, ".collections", "ansible_collections", "kairos", "kcrypt")
    if not os.path.lexists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink("../../..", link)


def run_playbook(repo_root, env, playbook, variables, tmp_path):
    ensure_collection_link(repo_root)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(dict(variables, ansible_python_interpreter=sys.executable)))
    command = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", "localhost,", "-c", "local",
               "-v", "--diff", "-e", "@%s" % vars_file, os.path.join(PLAYBOOKS, playbook)]
    return subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, check=False, timeout=300)


def store_args(store_target):
    if store_target.kind == "sqlite":
        return {"backend": "embedded", "store_path": store_target.path}
    return {"backend": "kubernetes", "kubeconfig": store_target.kubeconfig, "namespace": store_target.namespace}


def test_module_end_to_end(store_target, repo_root, subprocess_env, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    tpm_hash, ek_pem = identity.tpm_hash(key), identity.public_key_pem(key)
    result = run_playbook(repo_root, subprocess_env, "sealedvolume.yml", {
        "store_args": store_args(store_target), "tpm_hash": tpm_hash, "other_hash": "e" * 64,
        "ek_pem": ek_pem, "passphrase": PASSPHRASE,
    }, tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert "failed=0" in result.stdout and "ignored=2" in result.stdout
    assert PASSPHRASE not in result.stdout + result.stderr  # -v --diff output never shows it

    with store_target.open() as store:
        volume = store.get_volume("node-final")
        assert volume["spec"] == {"TPMHash": tpm_hash, "partitions": [{"label": "COS_PERSISTENT", "deviceName": "vda5"}]}
        assert store.get_volume("node-1") is None
        assert store.find_volume("e" * 64) is None
        # the first run's Secret outlived the removal of node-1; node-final has its own
        assert store.get_secret("node-1-cos-persistent")["data"]["passphrase"] == PASSPHRASE.encode()
        policy = Policy(store)
        assert policy.issue_passphrase(tpm_hash, ek_pem, {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) == PASSPHRASE.encode()
        assert len(policy.issue_passphrase(tpm_hash, ek_pem, {"0": "aa"}, PartitionRef(label="COS_OEM"))) == 44  # TOFU


FLEET = 40


def test_parallel_registrations_all_land_once(store_target, repo_root, subprocess_env, tmp_path):
    """40 kairos_sealedvolume runs at once (one Ansible fork each, real processes) on one store.

    Pairs of hosts register the same TPM at the same moment (the same node listed twice): each
    pair must end up as one SealedVolume. Every other registration is present with its own passphrase,
    none is lost, none duplicated; a second run changes nothing.
    """
    ensure_collection_link(repo_root)
    hosts = {}
    for number in range(FLEET):
        tpm_hash = os.urandom(32).hex()
        hosts["node%02d" % number] = {"tpm_hash": tpm_hash, "passphrase": "fleet-%s" % tpm_hash[:24]}
        if number % 10 == 0:  # a twin right after it in the inventory starts at the same moment
            hosts["node%02d-twin" % number] = dict(hosts["node%02d" % number])
    inventory = tmp_path / "fleet.json"
    inventory.write_text(json.dumps({"fleet": {"hosts": hosts, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "store_args": store_args(store_target)}}}))
    command = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", str(inventory),
               "--forks", str(len(hosts)), os.path.join(PLAYBOOKS, "register_fleet.yml")]

    def run():
        return subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, check=False, timeout=600)

    first = run()
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    assert "failed=0" in first.stdout
    with store_target.open() as store:
        volumes = store.list_volumes()
        by_hash = {}
        for volume in volumes:
            by_hash.setdefault(volume["spec"]["TPMHash"], []).append(volume)
        assert sorted(by_hash) == sorted({h["tpm_hash"] for h in hosts.values()})  # none lost
        assert all(len(found) == 1 for found in by_hash.values()), [n for n in by_hash.values() if len(n) > 1]
        policy = Policy(store)
        for host in hosts.values():
            (volume,) = by_hash[host["tpm_hash"]]
            assert [p["label"] for p in volume["spec"]["partitions"]] == ["COS_PERSISTENT", "COS_OEM"]
            served = policy.legacy_get_pass(host["tpm_hash"], PartitionRef(label="COS_PERSISTENT"))
            assert served["passphrase"] == host["passphrase"]
    second = run()
    assert second.returncode == 0 and "changed=1" not in second.stdout, second.stdout[-6000:]


def test_pcr_upgrade_windows(store_target, repo_root, subprocess_env, tmp_path):
    """relearn_until/relearn_to: opened, idempotent with a duration, moved in check mode (not written), refused in
    the past, closed by learn; pcr_windows reports them; on every backend."""
    tpm_hash, pcr7, pcr7_new = "d" * 64, "a" * 64, "b" * 64
    result = run_playbook(repo_root, subprocess_env, "sealedvolume_window.yml", {
        "store_args": store_args(store_target), "tpm_hash": tpm_hash, "pcr7": pcr7, "pcr7_new": pcr7_new}, tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert "failed=0" in result.stdout and "ignored=1" in result.stdout
    with store_target.open() as store:
        assert store.find_volume(tpm_hash)["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": "", "7": pcr7}}
