# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet operations playbooks on a lab: quarantine, release, rekey, export/import, NV cleanup.

A lab of two nodes (swtpm + loop disk each) is built once for the class, its persistent
partitions encrypted with keys from a real challenger (SQLite store) on 127.0.0.1; the tests
run in order on it. The nodes' keys are fetched the way a booting node fetches them (the
discovery client code), so "the node can get its key" is checked end to end. The lab, the
challengers and their stores are removed whatever happens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, recovery as kms_recovery, server, store, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, key_source
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob as tpm_blob
from support import playbook
from support.challenger import ChallengerThread
from support.loopdisk import opens_with

ROOT = playbook.ROOT
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (loop devices)")


def load_lab_test_helpers():
    spec = importlib.util.spec_from_file_location("kcrypt_lab_tests", os.path.join(ROOT, "tests", "integration", "test_lab_role.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(path, fleet, extra=None, check=False, limit=None, store_dir=None):
    """ansible-playbook ``path`` on the lab inventory with the fleet's KMS settings (JSON callback)."""
    variables = {"kcrypt_kms_store_dir": store_dir or fleet["store_dir"], "kcrypt_challenger_server": fleet["kms"].url}
    variables.update(extra or {})
    return run_playbook(path, fleet["base"], fleet["inventory"], variables, check, limit)


def run_playbook(path, workdir, inventory, variables, check=False, limit=None):
    playbook.ensure_collection_link()
    # the admin command is the playbooks' default for a KMS on localhost: the collection's bin/kcrypt-challenger
    vars_file = os.path.join(workdir, "vars.json")
    with open(vars_file, "w") as handle:
        json.dump(variables, handle)
    args = [os.path.join(playbook.BIN, "ansible-playbook"), os.path.join(ROOT, path), "-i", inventory, "-e", "@" + vars_file]
    if limit:
        args += ["-l", limit]
    if check:
        args.append("--check")
    process = subprocess.run(args, capture_output=True, text=True, env=playbook.environment(), cwd=ROOT, timeout=600, check=False)
    os.unlink(vars_file)
    return playbook.Run(args, process)


def serve(store_url):
    opened = store_factory.open_store(store_url)
    thread = ChallengerThread(server.Challenger(policy.Policy(opened, enrollment="tofu"), ready_check=opened.ping)).start()
    thread.store = opened
    return thread


def stop(thread):
    thread.stop()
    thread.store.close()


@pytest.fixture(scope="class")
def fleet():
    base = tempfile.mkdtemp(prefix="kcrypt-ops-", dir="/tmp")
    lab_dir = os.path.join(base, "lab")
    name = "kcrypt-ops-%d" % os.getpid()
    state = {"base": base, "store_dir": os.path.join(base, "kms"), "inventory": os.path.join(base, "inventory.yml")}
    os.makedirs(state["store_dir"])
    helpers = load_lab_test_helpers()
    state["kms"] = serve("sqlite://%s/kms.db" % state["store_dir"])
    try:
        up = playbook.playbook("playbooks/lab_up.yml", {"lab_dir": lab_dir, "lab_inventory_path": state["inventory"], "lab_name": name,
                                                        "lab_nodes": [{"name": "node1"}, {"name": "node2"}]})
        assert up.rc == 0, up
        with open(state["inventory"]) as handle:
            state["nodes"] = yaml.safe_load(handle)["all"]["children"]["kcrypt_nodes"]["hosts"]
        encrypted = run("tests/integration/playbooks/fleet_encrypt.yml", state)
        assert encrypted.rc == 0, encrypted
        state["keys"] = {node: served_key(state, node) for node in state["nodes"]}
        yield state
    finally:
        stop(state["kms"])
        playbook.playbook("playbooks/lab_down.yml", {"lab_dir": lab_dir})
        helpers.force_remove(lab_dir, name)
        shutil.rmtree(base, ignore_errors=True)


def node_source(fleet, node, url=None):
    return key_source.build({"key_source": "kms", "challenger_server": url or fleet["kms"].url,
                             "tpm_device": fleet["nodes"][node]["kcrypt_tpm_device"], "kms_attempts": 1, "kms_retry_delay": 0.05})


def device_of(fleet, node):
    return fleet["nodes"][node]["kcrypt_lab_partitions"]["COS_PERSISTENT"]


def served_key(fleet, node, url=None):
    """The key the KMS gives ``node`` for its partition, asked as the node asks at boot."""
    return node_source(fleet, node, url).existing_key(blockdev.probe(device_of(fleet, node)), "COS_PERSISTENT")


def tpm_hash(fleet, node):
    with TPM(fleet["nodes"][node]["kcrypt_tpm_device"]) as handle:
        return handle.endorsement_key().tpm_hash


def escrowed(fleet, node):
    """The recovery key the KMS holds for ``node``'s partition, read as an administrator (audited)."""
    (found,) = kms_recovery.reveal(fleet["kms"].store, tpm_hash(fleet, node), "pytest", partition="COS_PERSISTENT")
    assert found["escrowed"], found
    return found["recovery_key"]


def quarantined(fleet, node):
    (volume,) = fleet["kms"].store.volumes_for(tpm_hash(fleet, node))
    return bool(volume["spec"].get("quarantined"))


@pytest.mark.slow(minutes=6)
class TestFleetOperations:
    def test_nodes_start_encrypted_with_kms_keys(self, fleet):
        for node, key in fleet["keys"].items():
            assert blockdev.probe(device_of(fleet, node)).fstype == "crypto_LUKS"
            assert opens_with(device_of(fleet, node), key)

    def test_quarantine_refuses_the_key(self, fleet):
        check = run("playbooks/quarantine.yml", fleet, limit="node1", check=True)
        assert check.rc == 0 and check.changed == 1, check
        assert not quarantined(fleet, "node1")

        done = run("playbooks/quarantine.yml", fleet, limit="node1")
        assert done.rc == 0 and done.changed == 1, done
        assert quarantined(fleet, "node1") and not quarantined(fleet, "node2")
        with pytest.raises(KcryptError, match="quarantined"):
            served_key(fleet, "node1")
        assert served_key(fleet, "node2") == fleet["keys"]["node2"]

        again = run("playbooks/quarantine.yml", fleet, limit="node1")
        assert again.rc == 0 and again.changed == 0, again

    def test_release_serves_the_key_again(self, fleet):
        done = run("playbooks/release.yml", fleet, limit="node1")
        assert done.rc == 0 and done.changed == 1, done
        assert not quarantined(fleet, "node1")
        assert served_key(fleet, "node1") == fleet["keys"]["node1"]
        assert opens_with(device_of(fleet, "node1"), served_key(fleet, "node1"))
        again = run("playbooks/release.yml", fleet, limit="node1")
        assert again.rc == 0 and again.changed == 0, again

    def test_quarantine_and_release_by_given_hash(self, fleet):
        given = {"tpm_hash": tpm_hash(fleet, "node2")}
        done = run("playbooks/quarantine.yml", fleet, given)
        assert done.rc == 0 and done.changed == 1 and quarantined(fleet, "node2"), done
        assert not quarantined(fleet, "node1")
        done = run("playbooks/release.yml", fleet, given)
        assert done.rc == 0 and done.changed == 1 and not quarantined(fleet, "node2"), done
        unknown = run("playbooks/quarantine.yml", fleet, {"tpm_hash": "ab" * 32})
        assert unknown.rc != 0 and any("no SealedVolume" in m for m in unknown.failure_messages()), unknown

    def test_rekey_through_the_kms(self, fleet):
        device, old = device_of(fleet, "node2"), fleet["keys"]["node2"]
        check = run("playbooks/rekey.yml", fleet, {"rekey_id": "r1"}, limit="node2", check=True)
        assert check.rc == 0 and check.changed > 0, check
        assert served_key(fleet, "node2") == old and luks_slots(device) == [0]

        done = run("playbooks/rekey.yml", fleet, {"rekey_id": "r1"}, limit="node2")
        assert done.rc == 0 and done.changed > 0, done
        new = served_key(fleet, "node2")
        assert new != old and opens_with(device, new) and not opens_with(device, old)
        assert len(luks_slots(device)) == 1
        assert new.decode() not in done.stderr + json.dumps(done.data)
        assert served_key(fleet, "node1") == fleet["keys"]["node1"]  # the other node is untouched

        again = run("playbooks/rekey.yml", fleet, {"rekey_id": "r1"}, limit="node2")
        assert again.rc == 0 and again.changed == 0, again.changed_tasks()
        assert served_key(fleet, "node2") == new
        fleet["keys"]["node2"] = new

    def test_rekey_rotates_the_recovery_key_escrowed_in_the_kms(self, fleet):
        """node2: a recovery key escrowed in the KMS, then one run re-keys the main key and rotates the recovery key."""
        device, main = device_of(fleet, "node2"), fleet["keys"]["node2"]
        only = {"rekey_id": "rec1", "rekey_recovery_key": True, "rekey_main_key": False, "rekey_recovery_escrow": "kms"}
        done = run("playbooks/rekey.yml", fleet, only, limit="node2")
        assert done.rc == 0 and done.changed == 1, done
        first = escrowed(fleet, "node2")
        assert opens_with(device, first) and served_key(fleet, "node2") == main and opens_with(device, main)

        both = {"rekey_id": "r2", "rekey_recovery_key": True, "rekey_recovery_escrow": "kms"}
        done = run("playbooks/rekey.yml", fleet, both, limit="node2")
        assert done.rc == 0 and done.changed > 0, done
        new_main, second = served_key(fleet, "node2"), escrowed(fleet, "node2")
        assert new_main != main and second != first
        assert opens_with(device, new_main) and opens_with(device, second)
        assert not opens_with(device, main) and not opens_with(device, first)
        assert len(luks_slots(device)) == 2  # the main key and the recovery key
        output = done.stderr + json.dumps(done.data)
        assert all(key.decode() not in output for key in (main, new_main, first, second))

        again = run("playbooks/rekey.yml", fleet, both, limit="node2")
        assert again.rc == 0 and again.changed == 0, again.changed_tasks()
        assert escrowed(fleet, "node2") == second and served_key(fleet, "node2") == new_main
        fleet["keys"]["node2"] = new_main

    def test_export_then_import_into_a_fresh_store(self, fleet):
        target = os.path.join(fleet["base"], "export", "kms.yaml")
        os.makedirs(os.path.dirname(target))
        done = run("playbooks/export.yml", fleet, {"export_file": target})
        assert done.rc == 0 and done.changed == 1, done
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        with open(target) as handle:
            docs = [d for d in yaml.safe_load_all(handle) if d]
        assert sorted(d["kind"] for d in docs) == ["SealedVolume", "SealedVolume", "Secret", "Secret"]
        output = done.stderr + json.dumps(done.data)
        secret_data = [v for d in docs if d["kind"] == "Secret" for v in d["data"].values()]
        for value in secret_data + [k.decode() for k in fleet["keys"].values()]:
            assert value not in output
        again = run("playbooks/export.yml", fleet, {"export_file": target})
        assert again.rc == 0 and again.changed == 0, again

        fresh = os.path.join(fleet["base"], "fresh")
        os.makedirs(fresh)
        check = run("playbooks/import.yml", fleet, {"import_file": target}, store_dir=fresh, check=True)
        assert check.rc == 0 and check.changed == 1, check
        done = run("playbooks/import.yml", fleet, {"import_file": target}, store_dir=fresh)
        assert done.rc == 0 and done.changed == 1, done
        for value in secret_data:
            assert value not in done.stderr + json.dumps(done.data)
        again = run("playbooks/import.yml", fleet, {"import_file": target}, store_dir=fresh)
        assert again.rc == 0 and again.changed == 0, again
        check = run("playbooks/import.yml", fleet, {"import_file": target}, store_dir=fresh, check=True)
        assert check.rc == 0 and check.changed == 0, check

        restored = serve("sqlite://%s/kms.db" % fresh)
        try:
            for node, key in fleet["keys"].items():
                assert served_key(fleet, node, restored.url) == key
                assert opens_with(device_of(fleet, node), key)
        finally:
            stop(restored)

    def test_nv_cleanup_needs_confirmation(self, fleet):
        tcti = fleet["nodes"]["node1"]["kcrypt_tpm_device"]
        with TPM(tcti) as handle:
            tpm_blob.create_nv_passphrase(handle)
            assert handle.nv_exists(0x1500000)

        refused = run("playbooks/nv_cleanup.yml", fleet, limit="node1")
        assert refused.rc != 0 and any("confirm=true" in m for m in refused.failure_messages()), refused
        check = run("playbooks/nv_cleanup.yml", fleet, {"confirm": True}, limit="node1", check=True)
        assert check.rc == 0 and check.changed == 1, check
        with TPM(tcti) as handle:
            assert handle.nv_exists(0x1500000)

        done = run("playbooks/nv_cleanup.yml", fleet, {"confirm": True}, limit="node1")
        assert done.rc == 0 and done.changed == 1, done
        with TPM(tcti) as handle:
            assert not handle.nv_exists(0x1500000)
        again = run("playbooks/nv_cleanup.yml", fleet, {"confirm": True}, limit="node1")
        assert again.rc == 0 and again.changed == 0, again

    def test_rekey_passphrase_then_offline(self, fleet):
        """Last (it takes node1 off its KMS key): passphrase old -> the TPM's NV key, then an offline re-key."""
        device, old = device_of(fleet, "node1"), fleet["keys"]["node1"]
        with TPM(fleet["nodes"]["node1"]["kcrypt_tpm_device"]) as handle:
            nv_first = tpm_blob.create_nv_passphrase(handle)
        moved = {"rekey_key_source": "passphrase", "rekey_passphrase": old.decode(), "rekey_new_passphrase": nv_first.decode()}
        done = run("playbooks/rekey.yml", fleet, moved, limit="node1")
        assert done.rc == 0 and done.changed == 1, done
        assert opens_with(device, nv_first) and not opens_with(device, old)
        assert old.decode() not in done.stderr + json.dumps(done.data) and nv_first.decode() not in json.dumps(done.data)
        again = run("playbooks/rekey.yml", fleet, moved, limit="node1")
        assert again.rc == 0 and again.changed == 0, again

        offline = {"rekey_key_source": "tpm", "rekey_id": "r1"}
        check = run("playbooks/rekey.yml", fleet, offline, limit="node1", check=True)
        assert check.rc == 0 and check.changed == 1 and opens_with(device, nv_first), check
        done = run("playbooks/rekey.yml", fleet, offline, limit="node1")
        assert done.rc == 0 and done.changed == 1, done
        with TPM(fleet["nodes"]["node1"]["kcrypt_tpm_device"]) as handle:
            nv_new = tpm_blob.read_nv_passphrase(handle)
        assert nv_new != nv_first and opens_with(device, nv_new) and not opens_with(device, nv_first)
        again = run("playbooks/rekey.yml", fleet, offline, limit="node1")
        assert again.rc == 0 and again.changed == 0, again
        missing = run("playbooks/rekey.yml", fleet, {"rekey_key_source": "tpm"}, limit="node1")
        assert missing.rc != 0 and any("rekey_id" in m for m in missing.failure_messages()), missing


def test_kubernetes_backend_quarantine_and_export_to_an_embedded_store(kube_api, tmp_path):
    """The same playbooks against SealedVolumes and Secrets in Kubernetes (API emulator), by TPM hash."""
    namespace = "kcrypt-ops-%s" % os.urandom(4).hex()
    tpm = "cd" * 32
    kube = store_factory.open_store("kubernetes://", kubeconfig=kube_api.kubeconfig, namespace=namespace)
    try:
        kube.create_secret(store.new_secret("node-x-persistent", {"passphrase": b"kubernetes held key"}))
        kube.create_volume(store.new_volume("node-x", tpm, partitions=[
            {"label": "COS_PERSISTENT", "secret": {"name": "node-x-persistent", "path": "passphrase"}}]))
        kubernetes = {"kcrypt_kms_backend": "kubernetes", "kcrypt_kms_kubeconfig": kube_api.kubeconfig,
                      "kcrypt_kms_namespace": namespace, "tpm_hash": tpm}
        inventory = os.path.join(ROOT, "inventory", "localhost.yml")
        done = run_playbook("playbooks/quarantine.yml", str(tmp_path), inventory, kubernetes)
        assert done.rc == 0 and done.changed == 1, done
        assert kube.get_volume("node-x")["spec"]["quarantined"] is True
        again = run_playbook("playbooks/quarantine.yml", str(tmp_path), inventory, kubernetes)
        assert again.rc == 0 and again.changed == 0, again
        done = run_playbook("playbooks/release.yml", str(tmp_path), inventory, kubernetes)
        assert done.rc == 0 and done.changed == 1 and not kube.get_volume("node-x")["spec"].get("quarantined"), done

        target = str(tmp_path / "export.yaml")
        done = run_playbook("playbooks/export.yml", str(tmp_path), inventory, dict(kubernetes, export_file=target))
        assert done.rc == 0 and done.changed == 1, done
        embedded = str(tmp_path / "embedded")
        os.makedirs(embedded)
        done = run_playbook("playbooks/import.yml", str(tmp_path), inventory, {"import_file": target, "kcrypt_kms_store_dir": embedded})
        assert done.rc == 0 and done.changed == 1, done
    finally:
        kube.close()
    with store_factory.open_store("sqlite://%s/kms.db" % embedded) as imported:
        (volume,) = imported.volumes_for(tpm)
        assert volume["spec"]["partitions"][0]["label"] == "COS_PERSISTENT"
        assert imported.get_secret("node-x-persistent")["data"]["passphrase"] == b"kubernetes held key"


def luks_slots(device):
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node import luks

    return luks.read_header(device).key_slots
