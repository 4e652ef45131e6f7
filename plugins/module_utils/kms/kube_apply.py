# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Apply (or delete) Kubernetes objects with the official ``kubernetes`` client, idempotently.

Private to the collection (kairos_k8s_objects, used by the ``challenger`` role, where
kubernetes.core may not be installed).

* ``namespace`` puts every namespaced object (and the ServiceAccount subjects of
  RoleBindings) into it, like kustomize's ``namespace:``; the manifests under
  deploy/kubernetes are written for namespace ``kcrypt``. ``namespace_map`` ({FROM: TO}) puts the
  objects of manifest namespace FROM into TO instead (the recovery-key namespace ``kcrypt-recovery``).
* present: an object that does not exist is created; one that exists is patched (JSON merge
  patch) only when a field of the wanted object differs from the live one, so a second run
  reports no change. Fields the API server adds (defaults, status) are left alone.
* absent: the objects that exist are removed, in reverse order.
"""

from __future__ import annotations

import copy
import json

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_kubernetes import load_api_client

dynamic = optional_import("kubernetes.dynamic")
dynamic_errors = optional_import("kubernetes.dynamic.exceptions")


def is_subset(wanted, live):
    """True when every field of ``wanted`` has the same value in ``live`` (lists item by item); a field wanted
    as null must be absent (in a JSON merge patch, null removes the field)."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(live.get(key) is None if value is None else key in live and is_subset(value, live[key])
                                              for key, value in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(wanted) == len(live) and all(map(is_subset, wanted, live))
    return wanted == live


def without_nulls(value):
    """``value`` without null fields: what a merge patch's null means (absent) when the object is created."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def flatten(objects):
    """Objects in order, with the items of ``kind: List`` documents in place of the list (as kubectl does)."""
    result = []
    for obj in objects:
        if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
            result.extend(flatten(obj["items"]))
        else:
            result.append(obj)
    return result


def check_objects(objects):
    """KcryptError unless each object has the fields apply needs (apiVersion, kind, metadata.name)."""
    for index, obj in enumerate(objects):
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not (isinstance(meta, dict) and obj.get("apiVersion") and obj.get("kind") and meta.get("name")):
            raise KcryptError("object %d is not a Kubernetes object with apiVersion, kind and metadata.name" % index)


def label(obj):
    meta = obj["metadata"]
    where = "%s/" % meta["namespace"] if meta.get("namespace") else ""
    return "%s %s%s" % (obj["kind"], where, meta["name"])


class Applier:
    def __init__(self, namespace="", kubeconfig=None, context=None, check_mode=False, namespace_map=None):
        require("kubernetes", "to apply Kubernetes objects")
        self.client = dynamic.DynamicClient(load_api_client(kubeconfig, context))
        self.namespace = namespace
        self.namespace_map = dict(namespace_map or {})
        self.check_mode = check_mode

    def resource(self, obj):
        try:
            return self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except dynamic_errors.ResourceNotFoundError:
            # a kind whose CRD was created earlier in this run: refresh discovery once
            self.client.resources.invalidate_cache()
            return self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])

    def place(self, obj, resource):
        obj = copy.deepcopy(obj)
        if resource.namespaced and obj["metadata"].get("namespace") in self.namespace_map:
            obj["metadata"]["namespace"] = self.namespace_map[obj["metadata"]["namespace"]]
        elif resource.namespaced and self.namespace:
            obj["metadata"]["namespace"] = self.namespace
        if self.namespace:  # the service accounts live in the main namespace
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = self.namespace
        return obj

    def live(self, resource, obj):
        try:
            return resource.get(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace")).to_dict()
        except dynamic_errors.NotFoundError:
            return None

    def apply(self, objects):
        result = {"created": [], "updated": [], "deleted": []}
        for raw in objects:
            resource = self.resource(raw)
            obj = self.place(raw, resource)
            current = self.live(resource, obj)
            namespace = obj["metadata"].get("namespace")
            if current is None:
                result["created"].append(label(obj))
                if not self.check_mode:
                    resource.create(body=without_nulls(obj), namespace=namespace)
            elif not is_subset(obj, current):
                result["updated"].append(label(obj))
                if not self.check_mode:
                    resource.patch(body=obj, name=obj["metadata"]["name"], namespace=namespace,
                                   content_type="application/merge-patch+json")
        return result

    def delete(self, objects):
        result = {"created": [], "updated": [], "deleted": []}
        for raw in reversed(objects):
            try:
                resource = self.resource(raw)
            except dynamic_errors.ResourceNotFoundError:
                continue  # its CRD is gone already: nothing of this kind exists
            obj = self.place(raw, resource)
            if self.live(resource, obj) is not None:
                result["deleted"].append(label(obj))
                if not self.check_mode:
                    resource.delete(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))
        return result


def apply_objects(objects, state="present", namespace="", kubeconfig=None, context=None, check_mode=False, namespace_map=None):
    """Apply (state=present) or delete (absent) ``objects``; {"changed", "created", "updated", "deleted"} (``Kind ns/name``)."""
    objects = flatten(objects)
    check_objects(objects)
    try:
        applier = Applier(namespace, kubeconfig, context, check_mode, namespace_map)
        result = applier.delete(objects) if state == "absent" else applier.apply(objects)
    except KcryptError:
        raise
    except Exception as error:  # the client raises many types; report the API's own message
        raise KcryptError(api_error_text(error)) from None
    result["changed"] = bool(result["created"] or result["updated"] or result["deleted"])
    return result


def api_error_text(error):
    status = getattr(error, "status", None)
    try:
        detail = json.loads(getattr(error, "body", None) or "").get("message", "")
    except (TypeError, ValueError, AttributeError):
        detail = ""
    detail = detail or (str(error).strip().splitlines() or [""])[0]
    return "Kubernetes API error%s: %s%s" % (" %s" % status if status else "", type(error).__name__, ": " + detail if detail else "")
