# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Online mode: partitions encrypted with keys from the challenger on 127.0.0.1 (swtpm node, SQLite store).

Every scenario checks the partition with cryptsetup against the secret the KMS
stored, and that a refusal leaves the partition exactly as it was.
"""

from __future__ import annotations

import base64

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server, store, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, encryption, key_source
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from support.challenger import ChallengerProcess, ChallengerThread
from support.loopdisk import make_ext4, opens_with, unique_label
from support.node_fixtures import fast_options, loop_disks, node  # noqa: F401  # pylint: disable=unused-import
from support.tls import make_pki
from support.ports import free_port


@pytest.fixture
def kms_store(tmp_path):
    opened = store_factory.open_store("sqlite://%s/kms.db" % tmp_path)
    yield opened
    opened.close()


def kms(kms_store, enrollment="tofu"):
    return ChallengerThread(server.Challenger(policy.Policy(kms_store, enrollment=enrollment), ready_check=kms_store.ping))


def kms_source(url, node, **params):
    values = {"key_source": "kms", "challenger_server": url, "tpm_device": node.tcti, "kms_attempts": 2, "kms_retry_delay": 0.05}
    values.update(params)
    return key_source.build(values)


def encrypt(source, *selectors):
    request = encryption.EncryptRequest(partitions=tuple(selectors), mode="in_place", options=fast_options())
    return encryption.apply(encryption.plan(request, source), request, source)


def labelled_partition(loop_disks, count=1):
    disk = loop_disks([("part%d" % i, 40) for i in range(count)])
    labels = [unique_label() for index in range(count)]
    for device, label in zip(disk.partitions, labels):
        make_ext4(device, label)
    return disk, labels


def secret_value(kms_store, name, key="passphrase"):
    return kms_store.get_secret(name)["data"][key]


def assert_untouched(device, before):
    after = blockdev.probe(device)
    assert (after.fstype, after.uuid, after.label) == (before.fstype, before.uuid, before.label)


def test_tofu_enrols_and_the_stored_secret_opens_the_partition(kms_store, node, loop_disks):
    disk, (label,) = labelled_partition(loop_disks)
    with kms(kms_store) as server_thread:
        request = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place", options=fast_options())
        # check mode does not contact the KMS for a plain partition: nothing is enrolled
        plans = encryption.plan(request, kms_source(server_thread.url, node))
        assert [p.action for p in plans] == ["in_place"] and kms_store.list_volumes() == []

        result = encrypt(kms_source(server_thread.url, node), encryption.Selector(label=label))[0]
        assert result["key_source"] == "kms" and result["action"] == "in_place"
        (volume,) = kms_store.volumes_for(node.tpm_hash)
        assert volume["spec"]["partitions"][0]["label"] == label
        secret_name = volume["spec"]["partitions"][0]["secret"]["name"]
        stored = secret_value(kms_store, secret_name, volume["spec"]["partitions"][0]["secret"]["path"])
        assert len(base64.b64decode(stored)) == 32  # upstream TOFU: base64 of 32 random bytes
        assert opens_with(disk.partitions[0], stored)

        # idempotent: the KMS returns the same key, which opens the partition
        again = encryption.plan(request, kms_source(server_thread.url, node))
        assert [(p.action, p.changes) for p in again] == [("none", False)]


def test_static_key_registered_by_the_administrator(kms_store, node, loop_disks):
    disk, (label,) = labelled_partition(loop_disks)
    kms_store.create_secret(store.new_secret("static-disk", {"key": b"administrator-chosen static key"}))
    kms_store.create_volume(store.new_volume("node-static", node.tpm_hash, partitions=[
        {"label": label, "secret": {"name": "static-disk", "path": "key"}}]))
    with kms(kms_store, enrollment="registered-only") as server_thread:
        encrypt(kms_source(server_thread.url, node), encryption.Selector(label=label))
    assert opens_with(disk.partitions[0], b"administrator-chosen static key")


def test_pre_registered_tpm_gets_a_generated_key_and_strangers_are_refused(kms_store, node, swtpm_factory, loop_disks):
    disk, labels = labelled_partition(loop_disks, count=2)
    kms_store.create_volume(store.new_volume("node-registered", node.tpm_hash, partitions=[{"label": labels[0]}]))
    stranger = swtpm_factory(ek_cert=False, fresh=True)
    try:
        with kms(kms_store, enrollment="registered-only") as server_thread:
            encrypt(kms_source(server_thread.url, node), encryption.Selector(label=labels[0]))
            before = blockdev.probe(disk.partitions[1])
            with pytest.raises(KcryptError, match="^attestation failed: Attestation verification failed: "):
                encrypt(kms_source(server_thread.url, stranger), encryption.Selector(label=labels[1]))
            assert_untouched(disk.partitions[1], before)
    finally:
        stranger.stop()
    (volume,) = kms_store.volumes_for(node.tpm_hash)
    entry = volume["spec"]["partitions"][0]
    assert opens_with(disk.partitions[0], secret_value(kms_store, entry["secret"]["name"], entry["secret"]["path"]))
    assert [v["metadata"]["name"] for v in kms_store.list_volumes()] == ["node-registered"]


def test_quarantined_tpm_fails_with_the_kms_message_and_nothing_changes(kms_store, node, loop_disks):
    disk, labels = labelled_partition(loop_disks, count=2)
    with kms(kms_store) as server_thread:
        encrypt(kms_source(server_thread.url, node), encryption.Selector(label=labels[0]))
        (volume,) = kms_store.volumes_for(node.tpm_hash)
        volume["spec"]["quarantined"] = True
        kms_store.update_volume(volume)
        header_before = blockdev.probe(disk.partitions[0])
        plain_before = blockdev.probe(disk.partitions[1])
        for label in labels:  # the encrypted one (key test) and the plain one (key fetch) both stop
            with pytest.raises(KcryptError, match="TPM is quarantined"):
                encrypt(kms_source(server_thread.url, node, kms_attempts=30, kms_retry_delay=1.0), encryption.Selector(label=label))
        assert_untouched(disk.partitions[0], header_before)
        assert_untouched(disk.partitions[1], plain_before)


def test_legacy_protocol_generated_key(kms_store, node, loop_disks):
    disk, (label,) = labelled_partition(loop_disks)
    kms_store.create_volume(store.new_volume("legacy-node", node.tpm_hash, partitions=[{"label": label}]))
    with kms(kms_store) as server_thread:
        source = kms_source(server_thread.url, node, kms_protocol="legacy")
        encrypt(source, encryption.Selector(label=label))
        (passphrase,) = source.secrets
        assert len(passphrase) == 32  # generated on the node, stored at the KMS only as TPM ciphertext
        secret = kms_store.get_secret(("legacy-node-%s" % label).lower().replace("_", "-"))
        assert secret["data"]["generated_by"] == b"tpm" and passphrase not in secret["data"]["passphrase"]
        assert opens_with(disk.partitions[0], passphrase)
        again = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place", options=fast_options())
        assert [p.action for p in encryption.plan(again, kms_source(server_thread.url, node, kms_protocol="legacy"))] == ["none"]


def test_tls_pinned_ca_file_and_untrusted_certificate(tmp_path, node, loop_disks):
    disk, labels = labelled_partition(loop_disks, count=2)
    pki = make_pki(str(tmp_path))
    port = free_port()
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
            "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]]
    with ChallengerProcess(args, port, log_path=str(tmp_path / "kms.log"), tls=True) as process:
        # the certificate option as a file path; PEM text works the same (client tests)
        encrypt(kms_source(process.url, node, certificate=pki["ca.pem"]), encryption.Selector(label=labels[0]))
        assert blockdev.probe(disk.partitions[0]).fstype == "crypto_LUKS"
        before = blockdev.probe(disk.partitions[1])
        with pytest.raises(KcryptError, match="x509: certificate signed by unknown authority"):
            encrypt(kms_source(process.url, node), encryption.Selector(label=labels[1]))
        assert_untouched(disk.partitions[1], before)


def test_mdns_resolved_kms(tmp_path, node, loop_disks):
    """mdns + mdns_interfaces reach the client: the .local name is resolved on 127.0.0.1 only."""
    import os

    disk, (label,) = labelled_partition(loop_disks)
    port = free_port()
    host = "kcrypt-node-%d.local" % os.getpid()
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
            "--mdns-host", host, "--mdns-interface", "127.0.0.1"]
    with ChallengerProcess(args, port, log_path=str(tmp_path / "kms.log")):
        source = kms_source("http://%s:%d" % (host, port), node, mdns=True, mdns_interfaces=["127.0.0.1"])
        encrypt(source, encryption.Selector(label=label))
        (passphrase,) = source.secrets
    assert opens_with(disk.partitions[0], passphrase)
