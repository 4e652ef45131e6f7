# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab role through the real playbooks: swtpms, loop disks, a network namespace, teardown.

One lab of three nodes (two plain, one with its own namespace and an oem partition) is
built once for the class; the tests run in order and the last one removes it. A safety net
removes whatever the lab recorded even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import luks
from support import playbook
from support.lab import HELPER, force_remove, leftovers, load_helper
from support.process import alive, stop

ROOT = playbook.ROOT
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (loop devices, namespaces)")


def lab_vars(lab_dir, name, network):
    return {
        "lab_dir": str(lab_dir),
        "lab_inventory_path": str(lab_dir / "inventory.yml"),
        "lab_name": name,
        "lab_network": network,
        "lab_nodes": [{"name": "node1"}, {"name": "node2"}, {"name": "node3", "netns": True, "oem": True}],
    }


def tpm_hash(tcti, netns=""):
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run(prefix + [PYTHON, os.path.join(ROOT, "bin", "kcrypt-discovery-challenger"),
                                      "--tpm-device", tcti],
                            capture_output=True, text=True, env=dict(os.environ, TSS2_LOG="all+NONE"), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="class")
def lab(tmp_path_factory):
    lab_dir = tmp_path_factory.mktemp("lab") / "lab"
    name = "kcrypt-lab-%d" % os.getpid()
    # a /24 of its own, so labs of parallel test runs never overlap
    network = "10.213.%d.0/24" % (100 + os.getpid() % 150)
    state = {"dir": lab_dir, "name": name, "vars": lab_vars(lab_dir, name, network)}
    yield state
    playbook.playbook("playbooks/lab_down.yml", {"lab_dir": str(lab_dir)})
    force_remove(lab_dir, name)


def read_inventory(lab):
    with open(lab["vars"]["lab_inventory_path"]) as handle:
        return yaml.safe_load(handle)["all"]["children"]["kcrypt_nodes"]


# the tests of this class build on each other, in order (scripts/test.sh: --dist loadscope keeps a class on one worker)
@pytest.mark.slow(minutes=1)
class TestLab:
    def test_lab_up(self, lab):
        run = playbook.playbook("playbooks/lab_up.yml", lab["vars"])
        assert run.rc == 0, run
        assert run.changed > 0
        group = read_inventory(lab)
        assert sorted(group["hosts"]) == ["node1", "node2", "node3"]
        assert group["vars"]["ansible_connection"] == "local"
        for name, node in group["hosts"].items():
            assert re.fullmatch(r"swtpm:host=127\.0\.0\.1,port=\d+", node["kcrypt_tpm_device"]), node
            assert re.fullmatch(r"/dev/loop\d+", node["kcrypt_lab_disk"]), node
            assert node["kcrypt_lab_partitions"]["COS_PERSISTENT"].startswith(node["kcrypt_lab_disk"] + "p")
        assert group["hosts"]["node3"]["kcrypt_lab_netns"] == lab["name"] + "-node3"
        assert set(group["hosts"]["node3"]["kcrypt_lab_partitions"]) == {"COS_OEM", "COS_PERSISTENT"}
        assert set(group["hosts"]["node1"]["kcrypt_lab_partitions"]) == {"COS_PERSISTENT"}
        assert group["hosts"]["node1"]["kcrypt_lab_netns"] == ""
        ports = [node["kcrypt_tpm_device"] for name, node in group["hosts"].items() if not node["kcrypt_lab_netns"]]
        assert len(set(ports)) == len(ports)

    def test_swtpms_answer_with_distinct_identities(self, lab):
        hosts = read_inventory(lab)["hosts"]
        hashes = {name: tpm_hash(node["kcrypt_tpm_device"], node["kcrypt_lab_netns"]) for name, node in hosts.items()}
        for value in hashes.values():
            assert re.fullmatch(r"[0-9a-f]{64}", value)
        assert len(set(hashes.values())) == 3, hashes
        lab["hashes"] = hashes

    def test_partitions_found_by_label(self, lab):
        hosts = read_inventory(lab)["hosts"]
        for label in ("COS_PERSISTENT", "COS_OEM"):
            listed = subprocess.run(["blkid", "-c", "/dev/null", "-t", "LABEL=%s" % label, "-o", "device"],
                                    capture_output=True, text=True, check=False).stdout.split()
            ours = {node["kcrypt_lab_partitions"][label] for node in hosts.values() if label in node["kcrypt_lab_partitions"]}
            assert ours and ours <= set(listed), (label, ours, listed)
        # the partition is really the GPT partition named "persistent" with ext4 in it
        probe = subprocess.run(["blkid", "-c", "/dev/null", "-p", "-o", "export",
                                hosts["node3"]["kcrypt_lab_partitions"]["COS_PERSISTENT"]],
                               capture_output=True, text=True, check=False).stdout
        assert "TYPE=ext4" in probe and "PART_ENTRY_NAME=persistent" in probe and "PART_ENTRY_SCHEME=gpt" in probe

    def test_second_run_changes_nothing(self, lab):
        before = open(lab["vars"]["lab_inventory_path"]).read()
        run = playbook.playbook("playbooks/lab_up.yml", lab["vars"])
        assert run.rc == 0, run
        assert run.changed == 0, run
        assert open(lab["vars"]["lab_inventory_path"]).read() == before

    def test_check_mode_predicts_nothing_on_a_complete_lab(self, lab):
        run = playbook.playbook("playbooks/lab_up.yml", lab["vars"], check=True)
        assert run.rc == 0, run
        assert run.changed == 0, run

    def test_netns_node_modules_run_inside_its_namespace(self, lab):
        inventory = lab["vars"]["lab_inventory_path"]
        results = playbook.adhoc("kcrypt_nodes", "ansible.builtin.command", "ip netns identify", inventory)
        assert results["node3"]["stdout"] == lab["name"] + "-node3", results["node3"]
        assert results["node1"]["stdout"] == ""
        facts = playbook.adhoc("node3", "ansible.builtin.setup", "gather_subset=!all,network", inventory)["node3"]
        assert sorted(facts["ansible_facts"]["ansible_interfaces"]) == ["eth0", "lo"]
        node3 = read_inventory(lab)["hosts"]["node3"]
        assert facts["ansible_facts"]["ansible_eth0"]["ipv4"]["address"] == node3["kcrypt_lab_address"]

    def test_nodes_encrypt_in_place_in_parallel_like_separate_machines(self, lab):
        """Each node has its own /run/cryptsetup and /run/lock (a private mount namespace per module run).

        The host holds both locks an in-place encryption of a COS_PERSISTENT volume takes: cryptsetup's
        per-UUID reencryption lock (cryptsetup refuses with "Reencryption process is already running"
        when it sees it taken) and kcrypt's turn-taking lock (kcrypt would wait for it). Every node
        still encrypts, none waiting for the host or another node, as separate machines would.
        """
        import fcntl

        uuid = luks.uuid_for_label("COS_PERSISTENT")
        os.makedirs("/run/cryptsetup", mode=0o700, exist_ok=True)
        held = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in (
            "/run/lock/kcrypt-reencrypt-%s.lock" % uuid, "/run/cryptsetup/LN_LUKS2-reencryption-%s" % uuid)]
        try:
            for descriptor in held:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            args = json.dumps({"partitions": [{"device": "{{ kcrypt_lab_partitions.COS_PERSISTENT }}"}],
                               "mode": "in_place", "key_source": "passphrase", "passphrase": "lab-parallel-test",
                               "pbkdf": {"algorithm": "pbkdf2", "iteration_count": 1000}})
            results = playbook.adhoc("kcrypt_nodes", "kairos.kcrypt.kairos_luks_encrypt", args,
                                     lab["vars"]["lab_inventory_path"], timeout=240)
        finally:
            for descriptor in held:
                os.close(descriptor)
        assert sorted(results) == ["node1", "node2", "node3"]
        for name, result in results.items():
            assert result.get("changed") and not result.get("failed"), (name, result)
            assert [p["luks_uuid"] for p in result["partitions"]] == [uuid]
            # kcrypt took its turn in the node's own /run/lock (cryptsetup removes its lock files after use)
            assert (lab["dir"] / "nodes" / name / "run" / "lock" / ("kcrypt-reencrypt-%s.lock" % uuid)).exists(), name

    def test_mdns_between_host_and_netns_node(self, lab):
        """An announcement on the lab bridge (the host side) resolves inside a node's namespace."""
        zeroconf = pytest.importorskip("zeroconf")
        import socket

        group = read_inventory(lab)
        host_address = group["vars"]["kcrypt_lab_host_address"]
        node3 = group["hosts"]["node3"]
        service = "_kcrypt._tcp.local."
        name = "lab-%d.%s" % (os.getpid(), service)
        announcer = zeroconf.Zeroconf(interfaces=[host_address], ip_version=zeroconf.IPVersion.V4Only)
        try:
            announcer.register_service(zeroconf.ServiceInfo(
                service, name, addresses=[socket.inet_aton(host_address)], port=8082,
                server="lab-%d.local." % os.getpid()))
            resolver = textwrap.dedent("""
                import sys, zeroconf
                zc = zeroconf.Zeroconf(interfaces=[sys.argv[1]], ip_version=zeroconf.IPVersion.V4Only)
                info = zc.get_service_info(sys.argv[2], sys.argv[3], timeout=8000)
                print(info.parsed_addresses()[0] if info else "", info.port if info else "")
                zc.close()
            """)
            result = subprocess.run(["ip", "netns", "exec", node3["kcrypt_lab_netns"], PYTHON, "-c", resolver,
                                     node3["kcrypt_lab_address"], service, name],
                                    capture_output=True, text=True, timeout=60, check=False)
        finally:
            announcer.close()
        assert result.stdout.split() == [host_address, "8082"], result.stderr

    def test_stopped_swtpm_is_restarted_with_its_identity(self, lab):
        node_dir = lab["dir"] / "nodes" / "node1"
        pid = int((node_dir / "swtpm.pid").read_text())
        subprocess.run(["kill", str(pid)], check=True)
        while os.path.exists("/proc/%d" % pid):
            time.sleep(0.05)
        run = playbook.playbook("playbooks/lab_up.yml", lab["vars"])
        assert run.rc == 0, run
        assert run.changed > 0
        node1 = read_inventory(lab)["hosts"]["node1"]
        assert int((node_dir / "swtpm.pid").read_text()) != pid
        assert tpm_hash(node1["kcrypt_tpm_device"]) == lab["hashes"]["node1"]

    def test_lab_comes_back_after_a_reboot(self, lab):
        """Processes, loop devices, namespaces and the bridge gone (as after a reboot): lab_up rebuilds them."""
        helper = [PYTHON, HELPER]
        nodes = ["--node=node1", "--node=node2", "--node=node3"]
        for step in ("stop", "detach", "remove-netns"):
            subprocess.run(helper + [step, "--lab-dir", str(lab["dir"])] + nodes, check=True, capture_output=True)
        subprocess.run(["ip", "link", "delete", load_helper().Lab(str(lab["dir"])).bridge], check=True)
        assert [kind for kind, _what in leftovers(lab["dir"], lab["name"])] == ["dir"]
        run = playbook.playbook("playbooks/lab_up.yml", lab["vars"])
        assert run.rc == 0, run
        hosts = read_inventory(lab)["hosts"]
        assert {name: tpm_hash(node["kcrypt_tpm_device"], node["kcrypt_lab_netns"])
                for name, node in hosts.items()} == lab["hashes"]
        for node in hosts.values():
            assert os.path.exists(node["kcrypt_lab_partitions"]["COS_PERSISTENT"])
        assert playbook.playbook("playbooks/lab_up.yml", lab["vars"]).changed == 0

    def test_changing_an_existing_node_is_refused(self, lab):
        changed = dict(lab["vars"], lab_nodes=[{"name": "node1", "oem": True}, {"name": "node2"},
                                               {"name": "node3", "netns": True, "oem": True}])
        run = playbook.playbook("playbooks/lab_up.yml", changed)
        assert run.rc != 0
        assert any("node1 already exists with a different" in message for message in run.failure_messages()), run

    def test_teardown_leaves_nothing(self, lab):
        assert leftovers(lab["dir"], lab["name"])  # the lab is there before
        loops = [node["kcrypt_lab_disk"] for node in read_inventory(lab)["hosts"].values()]
        # a service deployed into the lab directory, as provision.yml deploys the lab's KMS: the real
        # supervisor run from <lab>/kms, its server a program that does not name the lab at all
        kms = lab["dir"] / "kms"
        (kms / "opt" / "bin").mkdir(parents=True)
        supervisor = str(kms / "opt" / "bin" / "kcrypt_supervise.py")
        shutil.copy(os.path.join(ROOT, "roles", "challenger", "files", "kcrypt_supervise.py"), supervisor)
        started = json.loads(subprocess.run(
            [PYTHON, supervisor, "start", "--pidfile", str(kms / "run" / "kms.pid"), "--logfile", str(kms / "log" / "kms.log"),
             "--", PYTHON, "-c", "import time; time.sleep(600)"], capture_output=True, text=True, check=True).stdout)
        service = [started["pid"], started["child_pid"]]
        assert all(alive(pid) for pid in service), started
        # a process that only names a file of the lab is not the lab's: it is left alone
        bystander = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)", str(lab["dir"] / "lab.json")])
        try:
            run = playbook.playbook("playbooks/lab_down.yml", {"lab_dir": str(lab["dir"])})
            assert bystander.poll() is None, "lab_down stopped a process that does not run from the lab"
            assert not any(alive(pid) for pid in service), started
        finally:
            stop(bystander)
            for pid in service:  # what lab_down failed to stop (the server names no lab path)
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        assert run.rc == 0, run
        assert run.changed > 0
        assert leftovers(lab["dir"], lab["name"]) == []
        assert not os.path.exists(lab["vars"]["lab_inventory_path"])
        for loop in loops:  # detached, or reused since by someone else for another file
            back = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE", loop],
                                  capture_output=True, text=True, check=False).stdout.strip()
            assert not back.startswith(str(lab["dir"])), (loop, back)
        again = playbook.playbook("playbooks/lab_down.yml", {"lab_dir": str(lab["dir"])})
        assert again.rc == 0 and again.changed == 0, again


def test_bad_definition_fails_clearly(tmp_path):
    run = playbook.playbook("playbooks/lab_up.yml", {"lab_dir": "relative/lab", "lab_node_count": 1})
    assert run.rc != 0
    assert any("lab_dir must be an absolute path" in message for message in run.failure_messages()), run
    run = playbook.playbook("playbooks/lab_up.yml", {"lab_dir": str(tmp_path / "lab"), "lab_state": "sideways"})
    assert run.rc != 0
    assert "lab_state" in json.dumps(run.data), run
