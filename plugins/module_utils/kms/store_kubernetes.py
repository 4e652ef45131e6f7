# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Kubernetes store: SealedVolume custom resources and Secrets in one namespace.

Private to the collection. Objects are exactly upstream's (``keyserver.kairos.io/v1alpha1``
SealedVolumes, Opaque Secrets), so our server and upstream's can share a namespace.

Unlike upstream, every read goes to the API server (no informer cache): a decision
to create or reuse is never taken on stale data, and updates are PUTs carrying the
``resourceVersion`` they were read at, so a concurrent change (another replica, an
administrator) makes the API server answer 409 Conflict and the policy starts over.
Creates of the same name from two replicas: one wins, the other gets 409 AlreadyExists.

Looking a TPM up must not read every SealedVolume on every boot of a large fleet, and
``spec.TPMHash`` is not a selectable field. So every volume this store writes carries the
label ``kcrypt.kairos.io/tpm-hash: SafeKubeName(hash)`` (its index, as SQLite's column; the
same label upstream puts on its Secrets), and ``volumes_for`` asks for that label. Volumes
written by other tools (upstream's server, kubectl, GitOps) lack it: when the label finds
nothing, the lookup lists only the volumes *without* the label (``!kcrypt.kairos.io/tpm-hash``),
which is empty once every volume has been labelled. The server labels such a volume at the
first attestation of its TPM (``needs_index``: the policy then writes it back), the admin
tools whenever they write one, and ``kcrypt-challenger reindex`` all at once. Nothing here
lists the whole namespace per lookup: a known TPM costs one small list, an unknown one two.

A label that no longer matches ``spec.TPMHash`` (the hash edited by hand, label kept) is
never trusted, and such a volume is found again only after ``reindex`` (docs/store.md).

Recovery keys are Secrets in their own namespace (``recovery_namespace``, default ``<namespace>-recovery``),
labelled ``kcrypt.kairos.io/secret-type: recovery-key``. Kubernetes RBAC grants ``get`` on all Secrets of a
namespace or on Secrets named in advance, never by label, so only a namespace of their own lets the KMS
write recovery keys (``create``, and ``update`` to replace one: a PUT answers with what it wrote, nothing
older) without any right to read them; the ``kcrypt-recovery-reader`` Role reads them
(deploy/kubernetes/rbac.yaml). Reveals are recorded as Events next to the Secret.
"""

from __future__ import annotations

import json
import os
import uuid

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import (
    DEFAULT_NAMESPACE,
    GROUP,
    PLURAL,
    VERSION,
    AlreadyExists,
    Conflict,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
    audit_event,
    normalize_secret,
    normalize_volume,
    resource_version,
    secret_to_wire,
)

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    RECOVERY_SECRET_TYPE,
    SECRET_TYPE_LABEL,
    TPM_HASH_LABEL,
    safe_kube_name,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import RELEARN_TO, RELEARN_UNTIL

# Imported when a Kubernetes store is opened (require), not with this file: the client is slow to
# import, and the embedded store's users (the module, the server, the admin commands) never need it.
kclient = optional_import("kubernetes.client", lazy=True)
kconfig = optional_import("kubernetes.config", lazy=True)
urllib3 = optional_import("urllib3", lazy=True)


class CRDPruned(StoreError):
    """The API server dropped fields of a SealedVolume (its CRD is older than the collection's)."""


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
LIST_PAGE = 500
RECOVERY_NAMESPACE_SUFFIX = "-recovery"
AUDIT_EVENT_REASON = "RecoveryKeyRevealed"
AUDIT_ANNOTATION = "kcrypt.kairos.io/audit-event"


def load_api_client(kubeconfig=None, context=None, pool_size=32):
    """An ApiClient from a kubeconfig file, else the in-cluster service account, else the default kubeconfig."""
    require("kubernetes", "for the Kubernetes store")
    configuration = kclient.Configuration()
    try:
        if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config(client_configuration=configuration)
        else:
            kconfig.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (kconfig.ConfigException, OSError, TypeError, ValueError) as exc:
        raise StoreUnavailable("cannot load the Kubernetes configuration%s: %s"
                               % (" from %s" % kubeconfig if kubeconfig else "", exc))
    configuration.connection_pool_maxsize = pool_size  # the server calls from many threads
    return kclient.ApiClient(configuration)


def _check_windows_kept(sent, stored):
    """``stored``, or CRDPruned when the API server dropped PCR upgrade windows (our fields, issue 16) that ``sent``
    had: the cluster runs upstream's CRD, which prunes them. What it kept is written; the old PCR values stay
    enforced, so nothing is weaker than asked; the administrator must know that the window did not open."""
    def windows(doc):
        values = ((doc.get("spec") or {}).get("attestation") or {}).get("pcrValues") or {}
        return {key: values[key] for key in (RELEARN_UNTIL, RELEARN_TO) if values.get(key)}

    lost = sorted(key for key in windows(sent) if key not in windows(stored))
    if lost:
        raise CRDPruned("SealedVolume %s was written, but the cluster's SealedVolume CRD pruned "
                        "spec.attestation.pcrValues.%s (upstream's CRD does not have it): the PCR upgrade window is "
                        "not open and the old values stay enforced. Apply kairos.kcrypt's deploy/kubernetes/crd.yaml "
                        "(a superset of upstream's) and run again." % (stored["metadata"].get("name", ""), " and ".join(lost)))
    return stored


def default_namespace():
    """The pod's own namespace in a cluster, else ``kcrypt`` (upstream's default)."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


class KubernetesStore(Store):
    def __init__(self, namespace=None, kubeconfig=None, context=None, timeout=10, api_client=None, recovery_namespace=None):
        require("kubernetes", "for the Kubernetes store")
        self.namespace = namespace or default_namespace()
        self.recovery_namespace = recovery_namespace or self.namespace + RECOVERY_NAMESPACE_SUFFIX
        if self.recovery_namespace == self.namespace:
            raise StoreError("recovery_namespace must differ from namespace %s: RBAC can deny the KMS reading recovery "
                             "keys only in a namespace of their own (docs/store.md, \"Recovery keys\")" % self.namespace)
        self.timeout = float(timeout)
        self.api = api_client or load_api_client(kubeconfig, context)
        self.core = kclient.CoreV1Api(self.api)
        self.custom = kclient.CustomObjectsApi(self.api)
        where = self.api.configuration.host
        self.url = "kubernetes://%s?namespace=%s" % (where, self.namespace)

    # -- plumbing ------------------------------------------------------------

    def _call(self, what, method, *args, **kwargs):
        """Call the API, return the decoded JSON body; map HTTP errors to store exceptions."""
        kwargs.setdefault("_preload_content", False)
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            response = method(*args, **kwargs)
        except kclient.exceptions.ApiException as exc:
            raise self._error(what, exc)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable("%s: the Kubernetes API at %s cannot be reached: %s" % (what, self.api.configuration.host, exc))
        return json.loads(response.data) if response.data else {}

    def _error(self, what, exc):
        message = exc.reason or ""
        try:
            message = json.loads(exc.body).get("message") or message
        except (TypeError, ValueError, AttributeError):
            pass
        text = "%s: %s" % (what, message)
        if exc.status == 404:
            return NotFound(text)
        if exc.status == 409:
            return Conflict(text)  # the caller knows whether it was a create or an update
        if exc.status in (401, 403):
            return StoreUnavailable("%s: not allowed by the Kubernetes API (check the credentials and RBAC, "
                                    "see deploy/kubernetes/rbac.yaml): %s" % (what, message))
        return StoreUnavailable("%s: the Kubernetes API answered %s: %s" % (what, exc.status, message))

    # -- Store interface -----------------------------------------------------

    def ping(self):
        self.list_volumes(limit=1)

    def list_volumes(self, limit=None, label_selector=None):
        volumes, token = [], None
        while True:
            kwargs = {"limit": limit or LIST_PAGE}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if token:
                kwargs["_continue"] = token
            try:
                page = self._call("listing SealedVolumes in namespace %s" % self.namespace,
                                  self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, **kwargs)
            except NotFound:
                raise StoreUnavailable("the SealedVolume CRD (sealedvolumes.%s) is not installed in the cluster: "
                                       "apply deploy/kubernetes/crd.yaml" % GROUP)
            volumes.extend(self._volume(item) for item in page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token or limit:
                break
        return sorted(volumes, key=lambda v: v["metadata"]["name"])

    def volumes_for(self, tpm_hash):
        """The TPM's labelled volumes (one small list); if none, its volumes among the unlabelled ones.

        With several volumes for one TPM (an operator error the admin tools refuse),
        labelled ones are preferred over unlabelled ones, then name order applies.
        """
        if not tpm_hash:
            return []
        labelled = [v for v in self.list_volumes(label_selector="%s=%s" % (TPM_HASH_LABEL, safe_kube_name(tpm_hash)))
                    if v["spec"].get("TPMHash") == tpm_hash]  # a hand-edited label must not mislead
        if labelled:
            return labelled
        return [v for v in self.list_volumes(label_selector="!" + TPM_HASH_LABEL) if v["spec"].get("TPMHash") == tpm_hash]

    def needs_index(self, volume):
        """True when the volume lacks the tpm-hash label of its spec (``update_volume`` sets it)."""
        return (volume["metadata"].get("labels") or {}).get(TPM_HASH_LABEL) != self._index_label(volume)

    @staticmethod
    def _index_label(volume):
        tpm_hash = volume["spec"].get("TPMHash", "")
        return safe_kube_name(tpm_hash) if tpm_hash else None

    @staticmethod
    def _volume(item):
        item.setdefault("spec", {})
        item.pop("status", None)
        return item

    def get_volume(self, name):
        try:
            return self._volume(self._call("reading SealedVolume %s" % name, self.custom.get_namespaced_custom_object,
                                           GROUP, VERSION, self.namespace, PLURAL, name))
        except NotFound:
            return None

    def _body(self, doc, keep_version):
        body = dict(doc)
        metadata = {k: v for k, v in doc["metadata"].items()
                    if k in ("name", "labels", "annotations") or (keep_version and k == "resourceVersion")}
        metadata["namespace"] = self.namespace
        body["metadata"] = metadata
        return body

    def _volume_body(self, doc, keep_version):
        """A SealedVolume body with the tpm-hash index label set to match its spec."""
        body = self._body(doc, keep_version)
        labels = dict(body["metadata"].get("labels") or {})
        index = self._index_label(doc)
        if index:
            labels[TPM_HASH_LABEL] = index
        else:
            labels.pop(TPM_HASH_LABEL, None)
        body["metadata"]["labels"] = labels
        return body

    def create_volume(self, doc):
        doc = normalize_volume(doc)
        name = doc["metadata"]["name"]
        try:
            stored = self._volume(self._call("creating SealedVolume %s" % name, self.custom.create_namespaced_custom_object,
                                             GROUP, VERSION, self.namespace, PLURAL, self._volume_body(doc, False)))
        except Conflict:
            raise AlreadyExists("SealedVolume %s already exists" % name)
        return _check_windows_kept(doc, stored)

    def update_volume(self, doc):
        doc = normalize_volume(doc)
        name = doc["metadata"]["name"]
        if not resource_version(doc):
            raise Conflict("SealedVolume %s: an update needs the resourceVersion it was read at" % name)
        stored = self._volume(self._call("updating SealedVolume %s" % name, self.custom.replace_namespaced_custom_object,
                                         GROUP, VERSION, self.namespace, PLURAL, name, self._volume_body(doc, True)))
        return _check_windows_kept(doc, stored)

    def delete_volume(self, name):
        try:
            self._call("deleting SealedVolume %s" % name, self.custom.delete_namespaced_custom_object,
                       GROUP, VERSION, self.namespace, PLURAL, name)
            return True
        except NotFound:
            return False

    def get_secret(self, name):
        try:
            raw = self._call("reading Secret %s" % name, self.core.read_namespaced_secret, name, self.namespace)
        except NotFound:
            return None
        return normalize_secret(raw)

    def create_secret(self, doc):
        doc = normalize_secret(doc)
        name = doc["metadata"]["name"]
        try:
            raw = self._call("creating Secret %s" % name, self.core.create_namespaced_secret, self.namespace,
                             secret_to_wire(self._body(doc, False)))
        except Conflict:
            raise AlreadyExists("Secret %s already exists" % name)
        return normalize_secret(raw)

    def update_secret(self, doc):
        doc = normalize_secret(doc)
        name = doc["metadata"]["name"]
        if not resource_version(doc):
            raise Conflict("Secret %s: an update needs the resourceVersion it was read at" % name)
        raw = self._call("updating Secret %s" % name, self.core.replace_namespaced_secret, name, self.namespace,
                         secret_to_wire(self._body(doc, True)))
        return normalize_secret(raw)

    def delete_secret(self, name):
        try:
            self._call("deleting Secret %s" % name, self.core.delete_namespaced_secret, name, self.namespace)
            return True
        except NotFound:
            return False

    def _body_in(self, doc, namespace):
        body = self._body(doc, False)
        body["metadata"]["namespace"] = namespace
        return body

    def put_recovery_secret(self, doc):
        doc = normalize_secret(doc)
        name, namespace = doc["metadata"]["name"], self.recovery_namespace
        body = secret_to_wire(self._body_in(doc, namespace))
        try:
            self._call("creating recovery Secret %s in namespace %s" % (name, namespace),
                       self.core.create_namespaced_secret, namespace, body)
        except Conflict:  # it exists: replace it without reading it (an unconditional PUT, allowed for Secrets)
            self._call("replacing recovery Secret %s in namespace %s" % (name, namespace),
                       self.core.replace_namespaced_secret, name, namespace, body)

    def get_recovery_secret(self, name):
        try:
            raw = self._call("reading recovery Secret %s in namespace %s" % (name, self.recovery_namespace),
                             self.core.read_namespaced_secret, name, self.recovery_namespace)
        except NotFound:
            return None
        return normalize_secret(raw)

    def record_audit_event(self, event):
        """A v1 Event on the recovery Secret (``kubectl describe secret`` shows it), the whole record in an annotation."""
        event = audit_event(**event)
        stamp = event["time"][:19] + "Z"  # firstTimestamp/lastTimestamp hold seconds
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "%s.%s" % (event["secret"] or "recovery", uuid.uuid4().hex[:16]),
                         "namespace": self.recovery_namespace,
                         "labels": {SECRET_TYPE_LABEL: RECOVERY_SECRET_TYPE, TPM_HASH_LABEL: safe_kube_name(event["tpm_hash"] or "-")},
                         "annotations": {AUDIT_ANNOTATION: json.dumps(event, sort_keys=True)}},
            "involvedObject": {"apiVersion": "v1", "kind": "Secret", "namespace": self.recovery_namespace, "name": event["secret"]},
            "reason": AUDIT_EVENT_REASON, "type": "Normal", "count": 1,
            "message": "%s: %s of SealedVolume %s partition %s, by %s" % (
                event["action"], event["secret"], event["sealedvolume"], event["partition"], event["actor"]),
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "kcrypt-challenger"}, "reportingComponent": "kcrypt.kairos.io/recovery",
        }
        self._call("recording an audit Event in namespace %s" % self.recovery_namespace,
                   self.core.create_namespaced_event, self.recovery_namespace, body)
        return event

    def audit_events(self):
        page = self._call("listing audit Events in namespace %s" % self.recovery_namespace, self.core.list_namespaced_event,
                          self.recovery_namespace, label_selector="%s=%s" % (SECRET_TYPE_LABEL, RECOVERY_SECRET_TYPE))
        events = []
        for item in page.get("items") or []:
            text = ((item.get("metadata") or {}).get("annotations") or {}).get(AUDIT_ANNOTATION)
            if item.get("reason") == AUDIT_EVENT_REASON and text:
                events.append(json.loads(text))
        return sorted(events, key=lambda e: e.get("time", ""))

    def close(self):
        try:
            self.api.close()
        except Exception:  # closing pools of a client that never connected may fail; nothing to release then
            pass
