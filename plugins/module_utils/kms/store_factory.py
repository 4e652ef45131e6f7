# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Open a store from its URL: the one place that chooses a backend (SQLite or Kubernetes).

Private to the collection. The server, the admin CLI and ``kairos_sealedvolume`` all
open their store here, so a URL means the same store everywhere.
"""

from __future__ import annotations

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
