# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Open a store from its URL: the one place that chooses a backend (SQLite or Kubernetes).

Private to the collection. The server, the admin CLI and ``kairos_sealedvolume`` all
open their store here, so a URL (or the module's ``backend`` option) means the same store everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from urllib.parse import parse_qsl, urlsplit

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store_kubernetes, store_sqlite
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import StoreError


def open_store(url, **options):
    """Open a store from a URL; keyword options override the URL's query parameters.

    * ``sqlite:///abs/path/kms.db`` (also a bare absolute path) — options:
      ``key_file`` (default ``<db>.key``), ``namespace`` (default ``kcrypt``),
      ``busy_timeout`` (seconds, default 30), ``create`` (default true: create the
      database and key file if missing; false: fail instead).
    * ``kubernetes://`` — options: ``namespace`` (default: the pod's namespace in a
      cluster, else ``kcrypt``), ``kubeconfig`` (path; default: in-cluster config, then
      ``$KUBECONFIG``/``~/.kube/config``), ``context``, ``timeout`` (seconds, default 10).

    Example: ``kubernetes://?namespace=kcrypt&kubeconfig=/etc/kcrypt/kubeconfig&context=prod``.
    """
    scheme, path, query = parse_store_url(url)
    query.update({k: v for k, v in options.items() if v is not None})
    if scheme == "sqlite":
        return store_sqlite.SQLiteStore(path, **query)
    if scheme == "kubernetes":
        query.pop("create", None)  # a namespace needs no creating
        return store_kubernetes.KubernetesStore(**query)
    raise StoreError("unsupported store URL %r: use sqlite:///path/to/kms.db or kubernetes://?namespace=NS" % url)


def parse_store_url(url):
    """Split a store URL into (scheme, path, options dict)."""
    if not url:
        raise StoreError("no store given: use sqlite:///path/to/kms.db or kubernetes://?namespace=NS")
    if url.startswith("/"):
        return "sqlite", url, {}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=False))
    if parts.scheme == "sqlite":
        path = parts.path
        if parts.netloc:  # sqlite://relative/path is ambiguous: refuse it
            raise StoreError("SQLite store URL %r must hold an absolute path: sqlite:///abs/path/kms.db" % url)
        if not path.startswith("/"):
            raise StoreError("SQLite store URL %r must hold an absolute path: sqlite:///abs/path/kms.db" % url)
        return "sqlite", path, query
    if parts.scheme in ("kubernetes", "k8s"):
        if parts.netloc or parts.path not in ("", "/"):
            raise StoreError("Kubernetes store URL %r takes only options: kubernetes://?namespace=NS&kubeconfig=PATH&context=CTX" % url)
        return "kubernetes", "", query
    raise StoreError("unsupported store URL %r: use sqlite:///path/to/kms.db or kubernetes://?namespace=NS" % url)


# kairos_sealedvolume's ``backend`` option, and what to do when the embedded store does not exist yet.
BACKENDS = ("embedded", "kubernetes")
IF_MISSING = ("create", "none", "empty")


@contextlib.contextmanager
def backend_store(backend, store_path=None, key_file=None, kubeconfig=None, context=None, namespace=None, if_missing="create"):
    """The store a ``backend`` option names (like community.crypto's select_backend), closed afterwards.

    ``embedded``: the SQLite store at ``store_path`` (``key_file`` defaults to ``<store_path>.key``);
    ``kubernetes``: SealedVolumes and Secrets in ``namespace``, through ``kubeconfig`` and ``context``.
    When the embedded store does not exist, ``if_missing`` says what to yield: ``create`` it,
    ``none`` (nothing to read or remove), or ``empty``: a throwaway empty store, removed
    afterwards, to plan against without creating the real one (check mode).
    """
    if backend not in BACKENDS:
        raise StoreError("unknown store backend %r: use %s" % (backend, " or ".join(BACKENDS)))
    if if_missing not in IF_MISSING:
        raise ValueError("if_missing must be one of %s" % ", ".join(IF_MISSING))
    scratch = None
    if backend == "kubernetes":
        store = open_store("kubernetes://", kubeconfig=kubeconfig, context=context, namespace=namespace)
    elif not store_path or not os.path.isabs(store_path):
        raise StoreError("the embedded store needs an absolute store path, got %r" % (store_path,))
    elif os.path.exists(store_path) or if_missing == "create":
        store = open_store("sqlite://" + store_path, key_file=key_file)
    elif if_missing == "none":
        store = None
    else:
        scratch = tempfile.mkdtemp(prefix="kcrypt-empty-store-")
        try:
            store = open_store("sqlite://" + os.path.join(scratch, "kms.db"))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    try:
        yield store
    finally:
        if store is not None:
            store.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
