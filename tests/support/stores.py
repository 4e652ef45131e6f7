# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Store targets for tests: a fresh SQLite file, a namespace on the API emulator, or on a real cluster.

Used by tests/integration/conftest.py (``store_target``/``store`` fixtures) and by
tests that pick backends themselves (``make_store_target``).
"""

from __future__ import annotations

import os
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRD_PATH = os.path.join(ROOT, "deploy", "kubernetes", "crd.yaml")
STORE_BACKENDS = ["sqlite", "kubernetes", "cluster"]


class StoreTarget(object):
    def __init__(self, kind, url, kubeconfig=None, namespace=None, path=None):
        self.kind = kind
        self.url = url
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.path = path  # SQLite file

    def open(self, **options):
        from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store

        return open_store(self.url, **options)

    def __repr__(self):
        return "StoreTarget(%s)" % self.url


def install_crd(kubeconfig, context=None):
    """Create the SealedVolume CRD from deploy/kubernetes/crd.yaml unless it exists."""
    import yaml
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig, context=context)
    try:
        crd = [d for d in yaml.safe_load_all(open(CRD_PATH)) if d][0]
        try:
            client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        except client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
    finally:
        api.close()


def unique_namespace():
    return "kcrypt-store-%s" % uuid.uuid4().hex[:10]


def real_cluster_namespace():
    """A fresh namespace on $KUBECONFIG's cluster (CRD installed), deleted afterwards (generator fixture body)."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        pytest.skip("KUBECONFIG is not set: no real cluster to test against")
    from kubernetes import client, config

    install_crd(kubeconfig)
    namespace = unique_namespace()
    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        yield kubeconfig, namespace
    finally:
        core.delete_namespace(namespace)
        api.close()


def make_store_target(kind, request, tmp_path):
    if kind == "sqlite":
        path = str(tmp_path / "kms.db")
        return StoreTarget("sqlite", "sqlite://" + path, path=path)
    if kind == "kubernetes":
        api = request.getfixturevalue("kube_api")
        namespace = unique_namespace()
        return StoreTarget("kubernetes", "kubernetes://?kubeconfig=%s&namespace=%s" % (api.kubeconfig, namespace),
                           kubeconfig=api.kubeconfig, namespace=namespace)
    kubeconfig, namespace = request.getfixturevalue("real_cluster_namespace")
    return StoreTarget("cluster", "kubernetes://?kubeconfig=%s&namespace=%s" % (kubeconfig, namespace),
                       kubeconfig=kubeconfig, namespace=namespace)
