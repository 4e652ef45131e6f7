# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A Kubernetes API emulator on 127.0.0.1 for tests: kmock plus the semantics the stores rely on.

No real API server can run on the build machine. kmock's ``KubernetesEmulator``
(by the Kopf author) serves the official ``kubernetes`` client — HTTP, URL parsing,
discovery, an object store with history, watch streams — but keeps no
resourceVersion and ignores PUT. A real API server does both, and our Kubernetes
store depends on them for optimistic concurrency, so this subclass answers the
object requests (get, list, create, replace, delete) itself, on kmock's object
store, with the API server's rules:

* ``metadata.resourceVersion`` (one counter, like etcd's revision), ``uid`` and
  ``creationTimestamp`` on create;
* 409 ``AlreadyExists`` on a second create of a name, 404 ``NotFound`` for a missing object;
* lists sorted by namespace and name, as the API server returns them, with equality (``a=b``,
  ``a!=b``) and existence (``a``, ``!a``) label selectors;
* PUT (replace): 404 if missing, 422 without ``resourceVersion`` (except for Secrets and
  ConfigMaps, whose registry strategy allows an unconditional update, as the API server's does),
  409 ``Conflict`` when it is stale, else the object is replaced and gets a new resourceVersion;
* Secret ``stringData`` folded into base64 ``data``;
* CustomResourceDefinitions: creating one registers its served versions, so the
  CRD manifest must be applied before SealedVolumes can be used, as on a cluster; custom
  objects are pruned by their version's structural schema on create and replace (fields the
  schema does not know are dropped, as the API server does);
* Namespaces (create, get, list, delete with their objects), which kmock's URL parser cannot read.

Every request is appended to ``requests.jsonl`` in the work directory (method, path, query,
bearer token, JSON body), so tests can check each call against RBAC and each written object
against the CRD schema.

Run it as a process: ``python tests/support/kube_api.py PORT_FILE`` writes the port
into PORT_FILE once it listens and serves until SIGTERM. ``KubeAPI`` does that and
writes a kubeconfig for it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid


class KubeAPI:
    """One emulator process on 127.0.0.1, found and stopped by the PID this code started."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.process = None
        self.port = None
        self.kubeconfig = os.path.join(work_dir, "kubeconfig")
        self.request_log = os.path.join(work_dir, "requests.jsonl")

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=60):  # a startup deadline only: CI runs it next to heavy I/O
        os.makedirs(self.work_dir, exist_ok=True)
        port_file = os.path.join(self.work_dir, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        log = open(os.path.join(self.work_dir, "kube-api.log"), "ab")
        self.request_log = os.path.join(self.work_dir, "requests.jsonl")  # every request, for RBAC and schema checks
        env = dict(os.environ, KUBE_API_REQUEST_LOG=self.request_log)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), port_file],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the Kubernetes API emulator exited (see %s/kube-api.log)" % self.work_dir)
            if os.path.exists(port_file):
                text = open(port_file).read().strip()
                if text:
                    self.port = int(text)
                    break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("the Kubernetes API emulator did not start within %ss" % timeout)
        self.write_kubeconfig(self.kubeconfig)
        return self

    def requests(self):
        """The recorded requests (dicts: method, path, query, token, body), oldest first."""
        if not os.path.exists(self.request_log):
            return []
        with open(self.request_log) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def write_kubeconfig(self, path, namespace="default", token="kmock-test-token"):
        """A kubeconfig for the emulator; ``token`` tells the request log which identity called."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": namespace}}],
        }
        with open(path, "w") as handle:
            json.dump(config, handle)  # JSON is YAML
        return path

    def stop(self):
        from support.process import stop as stop_process  # here: this file also runs as a script

        stop_process(self.process)
        self.process = None


def _emulator_class():
    import aiohttp.web
    import kmock

    def now():
        return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def fold_string_data(resource, body):
        if resource.plural == "secrets" and resource.group == "" and body.get("stringData"):
            data = body.setdefault("data", {}) or {}
            for key, value in body.pop("stringData").items():
                data[key] = base64.b64encode(value.encode("utf-8")).decode("ascii")
            body["data"] = data

    def parse_label_selector(text):
        """Equality (``a=b``, ``c!=d``) and existence (``e``, ``!f``) terms, as the API server's list takes them."""
        terms = []
        for term in filter(None, (t.strip() for t in text.split(","))):
            if "!=" in term:
                key, value = term.split("!=", 1)
                terms.append(lambda labels, k=key.strip(), v=value.strip(): labels.get(k) != v)
            elif "=" in term:
                key, value = term.replace("==", "=").split("=", 1)
                terms.append(lambda labels, k=key.strip(), v=value.strip(): labels.get(k) == v)
            elif re.fullmatch(r"!?[A-Za-z0-9][-A-Za-z0-9_./]*", term):
                terms.append(lambda labels, k=term.lstrip("!"), present=not term.startswith("!"): (k in labels) == present)
            else:
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="unsupported label selector %r" % term)
        return lambda labels: all(term(labels) for term in terms)

    def prune(value, schema):
        """What a structural schema keeps of ``value`` (the API server's pruning of unknown fields)."""
        if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        if isinstance(value, dict) and "properties" in schema:
            return {key: prune(item, schema["properties"][key]) for key, item in value.items() if key in schema["properties"]}
        if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            return {key: prune(item, schema["additionalProperties"]) for key, item in value.items()}
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [prune(item, schema["items"]) for item in value]
        return value

    class StrictEmulator(kmock.KubernetesEmulator):
        """Object requests are answered here from kmock's object store; the rest (discovery,
        watch, patch) by kmock. kmock's generic reaction matching costs ~30 ms per request,
        which made 200 concurrent enrolments take minutes; this path keeps the same semantics."""

        async def __call__(self, raw_request):
            await self._record(raw_request)
            # kmock's URL parser cannot read /api/v1/namespaces[/NAME] (it takes "namespaces" for
            # the namespace marker), so Namespace objects, which tests create on real clusters, are served here.
            path = raw_request.path.rstrip("/")
            if path == "/api/v1/namespaces" or (path.startswith("/api/v1/namespaces/") and path.count("/") == 4):
                return await self._namespace(raw_request, path[len("/api/v1/namespaces/"):] if path.count("/") == 4 else None)
            return await super().__call__(raw_request)

        async def _record(self, raw_request):
            """One JSON line per request in $KUBE_API_REQUEST_LOG: method, path, query, bearer token, body."""
            path = os.environ.get("KUBE_API_REQUEST_LOG")
            if not path:
                return
            body = None
            if raw_request.method in ("POST", "PUT", "PATCH") and raw_request.can_read_body:
                try:
                    body = json.loads(await raw_request.read())  # aiohttp keeps the bytes for the handlers
                except ValueError:
                    body = None
            auth = raw_request.headers.get("Authorization", "")
            entry = {"method": raw_request.method, "path": raw_request.path, "query": dict(raw_request.query),
                     "token": auth[len("Bearer "):] if auth.startswith("Bearer ") else "", "body": body}
            with open(path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

        async def _namespace(self, raw_request, name):
            namespaces = self.__dict__.setdefault("_namespace_objects", {})
            if raw_request.method == "POST" and name is None:
                body = await raw_request.json()
                name = (body.get("metadata") or {}).get("name")
                if name in namespaces:
                    return aiohttp.web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)
                body["metadata"].update(resourceVersion=self._next(), uid=str(uuid.uuid4()), creationTimestamp=now())
                namespaces[name] = body
                return aiohttp.web.json_response(body, status=201)
            if raw_request.method == "GET" and name is None:
                return aiohttp.web.json_response({"kind": "NamespaceList", "apiVersion": "v1", "items": list(namespaces.values())})
            if name not in namespaces:
                return aiohttp.web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            if raw_request.method == "DELETE":
                async with self._lock:  # the API server removes what the namespace held
                    for key in [k for k in self.objects if k[1] == name and not self.objects[k].deleted]:
                        self.objects[key].delete()
                    self._forget_labels(name)
                return aiohttp.web.json_response(namespaces.pop(name))
            return aiohttp.web.json_response(namespaces[name])

        # Labels of the live objects of one (resource, namespace), by name: a list filters these plain
        # dicts (as the API server's watch cache filters its objects in memory) and reads only the
        # matching objects from kmock's store, whose every read copies the object (~20 us each).
        # Built on first use; kept up to date by the handlers below; dropped when kmock's own handlers
        # may have changed an object (patch).
        def _labels_of(self, resource, namespace):
            index = self.__dict__.setdefault("_label_index", {})
            scope = (resource.group, resource.version, resource.plural, namespace)
            if scope not in index:
                index[scope] = {key[2]: (obj.raw.get("metadata", {}).get("labels") or {})
                                for key, obj in self.objects.items()
                                if key[0] == resource and key[1] == namespace and not obj.deleted}
            return index[scope]

        def _forget_labels(self, namespace=None):
            index = self.__dict__.setdefault("_label_index", {})
            for scope in [s for s in index if namespace is None or s[3] == namespace]:
                del index[scope]

        async def _handle(self, request):
            handler = self._own_handler(request)
            if handler is not None:
                return await handler(request)
            response = await super()._handle(request)
            if request.method != kmock.method.GET:
                self._forget_labels()  # kmock's own handler (a patch) may have changed an object
            return response

        def _own_handler(self, request):
            if request.resource is None or request.subresource:
                return None
            if request.method == kmock.method.PUT and request.name:
                return self._replace
            if request.action == kmock.action.FETCH:
                return self._fetch
            if request.action == kmock.action.LIST:
                return self._list
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                return self._create
            if request.action == kmock.action.DELETE and request.name:
                return self._delete
            return None

        def _known(self, resource):
            return any(resource == known for known in self.resources) or any(resource == key[0] for key in self.objects)

        @staticmethod
        def _not_found(request):
            return kmock.KubernetesError(status=404, reason="NotFound",
                                         message='%s "%s" not found' % (request.resource.plural, request.name))

        async def _fetch(self, request):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects or self.objects[key].deleted:
                    raise self._not_found(request)
                raw = self.objects[key].raw
            return aiohttp.web.json_response(raw)

        async def _list(self, request):
            if not self._known(request.resource):
                raise kmock.KubernetesError(status=404, reason="NotFound", message="the server could not find the requested resource")
            selector = parse_label_selector(request.params.get("labelSelector", ""))
            async with self._lock:
                if request.namespace is None:
                    items = [obj.raw for (resource, _namespace, _name), obj in self.objects.items()
                             if resource == request.resource and not obj.deleted
                             and selector(obj.raw.get("metadata", {}).get("labels") or {})]
                else:
                    labels = self._labels_of(request.resource, request.namespace)
                    items = [self.objects[(request.resource, request.namespace, name)].raw
                             for name, object_labels in labels.items() if selector(object_labels)]
            items.sort(key=lambda item: (item["metadata"].get("namespace") or "", item["metadata"]["name"]))
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "List", "items": items,
                                              "metadata": {"resourceVersion": str(self._version)}})

        async def _create(self, request):
            body = copy.deepcopy(request.data)
            metadata = body.setdefault("metadata", {})
            if not metadata.get("name"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name: Required value")
            namespace = request.namespace or metadata.get("namespace")
            key = (request.resource, namespace, metadata["name"])
            async with self._lock:
                if key in self.objects and not self.objects[key].deleted:
                    raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                                message='%s "%s" already exists' % (request.resource.plural, metadata["name"]))
                metadata["resourceVersion"] = self._next()
                metadata["uid"] = str(uuid.uuid4())
                metadata["creationTimestamp"] = now()
                if namespace:
                    metadata["namespace"] = namespace
                fold_string_data(request.resource, body)
                body = self._pruned(request.resource, body)
                if request.resource.plural == "customresourcedefinitions":
                    self._register_crd(body)
                if key in self.objects:
                    self.objects[key].create(body)
                else:
                    self.objects[key] = body
                raw = self.objects[key].raw
                if namespace:
                    self._labels_of(request.resource, namespace)[metadata["name"]] = dict(metadata.get("labels") or {})
                await self._buses[request.resource].put({"type": "ADDED", "object": raw})
            return aiohttp.web.json_response(raw, status=201)

        async def _delete(self, request):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects or self.objects[key].deleted:
                    raise self._not_found(request)
                raw = self.objects[key].raw
                self.objects[key].delete()
                if request.namespace:
                    self._labels_of(request.resource, request.namespace).pop(request.name, None)
                await self._buses[request.resource].put({"type": "DELETED", "object": raw})
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Success",
                                              "details": {"name": request.name, "kind": request.resource.plural}})

        def _next(self):
            self._version = getattr(self, "_version", 0) + 1
            return str(self._version)

        def _pruned(self, resource, body):
            schema = self.__dict__.get("_schemas", {}).get((resource.group, resource.version, resource.plural))
            if schema is None:
                return body
            kept = {key: body[key] for key in ("apiVersion", "kind", "metadata") if key in body}
            kept.update(prune({k: v for k, v in body.items() if k not in kept}, schema))
            return kept

        def _register_crd(self, crd):
            spec = crd.get("spec", {})
            names = spec.get("names", {})
            schemas = self.__dict__.setdefault("_schemas", {})
            for version in spec.get("versions", []):
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if schema:
                    schemas[(spec["group"], version["name"], names["plural"])] = schema
                if version.get("served"):
                    key = "%s/%s/%s" % (spec["group"], version["name"], names["plural"])
                    self.resources[key] = kmock.ResourceInfo(
                        kind=names.get("kind"), singular=names.get("singular"),
                        namespaced=spec.get("scope") == "Namespaced",
                        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                        subresources=set((version.get("subresources") or {}).keys()))

        async def _replace(self, request):
            body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
            if body is None:
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body must be a JSON object")
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects or self.objects[key].deleted:
                    raise self._not_found(request)
                current = self.objects[key].raw
                wanted = (body.get("metadata") or {}).get("resourceVersion")
                unconditional = request.resource.group == "" and request.resource.plural in ("secrets", "configmaps")
                if not wanted and unconditional:
                    wanted = current["metadata"].get("resourceVersion")
                if not wanted:
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
                if wanted != current["metadata"].get("resourceVersion"):
                    raise kmock.KubernetesError(
                        status=409, reason="Conflict",
                        message='Operation cannot be fulfilled on %s "%s": the object has been modified; '
                                "please apply your changes to the latest version and try again" % (request.resource.plural, request.name))
                metadata = body.setdefault("metadata", {})
                for field in ("uid", "creationTimestamp", "name", "namespace"):
                    if field in current["metadata"]:
                        metadata[field] = current["metadata"][field]
                metadata["resourceVersion"] = self._next()
                fold_string_data(request.resource, body)
                body = self._pruned(request.resource, body)
                self.objects[key].create(body)
                raw = self.objects[key].raw
                if request.namespace:
                    self._labels_of(request.resource, request.namespace)[request.name] = dict(metadata.get("labels") or {})
                await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
            return aiohttp.web.json_response(raw)

    return StrictEmulator


async def _serve(port_file):
    import kmock

    emulator = _emulator_class()()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Core resources the stores use; CRDs register themselves when created.
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True,
                                                          verbs={"get", "list", "create", "update", "delete"})
    emulator.resources["v1/events"] = kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                                         verbs={"get", "list", "create", "delete"})
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list", "create", "delete"})
    async with emulator, kmock.Server(emulator, host="127.0.0.1", port=0) as server:
        with open(port_file + ".tmp", "w") as handle:
            handle.write(str(server.port))
        os.rename(port_file + ".tmp", port_file)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
