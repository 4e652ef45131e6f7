# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/provision.yml (challenger + kairos.kcrypt.node + summary) on a lab of simulated nodes.

Each class builds its own lab (unique lab_dir under /tmp) and runs the real playbooks on it in
order; the fixture always removes the lab with lab_down, which stops and deletes the lab's KMS too.
Outcomes are checked independently of the code under test: cryptsetup opens each partition with
the passphrase the KMS store holds (or tpm2-tools recovers from the TPM), and the file written
before encryption is read back from the decrypted image.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_names, recovery as kms_recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store
from support import playbook
from support.lab import force_remove, leftovers, processes
from support.loopdisk import decrypt_to_image, luks_json, opens_with, read_file, sh, write_file
from support.ports import free_port
from support.process import alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (loop devices, swtpm, cryptsetup)")

DATA = b"kept across in-place encryption\n"


def blkid(device):
    return sh("blkid", "-o", "export", device).stdout.decode()


def nv_passphrase_by_tpm2_tools(tcti, workdir, nv_index="0x1500000", c_index="0x81000008"):
    """The offline passphrase recovered with tpm2-tools only: NV read + RSA-OAEP decrypt in the TPM."""
    blob = os.path.join(workdir, "blob.bin")
    plain = os.path.join(workdir, "plain.bin")
    env = {"TPM2TOOLS_TCTI": tcti}
    sh("tpm2_nvread", "-C", "o", "-s", "256", nv_index, "-o", blob, env=env)
    sh("tpm2_rsadecrypt", "-c", c_index, "-s", "oaep", "-o", plain, blob, env=env)
    with open(plain, "rb") as handle:
        return handle.read()


class Lab:
    """A lab, its inventory (plus an overlay directory for host_vars) and the KMS provision.yml starts."""

    def __init__(self, nodes):
        self.dir = "/tmp/kcrypt-fleet-%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.inventory = self.dir + "/inventory.yml"
        self.work = self.dir + "-work"
        self.overlay = self.work + "/overlay"
        self.port = free_port()
        self.nodes = nodes
        self.name = "kf%s" % secrets.token_hex(2)
        self.lab_vars = {"lab_dir": self.dir, "lab_inventory_path": self.inventory,
                         "lab_name": self.name, "lab_node_count": nodes}
        self.hosts = {}
        os.makedirs(self.work)

    def up(self):
        run = playbook.playbook("playbooks/lab_up.yml", self.lab_vars)
        assert run.rc == 0, run
        with open(self.inventory) as handle:
            self.hosts = yaml.safe_load(handle)["all"]["children"]["kcrypt_nodes"]["hosts"]
        # a directory inventory: the lab's file plus host_vars the tests write
        os.makedirs(self.overlay + "/host_vars")
        os.symlink(self.inventory, self.overlay + "/lab.yml")

    def host_vars(self, host, variables):
        with open("%s/host_vars/%s.yml" % (self.overlay, host), "w") as handle:
            yaml.safe_dump(variables, handle)

    def partition(self, host):
        return self.hosts[host]["kcrypt_lab_partitions"]["COS_PERSISTENT"]

    def provision(self, extra=None, check=False, diff=False):
        variables = {"challenger_port": self.port}
        variables.update(extra or {})
        return playbook.playbook("playbooks/provision.yml", variables, inventory=self.overlay, check=check, diff=diff,
                                 env={"KCRYPT_MDNS_INTERFACES": "127.0.0.1"})

    @property
    def store_path(self):
        return self.dir + "/kms/lib/kms.db"

    def store_passphrase(self, tpm_hash, label="COS_PERSISTENT"):
        """The passphrase the KMS store holds for a node's partition (what the KMS serves)."""
        store = open_store(self.store_path, create=False)
        try:
            volumes = store.volumes_for(tpm_hash)
            assert len(volumes) == 1, volumes
            volume = volumes[0]
            partition = [p for p in volume["spec"]["partitions"] if p.get("label") == label][0]
            name, key = kube_names.secret_ref(volume["metadata"]["name"], partition)
            return store.get_secret(name)["data"][key]
        finally:
            store.close()

    def registered(self, tpm_hash):
        store = open_store(self.store_path, create=False)
        try:
            return store.volumes_for(tpm_hash)
        finally:
            store.close()

    def read_back(self, host, passphrase):
        """The test file, read from the decrypted image of the node's partition."""
        image = os.path.join(self.work, "%s.img" % host)
        decrypt_to_image(self.partition(host), passphrase, image, self.work, length="ext4")
        try:
            return read_file(image, "kept.txt", self.work)
        finally:
            os.unlink(image)

    def kms_pid(self):
        """PID of the lab KMS's supervisor when it runs (0 otherwise)."""
        try:
            with open(self.dir + "/kms/run/kcrypt-lab-challenger.pid") as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                return pid if self.dir.encode() in handle.read() else 0
        except (OSError, ValueError):
            return 0

    def down(self):
        try:
            playbook.playbook("playbooks/lab_down.yml", self.lab_vars)
        finally:
            force_remove(self.dir, self.name)  # whatever lab_down could not remove (a failed test)
            shutil.rmtree(self.work, ignore_errors=True)


def summary(run):
    """The summary lines by node name (the Report play's message)."""
    results = run.task_results("Summary, one line per node")
    assert results, run
    lines = results[-1]["msg"]  # a list: one item per line, readable with any callback settings
    assert lines[0].split()[:2] == ["NODE", "TPM"], lines
    return {line.split()[0]: line for line in lines[1:]}


def node_results(run, hosts):
    """node_result of each host, as the role recorded it (last Record task of the host)."""
    found = {}
    for host in hosts:
        records = run.task_results("Record the result", host=host) + run.task_results("Record the failure", host=host)
        records = [r for r in records if "ansible_facts" in r]
        if records:
            found[host] = records[-1]["ansible_facts"]["node_result"]
    return found


def prepare(lab):
    """Write a file on every node's (unencrypted) persistent partition."""
    for host in lab.hosts:
        write_file(lab.partition(host), "kept.txt", DATA, lab.work)


def three_prepared_nodes():
    """A class's own lab of 3 nodes, each with a file on its persistent partition; always removed."""
    lab = Lab(3)
    try:
        lab.up()
        prepare(lab)
        yield lab
    finally:
        lab.down()


tofu_lab = pytest.fixture(scope="class", name="tofu_lab")(three_prepared_nodes)
mixed_lab = pytest.fixture(scope="class", name="mixed_lab")(three_prepared_nodes)


@pytest.mark.slow(minutes=7)
@pytest.mark.usefixtures("tofu_lab")
class TestProvisionTofu:
    """Three nodes, key source kms, the KMS enrolling them on first contact (TOFU)."""

    def test_check_mode_on_a_fresh_lab_changes_nothing_and_predicts(self, tofu_lab):
        before = {host: blkid(tofu_lab.partition(host)) for host in tofu_lab.hosts}
        run = tofu_lab.provision(check=True, diff=True)
        assert run.rc == 0, run
        lines = summary(run)
        assert set(lines) == set(tofu_lab.hosts)
        for host in tofu_lab.hosts:
            assert "would encrypt" in lines[host], lines[host]
            assert blkid(tofu_lab.partition(host)) == before[host]
        assert not os.path.exists(tofu_lab.dir + "/kms"), "check mode deployed the KMS"
        # the predicted change is shown, without secrets
        diffs = [r["diff"] for r in run.task_results("Encrypt the partitions", host="node1") if r.get("diff")]
        assert diffs and "crypto_LUKS" in str(diffs), run

    def test_provision_encrypts_every_node_with_the_key_the_kms_serves(self, tofu_lab):
        run = tofu_lab.provision()
        assert run.rc == 0, run
        assert tofu_lab.kms_pid(), "the lab KMS is not running"
        lines = summary(run)
        results = node_results(run, tofu_lab.hosts)
        assert set(lines) == set(results) == set(tofu_lab.hosts)
        hashes = set()
        for host, result in results.items():
            device = tofu_lab.partition(host)
            assert result["outcome"] == "encrypted" and result["mode"] == "in_place" and result["key_source"] == "kms"
            assert [p["device"] for p in result["partitions"]] == [device]
            assert len(result["tpm_hash"]) == 64
            hashes.add(result["tpm_hash"])
            line = lines[host]
            assert result["tpm_hash"][:16] in line and device in line and "encrypted" in line and "in_place" in line
            assert luks_json(device)["config"]  # a LUKS2 header (luksDump --dump-json-metadata is LUKS2 only)
            assert "TYPE=crypto_LUKS" in blkid(device)
            passphrase = tofu_lab.store_passphrase(result["tpm_hash"])
            assert opens_with(device, passphrase)
            assert not opens_with(device, passphrase + b"x")
            assert tofu_lab.read_back(host, passphrase) == DATA
            assert passphrase.decode("utf-8", "replace") not in str(run.data) + run.stderr
        assert len(hashes) == 3

    def test_second_run_changes_nothing(self, tofu_lab):
        run = tofu_lab.provision()
        assert run.rc == 0, run
        assert run.changed == 0, run
        for host, line in summary(run).items():
            assert " unchanged " in line and "the key opens every partition" in line, line

    def test_recovery_keys_escrowed_in_the_kms(self, tofu_lab):
        """node_recovery_escrow=kms: each node escrows its recovery key in the lab KMS; none reaches the output."""
        extra = {"node_recovery_key": True, "node_recovery_escrow": "kms"}
        run = tofu_lab.provision(extra)
        assert run.rc == 0, run
        results = node_results(run, tofu_lab.hosts)
        assert set(results) == set(tofu_lab.hosts)
        store = open_store(tofu_lab.store_path, create=False)
        try:
            for host, result in results.items():
                (found,) = kms_recovery.reveal(store, result["tpm_hash"], "pytest")
                assert found["escrowed"] and found["partition"] == "COS_PERSISTENT"
                assert opens_with(tofu_lab.partition(host), found["recovery_key"])
                assert found["recovery_key"].decode() not in str(run.data) + run.stderr
            assert len(store.audit_events()) == len(tofu_lab.hosts)
        finally:
            store.close()
        again = tofu_lab.provision(extra)
        assert again.rc == 0 and again.changed == 0, again

    def test_lab_down_stops_the_kms_and_leaves_nothing(self, tofu_lab):
        """lab_down alone (no KMS settings passed): the KMS provision.yml deployed into the lab goes too."""
        assert tofu_lab.kms_pid(), "the lab KMS is not running"
        kms = [pid for pid, argv in processes(tofu_lab.dir) if "/kms/" in argv]
        assert len(kms) >= 2, kms  # the supervisor and the server
        run = playbook.playbook("playbooks/lab_down.yml", {"lab_dir": tofu_lab.dir})
        assert run.rc == 0, run
        assert leftovers(tofu_lab.dir, tofu_lab.name) == []
        assert not any(alive(pid) for pid in kms), kms


STATIC = "static passphrase of node2 " + secrets.token_hex(8)


@pytest.mark.slow(minutes=9)
@pytest.mark.usefixtures("mixed_lab")
class TestProvisionMixed:
    """node1 offline (TPM), node2 a static passphrase in the KMS, node3 quarantined: it fails alone."""

    def test_offline_static_and_a_failing_node(self, mixed_lab):
        mixed_lab.host_vars("node1", {"node_key_source": "tpm"})
        mixed_lab.host_vars("node2", {"node_static_passphrases": {"COS_PERSISTENT": STATIC}})
        mixed_lab.host_vars("node3", {"node_quarantined": True})
        before3 = blkid(mixed_lab.partition("node3"))
        run = mixed_lab.provision()
        assert run.rc != 0, run
        lines = summary(run)
        results = node_results(run, mixed_lab.hosts)

        # node1: offline key in the TPM's NV blob, recovered here with tpm2-tools; not registered
        assert results["node1"]["outcome"] == "encrypted" and results["node1"]["key_source"] == "tpm", results
        offline = nv_passphrase_by_tpm2_tools(mixed_lab.hosts["node1"]["kcrypt_tpm_device"], mixed_lab.work)
        assert opens_with(mixed_lab.partition("node1"), offline)
        assert mixed_lab.read_back("node1", offline) == DATA
        assert mixed_lab.registered(results["node1"]["tpm_hash"]) == []

        # node2: the static passphrase was registered and is the disk's key
        assert results["node2"]["outcome"] == "encrypted", results
        assert mixed_lab.store_passphrase(results["node2"]["tpm_hash"]) == STATIC.encode()
        assert opens_with(mixed_lab.partition("node2"), STATIC.encode())
        assert mixed_lab.read_back("node2", STATIC.encode()) == DATA
        assert STATIC not in str(run.data) + run.stderr

        # node3: quarantined in the KMS, so the KMS refused; the disk is untouched; it fails alone
        assert results["node3"]["outcome"] == "failed", results
        assert "quarantin" in results["node3"]["message"].lower(), results["node3"]
        assert " failed " in lines["node3"] and "quarantin" in lines["node3"].lower(), lines["node3"]
        assert blkid(mixed_lab.partition("node3")) == before3
        assert run.stats("node3").get("failures") == 1 and not run.stats("node1").get("failures")
        assert " encrypted " in lines["node1"] and " encrypted " in lines["node2"]

    def test_second_run_changes_nothing_on_the_good_nodes_and_reports_an_unreachable_one(self, mixed_lab):
        # one more node nobody answers for (ssh to a closed port on this machine)
        ghost = mixed_lab.overlay + "/ghost.yml"
        with open(ghost, "w") as handle:
            yaml.safe_dump({"all": {"children": {"kcrypt_nodes": {"hosts": {"ghost": {
                "ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": free_port(),
                "ansible_ssh_common_args": "-o ConnectTimeout=5 -o BatchMode=yes"}}}}}}, handle)
        try:
            run = mixed_lab.provision()
        finally:
            os.unlink(ghost)
        assert run.rc != 0, run  # node3 is still quarantined, ghost unreachable
        assert run.stats("node1").get("changed") == 0 and run.stats("node2").get("changed") == 0, run
        lines = summary(run)
        assert set(lines) == {"node1", "node2", "node3", "ghost"}, lines
        assert " unchanged " in lines["node1"] and " unchanged " in lines["node2"], lines
        assert " failed " in lines["node3"]
        assert " failed " in lines["ghost"] and "unreachable" in lines["ghost"], lines["ghost"]
        assert run.stats("ghost").get("failures") == 1, run

    def test_kairos_config_mode(self, mixed_lab):
        # the same node roles as the test above, so this test also runs alone (-k)
        mixed_lab.host_vars("node1", {"node_key_source": "tpm"})
        mixed_lab.host_vars("node2", {"node_static_passphrases": {"COS_PERSISTENT": STATIC}})
        mixed_lab.host_vars("node3", {"node_quarantined": True})
        oem = mixed_lab.dir + "/oem"
        for host in mixed_lab.hosts:
            os.makedirs("%s/%s" % (oem, host))
        extra = {"node_state": "kairos_config", "node_partitions": [{"label": "COS_PERSISTENT"}],
                 "node_kairos_config_dir": oem + "/{{ inventory_hostname }}"}
        hashes = {host: blkid(mixed_lab.partition(host)) for host in mixed_lab.hosts}

        check = mixed_lab.provision(extra, check=True, diff=True)
        assert check.rc == 0, check  # configuring needs no key, so the quarantined node3 passes too
        for host in mixed_lab.hosts:
            assert os.listdir("%s/%s" % (oem, host)) == [], "check mode wrote a file"
        diffs = [r.get("diff") for r in check.task_results("Write the kcrypt settings for Kairos", host="node2")]
        assert diffs and "challenger_server" in str(diffs), check

        run = mixed_lab.provision(extra)
        lines = summary(run)
        url = "http://127.0.0.1:%d" % mixed_lab.port
        for host in mixed_lab.hosts:
            path = "%s/%s/90_kcrypt.yaml" % (oem, host)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with open(path) as handle:
                text = handle.read()
            assert text.startswith("#cloud-config\n")
            config = yaml.safe_load(text)
            assert config["install"]["encrypted_partitions"] == ["COS_PERSISTENT"]
            assert config["kcrypt"]["tpm_device"] == mixed_lab.hosts[host]["kcrypt_tpm_device"]
            if host == "node1":  # offline: no KMS settings
                assert "challenger" not in config["kcrypt"], config
            else:
                assert config["kcrypt"]["challenger"] == {"challenger_server": url}, config
            assert STATIC not in text
            assert " configured " in lines[host], lines[host]
            # nothing was encrypted or changed on the disks
            assert blkid(mixed_lab.partition(host)) == hashes[host]
        assert run.rc == 0, run

        again = mixed_lab.provision(extra)
        assert again.rc == 0 and again.changed == 0, again
        assert all(" unchanged " in line for line in summary(again).values())

    def test_recovery_keys_are_kept_on_the_controller(self, mixed_lab):
        # node1 (offline) and node2 (static key in the KMS) are encrypted: each gets a recovery key slot. The node
        # roles are set here too, so this test also runs alone (-k, or on another xdist worker than the first test).
        mixed_lab.host_vars("node1", {"node_key_source": "tpm"})
        mixed_lab.host_vars("node2", {"node_static_passphrases": {"COS_PERSISTENT": STATIC}})
        mixed_lab.host_vars("node3", {"node_quarantined": True})
        keys_dir = mixed_lab.work + "/recovery"
        os.makedirs(keys_dir, mode=0o700)
        extra = {"node_recovery_key": True, "node_recovery_key_dir": keys_dir}
        run = mixed_lab.provision(extra)
        assert run.stats("node1").get("changed") and run.stats("node2").get("changed"), run
        files = {}
        for host in ("node1", "node2"):
            path = "%s/%s.recovery" % (keys_dir, host)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with open(path) as handle:
                lines = handle.read().splitlines()
            assert len(lines) == 1, lines
            device, label, key = lines[0].split(" ", 2)
            assert (device, label) == (mixed_lab.partition(host), "COS_PERSISTENT")
            assert opens_with(device, key.encode()) and not opens_with(device, key.encode() + b"x")
            assert key not in str(run.data) + run.stderr, "a recovery key is in the playbook output"
            files[path] = lines
        assert STATIC.encode() != files["%s/node2.recovery" % keys_dir][0].split(" ", 2)[2].encode()
        assert opens_with(mixed_lab.partition("node2"), STATIC.encode())  # the partition key still works

        again = mixed_lab.provision(extra)
        assert again.stats("node1").get("changed") == 0 and again.stats("node2").get("changed") == 0, again
        for path, lines in files.items():
            with open(path) as handle:
                assert handle.read().splitlines() == lines

    def test_invalid_settings_on_every_node_still_give_a_summary(self, mixed_lab):
        before = {host: blkid(mixed_lab.partition(host)) for host in mixed_lab.hosts}
        run = mixed_lab.provision({"node_encrypt_mode": "sideways"})  # refused by the role's argument spec
        assert run.rc != 0, run
        lines = summary(run)
        assert set(lines) == set(mixed_lab.hosts), lines
        for host in mixed_lab.hosts:
            assert " failed " in lines[host] and "node_encrypt_mode" in lines[host], lines[host]
            assert run.stats(host).get("failures") == 1, run
            assert blkid(mixed_lab.partition(host)) == before[host]
