# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Apply (or delete) Kubernetes objects with the official ``kubernetes`` client, idempotently.

Used by the kairos.kcrypt ``challenger`` role, where kubernetes.core may not be installed.
Reads a JSON list of objects (``kind: List`` documents are expanded) on stdin:

    kcrypt_k8s_apply.py [--kubeconfig F] [--context C] [--namespace NS] [--namespace-map FROM=TO ...]
                        [--delete] [--check] < objects.json

* ``--namespace`` puts every namespaced object (and the ServiceAccount subjects of
  RoleBindings) into NS, like kustomize's ``namespace:``; the manifests under
  deploy/kubernetes are written for namespace ``kcrypt``. ``--namespace-map FROM=TO`` puts the
  objects of manifest namespace FROM into TO instead (the recovery-key namespace ``kcrypt-recovery``).
* apply: an object that does not exist is created; one that exists is patched (JSON merge
  patch) only when a field of the wanted object differs from the live one, so a second run
  reports no change. Fields the API server adds (defaults, status) are left alone.
* ``--delete`` removes the objects that exist (in reverse order); ``--check`` only reports.

Prints one JSON object: ``changed``, ``created``, ``updated``, ``deleted`` (``Kind ns/name``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def fail(message):
    json.dump({"failed": True, "changed": False, "msg": message}, sys.stdout)
    sys.stderr.write(message + "\n")
    return 1


def is_subset(wanted, live):
    """True when every field of ``wanted`` has the same value in ``live`` (lists item by item)."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(key in live and is_subset(value, live[key]) for key, value in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(wanted) == len(live) and all(map(is_subset, wanted, live))
    return wanted == live


def flatten(objects):
    """Objects in order, with the items of ``kind: List`` documents in place of the list (as kubectl does)."""
    result = []
    for obj in objects:
        if obj.get("kind") == "List" and isinstance(obj.get("items"), list):
            result.extend(flatten(obj["items"]))
        else:
            result.append(obj)
    return result


def label(obj):
    meta = obj["metadata"]
    where = "%s/" % meta["namespace"] if meta.get("namespace") else ""
    return "%s %s%s" % (obj["kind"], where, meta["name"])


def api_client(args):
    """In a pod (and no kubeconfig named): its service account; else the kubeconfig."""
    from kubernetes import client, config

    if not args.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=args.kubeconfig or None, context=args.context or None)


class Applier:
    def __init__(self, args):
        from kubernetes import dynamic
        from kubernetes.dynamic import exceptions

        self.errors = exceptions
        self.client = dynamic.DynamicClient(api_client(args))
        self.args = args

    def resource(self, obj):
        try:
            return self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except self.errors.ResourceNotFoundError:
            # a kind whose CRD was created earlier in this run: refresh discovery once
            self.client.resources.invalidate_cache()
            return self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])

    def place(self, obj, resource):
        obj = json.loads(json.dumps(obj))
        mapped = dict(item.split("=", 1) for item in self.args.namespace_map or [])
        if resource.namespaced and obj["metadata"].get("namespace") in mapped:
            obj["metadata"]["namespace"] = mapped[obj["metadata"]["namespace"]]
        elif resource.namespaced and self.args.namespace:
            obj["metadata"]["namespace"] = self.args.namespace
        if self.args.namespace:  # the service accounts live in the main namespace
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = self.args.namespace
        return obj

    def live(self, resource, obj):
        try:
            return resource.get(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace")).to_dict()
        except self.errors.NotFoundError:
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
                if not self.args.check:
                    resource.create(body=obj, namespace=namespace)
            elif not is_subset(obj, current):
                result["updated"].append(label(obj))
                if not self.args.check:
                    resource.patch(body=obj, name=obj["metadata"]["name"], namespace=namespace,
                                   content_type="application/merge-patch+json")
        return result

    def delete(self, objects):
        result = {"created": [], "updated": [], "deleted": []}
        for raw in reversed(objects):
            try:
                resource = self.resource(raw)
            except self.errors.ResourceNotFoundError:
                continue  # its CRD is gone already: nothing of this kind exists
            obj = self.place(raw, resource)
            if self.live(resource, obj) is not None:
                result["deleted"].append(label(obj))
                if not self.args.check:
                    resource.delete(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))
        return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="apply or delete Kubernetes objects (JSON list on stdin)")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--context", default="")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--namespace-map", action="append", metavar="FROM=TO")
    parser.add_argument("--delete", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    try:
        import kubernetes  # noqa: F401  (checked here for a clear message)
    except ImportError:
        return fail("the kubernetes Python client is required where this runs (pip install kubernetes); "
                    "interpreter: %s" % sys.executable)
    try:
        objects = flatten(json.load(sys.stdin))
        applier = Applier(args)
        result = applier.delete(objects) if args.delete else applier.apply(objects)
    except ValueError as error:
        return fail("bad object list on stdin: %s" % error)
    except Exception as error:  # the client raises many types; report the API's own message
        status = getattr(error, "status", None)
        body = getattr(error, "body", None) or ""
        detail = _api_message(body) or (str(error).strip().splitlines() or [""])[0]
        return fail("Kubernetes API error%s: %s%s" % (
            " %s" % status if status else "", type(error).__name__, ": " + detail if detail else ""))
    result["changed"] = bool(result["created"] or result["updated"] or result["deleted"])
    json.dump(result, sys.stdout, sort_keys=True)
    return 0


def _api_message(body):
    try:
        return json.loads(body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
