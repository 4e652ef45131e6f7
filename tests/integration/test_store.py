# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Store contract, run against every backend (SQLite file, emulated API, real cluster if KUBECONFIG)."""

from __future__ import annotations

import threading

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st

HASH_A = "a" * 64
HASH_B = "b" * 64


def volume(name, tpm_hash=HASH_A, label="COS_PERSISTENT", **kwargs):
    return st.new_volume(name, tpm_hash, [{"label": label}], **kwargs)


def test_ping_and_empty(store):
    store.ping()
    assert store.list_volumes() == []
    assert store.find_volume(HASH_A) is None
    assert store.get_volume("nope") is None
    assert store.get_secret("nope") is None


def test_volume_round_trip_keeps_the_crd_shape(store):
    attestation = {"ekPublicKey": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                   "pcrValues": {"pcrs": {"0": "", "7": "ab" * 32}},
                   "enrolledAt": "2025-01-01T00:00:00Z", "lastVerifiedAt": "2025-01-02T00:00:00Z"}
    doc = st.new_volume("node-1", HASH_A, [{"label": "COS_PERSISTENT", "deviceName": "vda5", "uuid": "u-1",
                                            "secret": {"name": "s", "path": "p"}}],
                        quarantined=True, attestation=attestation)
    created = store.create_volume(doc)
    assert created["metadata"]["resourceVersion"]
    assert created["metadata"]["namespace"] == store.namespace
    read = store.get_volume("node-1")
    assert read["apiVersion"] == "keyserver.kairos.io/v1alpha1" and read["kind"] == "SealedVolume"
    assert read["spec"] == doc["spec"]
    assert read["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert read["metadata"]["creationTimestamp"]


def test_find_volume_is_first_in_name_order_and_exact(store):
    store.create_volume(volume("zeta", HASH_A))
    store.create_volume(volume("alpha", HASH_A, label="OTHER"))
    store.create_volume(volume("beta", HASH_B))
    assert [st.volume_name(v) for v in store.list_volumes()] == ["alpha", "beta", "zeta"]
    assert [st.volume_name(v) for v in store.volumes_for(HASH_A)] == ["alpha", "zeta"]
    assert st.volume_name(store.find_volume(HASH_A)) == "alpha"
    assert store.find_volume(HASH_A.upper()) is None  # exact, case-sensitive (upstream)


def test_create_twice_is_already_exists(store):
    store.create_volume(volume("node-1"))
    with pytest.raises(st.AlreadyExists):
        store.create_volume(volume("node-1", HASH_B))
    assert store.get_volume("node-1")["spec"]["TPMHash"] == HASH_A


def test_update_is_optimistic(store):
    first = store.create_volume(volume("node-1"))
    stale = store.get_volume("node-1")
    first["spec"]["quarantined"] = True
    updated = store.update_volume(first)
    assert updated["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    assert store.get_volume("node-1")["spec"]["quarantined"] is True
    stale["spec"]["partitions"].append({"label": "COS_OEM"})
    with pytest.raises(st.Conflict):
        store.update_volume(stale)  # read before the first update: rejected, nothing written
    assert len(store.get_volume("node-1")["spec"]["partitions"]) == 1
    # removing a key is a real replace, not a merge
    current = store.get_volume("node-1")
    del current["spec"]["quarantined"]
    store.update_volume(current)
    assert "quarantined" not in store.get_volume("node-1")["spec"]


def test_update_missing_or_without_version(store):
    with pytest.raises((st.NotFound, st.Conflict)):
        store.update_volume(dict(volume("ghost"), metadata={"name": "ghost", "resourceVersion": "1"}))
    store.create_volume(volume("node-1"))
    with pytest.raises(st.Conflict):
        store.update_volume(volume("node-1"))  # no resourceVersion: never a blind overwrite


def test_delete_volume(store):
    store.create_volume(volume("node-1"))
    assert store.delete_volume("node-1") is True
    assert store.get_volume("node-1") is None
    assert store.delete_volume("node-1") is False


def test_secret_round_trip_binary_and_labels(store):
    data = {"passphrase": b"\x00\xffsecret\nwith newline", "generated_by": b"tpm"}
    created = store.create_secret(st.new_secret("s-1", data, labels={"kcrypt.kairos.io/partition": "COS_OEM"}))
    assert created["metadata"]["resourceVersion"]
    read = store.get_secret("s-1")
    assert read["data"] == data
    assert read["type"] == "Opaque"
    assert read["metadata"]["labels"]["kcrypt.kairos.io/partition"] == "COS_OEM"
    with pytest.raises(st.AlreadyExists):
        store.create_secret(st.new_secret("s-1", {"passphrase": b"other"}))
    assert store.get_secret("s-1")["data"] == data  # never overwritten by a create


def test_secret_update_and_delete(store):
    store.create_secret(st.new_secret("s-1", {"passphrase": b"one"}))
    stale = store.get_secret("s-1")
    current = store.get_secret("s-1")
    current["data"]["passphrase"] = b"two"
    store.update_secret(current)
    assert store.get_secret("s-1")["data"]["passphrase"] == b"two"
    stale["data"]["passphrase"] = b"three"
    with pytest.raises(st.Conflict):
        store.update_secret(stale)
    assert store.delete_secret("s-1") is True
    assert store.get_secret("s-1") is None
    assert store.delete_secret("s-1") is False


@pytest.mark.parametrize("spec, message", [
    ({"TPMHash": HASH_A, "partitionSecrets": {}}, "unknown key"),
    ({"TPMHash": HASH_A, "partitions": [{"label": "x", "secret": {"name": "a", "key": "b"}}]}, "unknown key"),
    ({"TPMHash": 5}, "must be a string"),
    ({"TPMHash": HASH_A, "quarantined": "yes"}, "true or false"),
    ({"TPMHash": HASH_A, "attestation": {"pcrValues": {"pcrs": {"zero": "aa"}}}}, "decimal"),
])
def test_invalid_documents_are_refused_and_nothing_written(store, spec, message):
    doc = {"apiVersion": st.API_VERSION, "kind": "SealedVolume", "metadata": {"name": "bad"}, "spec": spec}
    with pytest.raises(st.InvalidDocument, match=message):
        store.create_volume(doc)
    assert store.get_volume("bad") is None


def test_concurrent_creates_of_one_name_have_one_winner(store_target):
    stores = [store_target.open() for _index in range(4)]
    results = []
    barrier = threading.Barrier(8)

    def create(index):
        barrier.wait()
        try:
            stores[index % 4].create_secret(st.new_secret("same", {"passphrase": str(index).encode()}))
            results.append(("created", index))
        except st.AlreadyExists:
            results.append(("exists", index))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        created = [index for outcome, index in results if outcome == "created"]
        assert len(results) == 8 and len(created) == 1
        assert stores[0].get_secret("same")["data"]["passphrase"] == str(created[0]).encode()
    finally:
        for opened in stores:
            opened.close()


def test_yaml_export_import_round_trip(store, tmp_path):
    from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore

    store.create_volume(volume("node-1", attestation={}))
    store.create_secret(st.new_secret("node-1-cos-persistent", {"passphrase": b"p\x00ss"}))
    text = st.dump_yaml(store.list_volumes() + [store.get_secret("node-1-cos-persistent")])
    assert "resourceVersion" not in text and "p\x00ss" not in text
    volumes, secrets = st.load_yaml(text, namespace="elsewhere")
    other = SQLiteStore(str(tmp_path / "other.db"), namespace="elsewhere")
    try:
        for doc in volumes:
            other.create_volume(doc)
        for doc in secrets:
            other.create_secret(doc)
        assert other.get_volume("node-1")["spec"] == store.get_volume("node-1")["spec"]
        assert other.get_secret("node-1-cos-persistent")["data"] == {"passphrase": b"p\x00ss"}
    finally:
        other.close()
