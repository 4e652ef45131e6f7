# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Store fixtures shared by every integration test that needs a challenger store.

``store_target`` is parameterised over the backends, so a test that takes it (or
``store``) runs once per backend:

* ``sqlite`` — a fresh SQLite file in the test's tmp_path;
* ``kubernetes`` — a fresh namespace on the kmock-based API emulator
  (tests/support/kube_api.py, one process per session, CRD from deploy/kubernetes/crd.yaml);
* ``cluster`` — a fresh namespace on the real cluster of ``$KUBECONFIG``; skipped
  unless KUBECONFIG is set. The namespace is deleted afterwards.

``store_target.url`` is what ``open_store`` and ``kcrypt-challenger --store`` take;
``store_target.open()`` returns a Store (close it, or use ``store``).
"""

from __future__ import annotations

import pytest

from support import stores
from support.kube_api import KubeAPI
from support.stores import STORE_BACKENDS, install_crd, make_store_target


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory):
    """The API emulator (one process for the session) with the SealedVolume CRD installed."""
    api = KubeAPI(str(tmp_path_factory.mktemp("kube-api"))).start()
    try:
        install_crd(api.kubeconfig)
        yield api
    finally:
        api.stop()


@pytest.fixture
def real_cluster_namespace():
    """A fresh namespace on $KUBECONFIG's cluster (CRD installed), deleted afterwards; skipped without KUBECONFIG."""
    yield from stores.real_cluster_namespace()


@pytest.fixture(params=STORE_BACKENDS)
def store_target(request, tmp_path):
    return make_store_target(request.param, request, tmp_path)


@pytest.fixture
def store(store_target):
    opened = store_target.open()
    try:
        yield opened
    finally:
        opened.close()
