# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Full round trips: swtpm-backed node (client.py) ↔ challenger (server.py) ↔ real policy on every store.

``kms_store`` is the ``store`` fixture of tests/integration/conftest.py, so every
scenario runs on SQLite, on the emulated Kubernetes API, and on a real cluster
when KUBECONFIG is set.

One swtpm serves every scenario (AK creation costs ~0.3 s on swtpm, so each
get_passphrase call is one AK); scenarios change the store between calls the
way an administrator would. The TLS tests run the real ``kcrypt-challenger``
process.
"""

from __future__ import annotations

import time

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server, store
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerProcess, ChallengerThread
from support.tls import make_pki
from support.ports import free_port

PERSISTENT = PartitionRef(label="COS_PERSISTENT", device_name="vda5")
OEM = PartitionRef(label="COS_OEM", device_name="vda2")


@pytest.fixture(scope="module")
def node(swtpm_factory):
    """A swtpm with an EK certificate, and its identity."""
    tpm = swtpm_factory(ek_cert=True, fresh=True)
    with TPM(tpm.tcti) as handle:
        ek = handle.endorsement_key()
    tpm.identity = ek
    yield tpm
    tpm.stop()


@pytest.fixture
def kms_store(store):
    """The store under test: one per backend (tests/integration/conftest.py)."""
    return store


def _kms(kms_store, enrollment="tofu", nonce="when-supported"):
    store_calls = "inline" if kms_store.url.startswith("sqlite:") else "thread"  # as `kcrypt-challenger serve` picks
    return ChallengerThread(server.Challenger(policy.Policy(kms_store, enrollment=enrollment), nonce_mode=nonce,
                                              store_calls=store_calls, ready_check=kms_store.ping))


def _config(kms, node, **kwargs):
    kwargs.setdefault("attempts", 2)
    kwargs.setdefault("retry_delay", 0.05)
    kwargs.setdefault("challenger_server", kms.url)
    return client.ClientConfig(tpm_device=node.tcti, **kwargs)


def _volume(kms_store, tpm_hash):
    volumes = kms_store.volumes_for(tpm_hash)
    assert len(volumes) == 1
    return volumes[0]


def _edit(kms_store, tpm_hash, change):
    volume = _volume(kms_store, tpm_hash)
    change(volume["spec"])
    kms_store.update_volume(volume)


def test_tofu_then_same_passphrase_then_policy_rules(kms_store, node):
    tpm_hash = node.identity.tpm_hash
    with _kms(kms_store) as kms:
        first = client.get_passphrase(_config(kms, node, challenger_server=kms.url + "//"), PERSISTENT)  # trailing slashes
        assert len(first) == 44  # base64 of 32 random bytes, as upstream's TOFU
        attestation = _volume(kms_store, tpm_hash)["spec"]["attestation"]
        assert attestation["ekPublicKey"] == node.identity.public_pem
        with TPM(node.tcti) as tpm:
            pcrs = tpm.pcr_read([0, 7, 11])
        assert attestation["pcrValues"]["pcrs"] == {str(i): v.hex() for i, v in pcrs.items()}
        assert client.get_passphrase(_config(kms, node), PERSISTENT) == first

        # Learning: empty EK and PCR fields are accepted and filled with the current values.
        _edit(kms_store, tpm_hash, lambda spec: spec["attestation"].update(ekPublicKey="", pcrValues={"pcrs": {"0": "", "7": ""}}))
        assert client.get_passphrase(_config(kms, node), PERSISTENT) == first
        learned = _volume(kms_store, tpm_hash)["spec"]["attestation"]
        assert learned["ekPublicKey"] == node.identity.public_pem
        assert learned["pcrValues"]["pcrs"] == {"0": pcrs[0].hex(), "7": pcrs[7].hex()}  # PCR11 stays unenforced

        # EK mismatch.
        other_pem = learned["ekPublicKey"].replace("MII", "MIJ", 1)
        _edit(kms_store, tpm_hash, lambda spec: spec["attestation"].update(ekPublicKey=other_pem))
        with pytest.raises(client.AttestationRejected, match="EK verification failed: EK public key does not match enrolled key"):
            client.get_passphrase(_config(kms, node), PERSISTENT)
        _edit(kms_store, tpm_hash, lambda spec: spec["attestation"].update(ekPublicKey=node.identity.public_pem))

        # Quarantine: for every partition of the TPM, and never retried.
        _edit(kms_store, tpm_hash, lambda spec: spec.update(quarantined=True))
        started = time.monotonic()
        with pytest.raises(client.AttestationRejected, match="^attestation failed: Attestation verification failed: .*TPM is quarantined"):
            client.get_passphrase(_config(kms, node, attempts=30, retry_delay=1.0), OEM)
        assert time.monotonic() - started < 5
        _edit(kms_store, tpm_hash, lambda spec: spec.update(quarantined=False))

        # A second partition on the enrolled TPM gets its own secret.
        oem = client.get_passphrase(_config(kms, node), OEM)
        assert oem != first and len(_volume(kms_store, tpm_hash)["spec"]["partitions"]) == 2

        # Boot state changes: extend PCR7 on the TPM.
        with TPM(node.tcti) as tpm:
            tpm.pcr_extend(7, b"a different bootloader")
        with pytest.raises(client.AttestationRejected, match="PCR7 changed - boot state verification failed"):
            client.get_passphrase(_config(kms, node), PERSISTENT)
    node.restart()  # a reboot: PCRs back to their boot values


def test_static_passphrase_and_registered_only(kms_store, node, swtpm_factory):
    tpm_hash = node.identity.tpm_hash
    kms_store.create_secret(store.new_secret("node1-static", {"disk": b"s3cret-static-passphrase"}))
    kms_store.create_volume(store.new_volume("node1", tpm_hash, partitions=[
        {"label": "COS_PERSISTENT", "secret": {"name": "node1-static", "path": "disk"}}]))
    with _kms(kms_store, enrollment="registered-only") as kms:
        assert client.get_passphrase(_config(kms, node), PERSISTENT) == b"s3cret-static-passphrase"
        learned = _volume(kms_store, tpm_hash)["spec"]["attestation"]  # attestation nil → learned on first contact
        assert learned["ekPublicKey"] == node.identity.public_pem
        stranger = swtpm_factory(ek_cert=False, fresh=True)
        try:
            with pytest.raises(client.AttestationRejected, match="attestation failed: Attestation verification failed: "):
                client.get_passphrase(_config(kms, stranger), PERSISTENT)
        finally:
            stranger.stop()
    assert [v["metadata"]["name"] for v in kms_store.list_volumes()] == ["node1"]  # nothing enrolled


def test_livecd_deferral_then_learning(kms_store, node):
    tpm_hash = node.identity.tpm_hash
    with _kms(kms_store) as kms:
        first = client.get_passphrase(_config(kms, node, defer_pcr_enrollment=True), PERSISTENT)
        assert _volume(kms_store, tpm_hash)["spec"]["attestation"]["pcrValues"]["pcrs"] == {"0": "", "7": "", "11": ""}
        assert client.get_passphrase(_config(kms, node), PERSISTENT) == first  # installed system's first boot
        pcrs = _volume(kms_store, tpm_hash)["spec"]["attestation"]["pcrValues"]["pcrs"]
        assert all(len(value) == 64 for value in pcrs.values())


def test_legacy_generated_tpm_key_via_post_pass(kms_store, node):
    tpm_hash = node.identity.tpm_hash
    kms_store.create_volume(store.new_volume("legacy-node", tpm_hash, partitions=[{"label": "COS_PERSISTENT"}]))
    with _kms(kms_store) as kms:
        config = _config(kms, node, protocol="legacy")
        first = client.get_passphrase(config, PERSISTENT)
        assert len(first) == 32 and first.isalnum() and first == first.lower()
        secret = kms_store.get_secret("legacy-node-cos-persistent")  # legacy cleanKubeName
        assert secret["data"]["generated_by"] == b"tpm"
        blob = protocol.b64url_decode(secret["data"]["passphrase"].decode())
        assert len(blob) == 256 and first not in secret["data"]["passphrase"]  # the KMS only holds ciphertext
        assert client.get_passphrase(config, PERSISTENT) == first


def test_legacy_static_passphrase(kms_store, node):
    kms_store.create_secret(store.new_secret("legacy-static", {"passphrase": b"static-legacy"}))
    kms_store.create_volume(store.new_volume("legacy-static-node", node.identity.tpm_hash, partitions=[
        {"label": "COS_OEM", "secret": {"name": "legacy-static", "path": "passphrase"}}]))
    with _kms(kms_store) as kms:
        assert client.get_passphrase(_config(kms, node, protocol="legacy"), OEM) == b"static-legacy"
        with pytest.raises(KcryptError, match="no volume found with data from request and hash"):
            client.get_passphrase(_config(kms, node, protocol="legacy"), PERSISTENT)


def test_a_disabled_protocol_is_named_in_the_node_s_error(kms_store, node):
    kms_store.create_volume(store.new_volume("legacy-node", node.identity.tpm_hash, partitions=[{"label": "COS_PERSISTENT"}]))
    challenger = server.Challenger(policy.Policy(kms_store), protocols=("attestation",),
                                   store_calls="inline" if kms_store.url.startswith("sqlite:") else "thread")
    with ChallengerThread(challenger) as kms:
        with pytest.raises(KcryptError, match=r'HTTP 404 "/getPass: the legacy protocol is disabled on this KMS, which '
                                              r'serves attestation \(kcrypt-challenger --protocols attestation\)" '
                                              r'\(is challenger_server .* set protocol to attestation for a v0.12\+ KMS\)$'):
            client.get_passphrase(_config(kms, node, protocol="legacy", attempts=1), PERSISTENT)


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_with_pinned_ca_and_unknown_ca(tmp_path, node, workers):
    pki = make_pki(str(tmp_path))
    port = free_port()
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
            "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--workers", str(workers)]
    with ChallengerProcess(args, port, log_path=str(tmp_path / "kms.log"), tls=True) as kms:
        ca_pem = open(pki["ca.pem"]).read()
        pinned = client.get_passphrase(_config(kms, node, certificate=ca_pem), PERSISTENT)
        assert client.get_passphrase(_config(kms, node, certificate=ca_pem), PERSISTENT) == pinned
        started = time.monotonic()
        with pytest.raises(KcryptError, match="x509: certificate signed by unknown authority") as info:
            client.get_passphrase(_config(kms, node, attempts=30, retry_delay=1.0), PERSISTENT)
        assert time.monotonic() - started < 5  # not retried
        assert "wss://127.0.0.1:%d/tpm-attestation" % port in str(info.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_mdns_announced_kms(tmp_path, node, workers):
    """kcrypt-challenger --mdns-host announces on 127.0.0.1; the client resolves the .local name and dials ip:port.
    With workers, the supervisor announces once, after every worker listens."""
    import os

    port = free_port()
    host = "kcrypt-wire-%d-%d.local" % (os.getpid(), workers)
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
            "--mdns-host", host, "--mdns-interface", "127.0.0.1", "--workers", str(workers)]
    with ChallengerProcess(args, port, log_path=str(tmp_path / "kms.log")):
        config = client.ClientConfig("http://%s" % host, mdns=True, mdns_interfaces=["127.0.0.1"], mdns_timeout=10,
                                     tpm_device=node.tcti, attempts=2, retry_delay=0.1)
        assert len(client.get_passphrase(config, PERSISTENT)) == 44
    assert open(str(tmp_path / "kms.log")).read().count("announcing %s on mDNS" % host) == 1
