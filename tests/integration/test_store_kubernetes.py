# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What only the Kubernetes store has: configuration, API errors, upstream-shaped objects (emulated API)."""

from __future__ import annotations

import socket

import pytest
from kubernetes import client, config

from ansible_collections.kairos.kcrypt.plugins.module_utils import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.policy import Policy
from support.kube_api import KubeAPI

HASH = "c" * 64


def test_missing_crd_is_a_clear_error(tmp_path):
    api = KubeAPI(str(tmp_path)).start()  # a fresh API without the CRD
    try:
        store = st.open_store("kubernetes://?kubeconfig=%s&namespace=kcrypt" % api.kubeconfig)
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
    store = st.open_store("kubernetes://", kubeconfig=kubeconfig, namespace="kcrypt", timeout=2)
    with pytest.raises(st.StoreUnavailable, match="cannot be reached"):
        store.ping()
    store.close()
    with pytest.raises(st.StoreUnavailable, match="cannot load the Kubernetes configuration"):
        st.open_store("kubernetes://", kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(st.StoreUnavailable, match="cannot load the Kubernetes configuration"):
        st.open_store("kubernetes://", kubeconfig=kubeconfig, context="no-such-context")


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
    with st.open_store("kubernetes://?kubeconfig=%s&namespace=%s" % (kube_api.kubeconfig, namespace)) as store:
        policy = Policy(store)
        assert policy.issue_passphrase(HASH, "PEM", {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) == b"static from kubectl"
        assert store.get_volume("test2")["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": "aa"}}
        assert policy.legacy_get_pass(HASH, PartitionRef(label="COS_PERSISTENT"))["passphrase"] == "static from kubectl"


def test_store_url_describes_the_api_without_credentials(kube_api):
    with st.open_store("kubernetes://?kubeconfig=%s&namespace=ns1" % kube_api.kubeconfig) as store:
        assert store.namespace == "ns1"
        assert store.url == "kubernetes://%s?namespace=ns1" % kube_api.url
        assert "token" not in store.url
