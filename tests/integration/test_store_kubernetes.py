# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What only the Kubernetes store has: configuration, API errors, upstream-shaped objects (emulated API)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import yaml
from kubernetes import client, config

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import recovery, store as st, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import TPM_HASH_LABEL, safe_kube_name
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy
from support.kube_api import KubeAPI

HASH = "c" * 64


def test_missing_crd_is_a_clear_error(tmp_path):
    api = KubeAPI(str(tmp_path)).start()  # a fresh API without the CRD
    try:
        store = store_factory.open_store("kubernetes://?kubeconfig=%s&namespace=kcrypt" % api.kubeconfig)
        with pytest.raises(st.StoreUnavailable, match="CRD .* is not installed.*deploy/kubernetes/crd.yaml"):
            store.ping()
        store.close()
    finally:
        api.stop()


def test_unreachable_api_and_bad_kubeconfig(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    api = KubeAPI(str(tmp_path))
    api.port = port
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
    store = store_factory.open_store("kubernetes://", kubeconfig=kubeconfig, namespace="kcrypt", timeout=2)
    with pytest.raises(st.StoreUnavailable, match="cannot be reached"):
        store.ping()
    store.close()
    with pytest.raises(st.StoreUnavailable, match="cannot load the Kubernetes configuration"):
        store_factory.open_store("kubernetes://", kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(st.StoreUnavailable, match="cannot load the Kubernetes configuration"):
        store_factory.open_store("kubernetes://", kubeconfig=kubeconfig, context="no-such-context")


def test_objects_written_by_upstream_tools_are_served(kube_api):
    """A SealedVolume and a stringData Secret created the way kubectl would, then used by our policy."""
    namespace = "kcrypt-upstream-objects"
    api = config.new_client_from_config(config_file=kube_api.kubeconfig)
    try:
        client.CoreV1Api(api).create_namespaced_secret(namespace, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mysecret"}, "type": "Opaque",
            "stringData": {"pass": "static from kubectl"}})
        client.CustomObjectsApi(api).create_namespaced_custom_object(st.GROUP, st.VERSION, namespace, st.PLURAL, {
            "apiVersion": st.API_VERSION, "kind": "SealedVolume", "metadata": {"name": "test2"},
            "spec": {"TPMHash": HASH, "partitions": [{"label": "COS_PERSISTENT", "secret": {"name": "mysecret", "path": "pass"}}],
                     "quarantined": False}})
    finally:
        api.close()
    with store_factory.open_store("kubernetes://?kubeconfig=%s&namespace=%s" % (kube_api.kubeconfig, namespace)) as store:
        policy = Policy(store)
        assert policy.legacy_get_pass(HASH, PartitionRef(label="COS_PERSISTENT"))["passphrase"] == "static from kubectl"
        assert policy.issue_passphrase(HASH, "PEM", {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) == b"static from kubectl"
        assert store.get_volume("test2")["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": "aa"}}
        # enrolled through /tpm-attestation now: the quote-less legacy protocol no longer serves it
        assert "requires the attestation protocol" in policy.legacy_get_pass(HASH, PartitionRef(label="COS_PERSISTENT"))["error"]


def test_store_url_describes_the_api_without_credentials(kube_api):
    with store_factory.open_store("kubernetes://?kubeconfig=%s&namespace=ns1" % kube_api.kubeconfig) as store:
        assert store.namespace == "ns1"
        assert store.url == "kubernetes://%s?namespace=ns1" % kube_api.url
        assert "token" not in store.url


class ListCounter(object):
    """Wraps the store's CustomObjectsApi: records the label selector and item count of every list."""

    def __init__(self, api):
        self._api, self.lists = api, []

    def __getattr__(self, name):
        return getattr(self._api, name)

    def list_namespaced_custom_object(self, *args, **kwargs):
        response = self._api.list_namespaced_custom_object(*args, **kwargs)
        self.lists.append((kwargs.get("label_selector", ""), len(json.loads(response.data)["items"])))
        return response


def kubectl_volume(kube_api, namespace, name, tpm_hash, labels=None):
    """A SealedVolume made the way kubectl or upstream's server make it (no tpm-hash label unless given)."""
    api = config.new_client_from_config(config_file=kube_api.kubeconfig)
    try:
        metadata = {"name": name, "labels": labels} if labels else {"name": name}
        client.CustomObjectsApi(api).create_namespaced_custom_object(st.GROUP, st.VERSION, namespace, st.PLURAL, {
            "apiVersion": st.API_VERSION, "kind": "SealedVolume", "metadata": metadata,
            "spec": {"TPMHash": tpm_hash, "partitions": [{"label": "L"}]}})
    finally:
        api.close()


def test_tpm_hash_label_is_the_lookup_index(kube_api):
    """A known TPM costs one list of its own volumes; the namespace is never listed whole."""
    namespace = "kcrypt-label-index"
    url = "kubernetes://?kubeconfig=%s&namespace=%s" % (kube_api.kubeconfig, namespace)
    hashes = ["%064x" % (0xD00 + n) for n in range(20)]
    with store_factory.open_store(url) as store:
        for number, tpm_hash in enumerate(hashes):
            created = store.create_volume(st.new_volume("node-%02d" % number, tpm_hash, [{"label": "L"}]))
            assert created["metadata"]["labels"][TPM_HASH_LABEL] == safe_kube_name(tpm_hash)
        store.custom = counter = ListCounter(store.custom)
        assert st.volume_name(store.find_volume(hashes[7])) == "node-07"
        assert counter.lists == [("%s=%s" % (TPM_HASH_LABEL, safe_kube_name(hashes[7])), 1)]
        counter.lists[:] = []
        assert store.find_volume("e" * 64) is None  # unknown: its label, then the unlabelled volumes (none)
        assert counter.lists == [("%s=%s" % (TPM_HASH_LABEL, safe_kube_name("e" * 64)), 0), ("!" + TPM_HASH_LABEL, 0)]


def test_volume_without_the_label_is_found_and_labelled_at_its_first_attestation(kube_api):
    """Upstream's server and kubectl write no tpm-hash label on SealedVolumes: found, then indexed."""
    namespace = "kcrypt-label-backfill"
    url = "kubernetes://?kubeconfig=%s&namespace=%s" % (kube_api.kubeconfig, namespace)
    other = "e" * 64
    kubectl_volume(kube_api, namespace, "theirs", other)
    kubectl_volume(kube_api, namespace, "bystander", "f" * 64)
    with store_factory.open_store(url) as store:
        store.create_volume(st.new_volume("ours", HASH, [{"label": "L"}]))
        store.custom = counter = ListCounter(store.custom)
        before = store.get_volume("theirs")["metadata"]["resourceVersion"]
        assert [st.volume_name(v) for v in store.volumes_for(other)] == ["theirs"]
        assert counter.lists[-1] == ("!" + TPM_HASH_LABEL, 2)  # only the two unlabelled volumes were read
        assert store.get_volume("theirs")["metadata"]["resourceVersion"] == before  # a lookup writes nothing
        assert store.needs_index(store.get_volume("theirs")) and not store.needs_index(store.get_volume("ours"))

        Policy(store).issue_passphrase(other, "PEM", {"0": "aa"}, PartitionRef(label="L"))  # its TPM proved itself
        assert store.get_volume("theirs")["metadata"]["labels"][TPM_HASH_LABEL] == safe_kube_name(other)
        counter.lists[:] = []
        assert st.volume_name(store.find_volume(other)) == "theirs"
        assert counter.lists == [("%s=%s" % (TPM_HASH_LABEL, safe_kube_name(other)), 1)]
        assert "labels" not in store.get_volume("bystander")["metadata"]  # no other TPM's volume was touched


def test_a_lying_label_is_not_trusted_and_reindex_repairs_it(kube_api, capsys):
    """A label naming another TPM (spec.TPMHash edited by hand) never hands out that volume; reindex fixes it."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger

    namespace = "kcrypt-label-liar"
    url = "kubernetes://?kubeconfig=%s&namespace=%s" % (kube_api.kubeconfig, namespace)
    other, edited = "e" * 64, "f" * 64
    kubectl_volume(kube_api, namespace, "theirs", other)
    kubectl_volume(kube_api, namespace, "liar", edited, labels={TPM_HASH_LABEL: safe_kube_name(other)})
    with store_factory.open_store(url) as store:
        assert [st.volume_name(v) for v in store.volumes_for(other)] == ["theirs"]  # the lying label is not trusted
        assert store.find_volume(edited) is None  # until the index is repaired
    assert challenger.main(["reindex", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "SealedVolume liar: indexed" in out and "SealedVolume theirs: indexed" in out and "2 SealedVolume(s)" in out
    with store_factory.open_store(url) as store:
        assert st.volume_name(store.find_volume(edited)) == "liar"
        assert st.volume_name(store.find_volume(other)) == "theirs"
        theirs = store.get_volume("theirs")
        theirs["spec"]["quarantined"] = True
        assert store.update_volume(theirs)["metadata"]["labels"][TPM_HASH_LABEL] == safe_kube_name(other)
    assert challenger.main(["reindex", "--store", url]) == 0
    assert "0 SealedVolume(s) indexed" in capsys.readouterr().out


# API method -> (resource, RBAC verb, index of the namespace among the positional arguments)
API_VERBS = {
    "list_namespaced_custom_object": ("sealedvolumes", "list", 2), "get_namespaced_custom_object": ("sealedvolumes", "get", 2),
    "create_namespaced_custom_object": ("sealedvolumes", "create", 2),
    "replace_namespaced_custom_object": ("sealedvolumes", "update", 2),
    "delete_namespaced_custom_object": ("sealedvolumes", "delete", 2),
    "read_namespaced_secret": ("secrets", "get", 1), "create_namespaced_secret": ("secrets", "create", 0),
    "replace_namespaced_secret": ("secrets", "update", 1), "delete_namespaced_secret": ("secrets", "delete", 1),
    "create_namespaced_event": ("events", "create", 0), "list_namespaced_event": ("events", "list", 0),
}


class Recorder(object):
    """Wraps a kubernetes API object and records which RBAC (namespace, resource, verb) each call needs."""

    def __init__(self, api, used):
        self._api, self._used = api, used

    def __getattr__(self, name):
        method = getattr(self._api, name)

        def call(*args, **kwargs):
            resource, verb, where = API_VERBS[name]  # KeyError: a call nobody mapped to RBAC yet
            self._used.add((args[where], resource, verb))
            return method(*args, **kwargs)
        return call


def granted_by(items, name, namespace):
    """{(namespace, resource, verb)} of the Role ``name`` in the manifest namespace ``namespace``."""
    (role,) = [i for i in items if i["kind"] == "Role" and i["metadata"]["name"] == name and i["metadata"]["namespace"] == namespace]
    return {(namespace, resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_role_grants_exactly_what_the_server_uses(kube_api, repo_root):
    """Every server code path through the store, recorded; the Roles in deploy/kubernetes/rbac.yaml must match:
    in the recovery namespace the server writes recovery keys and reads nothing, the reader reads and records."""
    used = set()
    url = "kubernetes://?kubeconfig=%s&namespace=kcrypt&recovery_namespace=kcrypt-recovery" % kube_api.kubeconfig
    with store_factory.open_store(url) as store:
        store.custom, store.core = Recorder(store.custom, used), Recorder(store.core, used)
        policy = Policy(store)
        pcrs = {"0": "aa", "7": "bb"}
        policy.issue_passphrase(HASH, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"))  # TOFU
        policy.issue_passphrase(HASH, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"))  # next boot
        policy.issue_passphrase(HASH, "PEM", pcrs, PartitionRef(label="COS_OEM"))  # new partition
        legacy = "9" * 64  # a legacy registration (no attestation): the legacy endpoints serve only such TPMs
        store.create_volume(st.new_volume("legacy-node", legacy, [{"label": "COS_OEM"}]))
        assert policy.legacy_post_pass(legacy, PartitionRef(label="COS_OEM"), {"passphrase": "x", "generated_by": "tpm"})
        assert policy.legacy_get_pass(legacy, PartitionRef(label="COS_OEM"))["passphrase"] == "x"
        policy.escrow_recovery_key(HASH, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"), b"r" * 71)  # escrow
        policy.escrow_recovery_key(HASH, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"), b"s" * 71)  # rotation
        store.ping()
        read = set()
        store.custom, store.core = Recorder(store.custom._api, read), Recorder(store.core._api, read)
        (found,) = recovery.reveal(store, HASH, "rbac test", partition="COS_PERSISTENT")
        assert found["recovery_key"] == b"s" * 71
        recovery.reveal(store, found["sealedvolume"], "rbac test", show_key=False)  # by name, both partitions
        assert [(e["action"], e["partition"]) for e in store.audit_events()] == [
            ("recovery-key-revealed", "COS_PERSISTENT"), ("recovery-key-checked", "COS_PERSISTENT"), ("recovery-key-checked", "COS_OEM")]
    with open(os.path.join(repo_root, "deploy", "kubernetes", "rbac.yaml")) as handle:
        items = yaml.safe_load(handle)["items"]
    assert used == granted_by(items, "kcrypt-challenger", "kcrypt") | granted_by(items, "kcrypt-challenger-recovery", "kcrypt-recovery")
    assert not {verb for namespace, resource, verb in used if namespace == "kcrypt-recovery"} & {"get", "list", "watch", "patch"}
    assert read == granted_by(items, "kcrypt-recovery-reader", "kcrypt") | granted_by(items, "kcrypt-recovery-reader", "kcrypt-recovery")
    bindings = {i["metadata"]["name"]: i for i in items if i["kind"] == "RoleBinding"}
    assert bindings["kcrypt-challenger-recovery"]["metadata"]["namespace"] == "kcrypt-recovery"
    assert bindings["kcrypt-challenger-recovery"]["subjects"] == [{"kind": "ServiceAccount", "name": "kcrypt-challenger", "namespace": "kcrypt"}]
    assert "kcrypt-recovery-reader" not in bindings  # bound by the operator to the administrators only
