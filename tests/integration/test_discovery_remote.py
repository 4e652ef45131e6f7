# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""bin/kcrypt-discovery-challenger against a real ``kcrypt-challenger serve`` on 127.0.0.1 (SQLite store),
with a swtpm as the node's TPM: get over both protocols, TLS, retries, plugin mode, mDNS."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as kms_store, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerProcess
from support.discovery_node import DiscoveryNode, plugin_reply
from support.tcp_counter import CountingListener
from support.tls import make_pki
from support.ports import free_port


@pytest.fixture(scope="module")
def tpm(swtpm_factory):
    """One swtpm for the module (each `get` makes its own transient AK), and its TPM hash."""
    started = swtpm_factory(ek_cert=True)
    with TPM(started.tcti) as handle:
        started.tpm_hash = handle.endorsement_key().tpm_hash
    yield started
    started.stop()


@pytest.fixture
def node(tmp_path, subprocess_env):
    return DiscoveryNode(tmp_path / "node", subprocess_env)


class KMS:
    """kcrypt-challenger serve on 127.0.0.1 with its own SQLite store, plus direct access to that store."""

    def __init__(self, tmp_path, extra=(), tls=False, port=None):
        self.dir = tmp_path / "kms"
        self.dir.mkdir(exist_ok=True)
        self.db = "sqlite://%s/kms.db" % self.dir
        self.port = port or free_port()
        args = ["serve", "--listen", "127.0.0.1:%d" % self.port, "--store", self.db, *extra]
        self.process = ChallengerProcess(args, self.port, log_path=str(self.dir / "kms.log"), tls=tls)

    @property
    def url(self):
        return self.process.url

    def store(self):
        return store_factory.open_store(self.db)

    def secret_for(self, tpm_hash, label):
        """The Secret data of the partition ``label`` of ``tpm_hash`` (what the KMS hands out)."""
        with self.store() as opened:
            volume = opened.volumes_for(tpm_hash)[0]
            partition = [p for p in volume["spec"]["partitions"] if p.get("label") == label][0]
            ref = partition.get("secret") or {}
            name = ref.get("name") or "%s-%s" % (volume["metadata"]["name"], label.lower().replace("_", "-"))
            return opened.get_secret(name)["data"][ref.get("path") or "passphrase"]

    def add_partition(self, tpm_hash, partition, secret=None):
        with self.store() as opened:
            volume = opened.volumes_for(tpm_hash)[0]
            volume["spec"]["partitions"].append(partition)
            opened.update_volume(volume)
            if secret is not None:
                opened.create_secret(kms_store.new_secret(partition["secret"]["name"], secret))

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        self.process.stop()


def get(node, tpm, server, *args, label="COS_PERSISTENT"):
    return node.run("get", "--partition-label", label, "--challenger-server", server, "--tpm-device", tpm.tcti, *args)


def test_get_over_both_protocols(tmp_path, node, tpm):
    with KMS(tmp_path) as kms:
        # A legacy registration (no `attestation`): a static key and a legacy "generated" key.
        with kms.store() as opened:
            opened.create_secret(kms_store.new_secret("static-oem", {"pass": b"a static passphrase"}))
            opened.create_volume(kms_store.new_volume("legacy-node", tpm.tpm_hash, [
                {"label": "COS_OEM", "secret": {"name": "static-oem", "path": "pass"}}, {"label": "COS_DATA"}]))
        result = get(node, tpm, kms.url, "--protocol", "legacy", label="COS_OEM")
        assert (result.returncode, result.stdout) == (0, b"a static passphrase"), result.stderr

        # Legacy "generated keys": the node makes the passphrase, the KMS only stores its TPM ciphertext.
        generated = get(node, tpm, kms.url, "--protocol", "legacy", label="COS_DATA")
        assert generated.returncode == 0, generated.stderr
        assert len(generated.stdout) == 32 and generated.stdout.isalnum() and generated.stdout.lower() == generated.stdout
        stored = kms.secret_for(tpm.tpm_hash, "COS_DATA")
        assert generated.stdout not in stored  # the KMS never sees the plaintext
        again = get(node, tpm, kms.url, "--protocol", "legacy", label="COS_DATA")
        assert (again.returncode, again.stdout) == (0, generated.stdout)

        # The same static key over the newest protocol; trailing slashes are stripped (upstream fix #249).
        result = get(node, tpm, kms.url + "///", "--protocol", "attestation", label="COS_OEM")
        assert (result.returncode, result.stdout) == (0, b"a static passphrase"), result.stderr
        assert not result.stdout.endswith(b"\n")  # no newline, as upstream
        # That contact recorded the TPM's attestation: from now on the quote-less legacy protocol is refused (issue 14).
        refused = get(node, tpm, kms.url, "--protocol", "legacy", "--attempts", "1", label="COS_OEM")
        assert refused.returncode != 0 and refused.stdout == b""
        assert b"SealedVolume legacy-node requires the attestation protocol" in refused.stderr

        # A new partition over the newest protocol: trust on first use adds it with a Secret of its own.
        first = get(node, tpm, kms.url + "/")
        assert first.returncode == 0, first.stderr
        assert len(first.stdout) == 44 and first.stdout == kms.secret_for(tpm.tpm_hash, "COS_PERSISTENT")
        again = get(node, tpm, kms.url)
        assert (again.returncode, again.stdout) == (0, first.stdout)


def test_livecd_cmdline_defers_pcr_enrollment(tmp_path, tpm, subprocess_env):
    """Checklist 17: booted from the install medium (live:CDLABEL), the node asks the KMS to defer the PCRs."""
    livecd = DiscoveryNode(tmp_path / "livecd", subprocess_env, cmdline="BOOT_IMAGE=/boot/kernel root=live:CDLABEL=KAIROS rd.neednet=1\n")
    with KMS(tmp_path) as kms:
        result = get(livecd, tpm, kms.url)
        assert result.returncode == 0, result.stderr
        with kms.store() as opened:
            pcrs = opened.volumes_for(tpm.tpm_hash)[0]["spec"]["attestation"]["pcrValues"]["pcrs"]
        assert pcrs == {"0": "", "7": "", "11": ""}
        installed = DiscoveryNode(tmp_path / "installed", subprocess_env)  # first boot from disk: COS_ACTIVE
        assert get(installed, tpm, kms.url).stdout == result.stdout
        with kms.store() as opened:
            pcrs = opened.volumes_for(tpm.tpm_hash)[0]["spec"]["attestation"]["pcrValues"]["pcrs"]
        assert sorted(pcrs) == ["0", "11", "7"] and all(len(value) == 64 for value in pcrs.values())


def test_get_with_pinned_ca_and_bad_certificate(tmp_path, node, tpm):
    pki = make_pki(str(tmp_path))
    (tmp_path / "other").mkdir()
    other_ca = make_pki(str(tmp_path / "other"))["ca.pem"]  # same CA name, different key
    with KMS(tmp_path, ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]], tls=True) as kms:
        assert kms.url.startswith("https://")
        with open(pki["ca.pem"]) as handle:
            ca_pem = handle.read()
        pinned = get(node, tpm, kms.url, "--certificate", ca_pem)
        assert pinned.returncode == 0, pinned.stderr
        assert len(pinned.stdout) == 44
        node.config("kcrypt:\n  challenger:\n    certificate: |\n%s" % "".join("      " + line for line in ca_pem.splitlines(True)))
        from_config = get(node, tpm, kms.url)
        assert (from_config.returncode, from_config.stdout) == (0, pinned.stdout)
        os.unlink(os.path.join(node.oem, "90_kcrypt.yaml"))

        for certificate in ([], ["--certificate", other_ca]):  # no CA, then a CA that did not sign the KMS
            started = time.monotonic()
            refused = get(node, tpm, kms.url, "--attempts", "30", *certificate)
            assert (refused.returncode, refused.stdout) == (1, b"")
            assert "x509: certificate signed by unknown authority" in refused.stderr.decode()
            assert time.monotonic() - started < 10  # not retried 30 times


def test_retries_stop_on_rejection(tmp_path, node, tpm):
    with KMS(tmp_path) as kms:
        with kms.store() as opened:
            opened.create_volume(kms_store.new_volume("quarantined-node", tpm.tpm_hash,
                                                      [{"label": "COS_PERSISTENT"}], quarantined=True))
        with CountingListener(forward_to=kms.port) as relay:
            result = get(node, tpm, relay.url, "--attempts", "30", "--debug")
            assert relay.count == 1
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode().rstrip().endswith(
        "Error: getting passphrase: attestation failed: Attestation verification failed: TPM is quarantined")


def test_retries_count_failed_attempts(node, tpm):
    with CountingListener() as dropper:  # accepts and hangs up: every attempt fails
        result = get(node, tpm, dropper.url, "--attempts", "3", "--debug")
        assert dropper.count == 3
    assert (result.returncode, result.stdout) == (1, b"")
    log = result.stderr.decode()
    assert [line.split(" DBG ")[1][:19] for line in log.splitlines() if "failed: " in line and " DBG attempt" in line] == [
        "attempt 1/3 failed:", "attempt 2/3 failed:", "attempt 3/3 failed:"]
    assert "after 3 attempts" in log.splitlines()[-1]


def test_retries_go_on_after_refused_connections(tmp_path, node, tpm):
    port = free_port()  # nothing listens yet: the first attempts are refused
    started = time.monotonic()
    client = subprocess.Popen(
        node.command("get", "--partition-label", "COS_PERSISTENT", "--challenger-server", "http://127.0.0.1:%d" % port,
                     "--tpm-device", tpm.tcti, "--attempts", "20", "--debug"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node.env,
    )
    try:
        time.sleep(3)
        with KMS(tmp_path, port=port):
            out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, err
    assert len(out) == 44
    refused = [line for line in err.decode().splitlines() if " DBG attempt" in line and "refused" in line.lower()]
    assert 2 <= len(refused) < 20, err.decode()
    assert time.monotonic() - started >= 3


LEGACY_EVENT = {  # ghw block.Partition, kcrypt <= v0.11
    "name": "vda2", "label": "oem", "mount_point": "", "size_bytes": 67108864, "type": "ext4", "read_only": False,
    "uuid": "0d2c4a1e-6f5e-4b7a-9c1d-3e2f1a0b9c8d", "filesystem_label": "COS_OEM",
}


def test_plugin_mode_against_the_kms(tmp_path, node, tpm):
    with KMS(tmp_path) as kms:
        # The legacy event: server from the config, legacy protocol by default, label from filesystem_label.
        # (A legacy registration: a SealedVolume without `attestation`.)
        with kms.store() as opened:
            opened.create_secret(kms_store.new_secret("oem-key", {"passphrase": b"oem passphrase"}))
            opened.create_volume(kms_store.new_volume("node-reg", tpm.tpm_hash, [
                {"label": "COS_OEM", "secret": {"name": "oem-key", "path": "passphrase"}}]))
        node.config("kcrypt:\n  tpm_device: %s\n  challenger:\n    challenger_server: %s\n" % (tpm.tcti, kms.url))
        legacy = plugin_reply(node.plugin(json.dumps(LEGACY_EVENT), env={"KCRYPT_DISCOVERY_DEBUG": "1"}))
        assert legacy == {"state": "", "data": "oem passphrase", "error": "", "log": ""}
        assert "protocol=legacy-get outcome=success" in open(str(kms.dir / "kms.log")).read()

        # The newest event: a new partition of the registered TPM, added on first use.
        node.config("kcrypt:\n  tpm_device: %s\n" % tpm.tcti)
        newest = {"partition": {"name": "vda5", "partition_label": "persistent", "label": "COS_PERSISTENT",
                                "fs": "crypto_LUKS", "uuid": "5a7c0f6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"},
                  "challenger_server": kms.url + "/"}
        reply = plugin_reply(node.plugin(json.dumps(newest), env={"KCRYPT_DISCOVERY_DEBUG": "1"}))
        assert reply["error"] == ""
        assert reply["data"].encode() == kms.secret_for(tpm.tpm_hash, "COS_PERSISTENT")
        with kms.store() as opened:
            partition = [p for p in opened.volumes_for(tpm.tpm_hash)[0]["spec"]["partitions"] if p["label"] == "COS_PERSISTENT"][0]
        assert (partition["label"], partition["deviceName"], partition["uuid"]) == (
            "COS_PERSISTENT", "vda5", "5a7c0f6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f")

        log = node.log_text()
        assert "payload=newest" in log and "payload=legacy" in log
        assert reply["data"] not in log and "oem passphrase" not in log


def test_plugin_at_boot_finds_the_kms_in_kairos_config_and_skips_a_broken_file(tmp_path, node, tpm):
    """Issue 13 items 1 and 2: the KMS set only through a kairos.config= stanza on the kernel command line
    (upstream's KairosCmdlineYAMLFromString), while an unrelated /oem file is broken YAML. Upstream boots;
    so do we, and the plugin log names the file and the YAML error."""
    with KMS(tmp_path) as kms:
        with open(node.cmdline, "w") as handle:
            handle.write("BOOT_IMAGE=/vmlinuz root=LABEL=COS_ACTIVE kairos.config=kcrypt.challenger.challenger_server=%s\n" % kms.url)
        node.config("kcrypt:\n  tpm_device: %s\n" % tpm.tcti, name="10_tpm.yaml")
        node.config("stages:\n  boot:\n    - name: [unclosed\n", name="50_broken.yaml")
        newest = {"partition": {"name": "vda5", "label": "COS_PERSISTENT", "uuid": "5a7c0f6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}}
        reply = plugin_reply(node.plugin(json.dumps(newest)))  # no debug: the warning must still be logged
        assert reply["error"] == ""
        assert reply["data"].encode() == kms.secret_for(tpm.tpm_hash, "COS_PERSISTENT")
        log = node.log_text()
        assert "ERR Kairos config: Kairos config file %s/50_broken.yaml is not valid YAML at line" % node.oem in log
        assert reply["data"] not in log
        # the interactive CLI still refuses, naming the file
        result = node.run("get", "--partition-label", "COS_PERSISTENT", "--attempts", "1")
        assert result.returncode == 1
        assert "50_broken.yaml is not valid YAML" in result.stderr.decode()


def test_get_and_plugin_find_the_kms_with_mdns(tmp_path, node, tpm):
    host = "kcrypt-disc-%s.local" % uuid.uuid4().hex[:8]
    with KMS(tmp_path, ["--mdns-host", host, "--mdns-interface", "127.0.0.1"]) as kms:
        # The port in the URL is ignored: the SRV record's port wins, as upstream.
        result = get(node, tpm, "http://%s:1" % host, "--mdns", "--mdns-interfaces", "lo", "--debug")
        assert result.returncode == 0, result.stderr
        assert result.stdout == kms.secret_for(tpm.tpm_hash, "COS_PERSISTENT")
        assert "mDNS: http://%s:1 is http://127.0.0.1:%d" % (host, kms.port) in result.stderr.decode()

        node.config("kcrypt:\n  tpm_device: %s\n  challenger:\n    mdns_interfaces: [127.0.0.1]\n" % tpm.tcti)
        event = {"partition": {"name": "vda5", "label": "COS_PERSISTENT"}, "challenger_server": "http://%s" % host,
                 "mdns": True}
        reply = plugin_reply(node.plugin(json.dumps(event)))
        assert reply["data"].encode() == result.stdout
