# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What can be proven about the Kubernetes objects without an API server (checklist 22, 34, 35; issue 13 item 10).

* deploy/kubernetes/crd.yaml's ``openAPIV3Schema`` is a *structural* schema (the rules of
  apiextensions.k8s.io/v1, "Specifying a structural schema"), and it is a valid JSON schema;
* every SealedVolume the store writes (each POST and PUT body the API emulator records) validates
  against it (jsonschema) and loses nothing to the API server's pruning of unknown fields;
* every API request the store makes — server paths as the challenger's identity, admin paths as the
  registrar's, recovery-key reads as the recovery reader's — is allowed by a Role bound to that identity
  in deploy/kubernetes/rbac.yaml, in the namespace of the request, with the request mapped to (verb,
  group, resource, subresource) by the API server's RequestInfo rules from the recorded HTTP method and
  path, not from our own method names; and the challenger's and the reader's Roles grant nothing their
  requests do not use (least privilege shown sufficient, not assumed). In the recovery-key namespace the
  challenger only writes: recovery keys are never readable with its identity.
"""

from __future__ import annotations

import io
import os
import re

import jsonschema
import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger as challenger_cli
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy
from support.kube_api import KubeAPI
from support.stores import install_crd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMESPACE = "kcrypt"  # the namespace rbac.yaml's Roles live in
RECOVERY_NAMESPACE = "kcrypt-recovery"  # the recovery-key Secrets' (the store's default: NAMESPACE + "-recovery")
HASH_A, HASH_B = "a" * 64, "b" * 64
CHALLENGER_TOKEN, REGISTRAR_TOKEN, READER_TOKEN = "challenger-sa-token", "registrar-token", "recovery-reader-token"
# Roles rbac.yaml leaves to the operator to bind (to people, CI): (Role, namespace) of each identity
OPERATOR_BOUND = {REGISTRAR_TOKEN: [("kcrypt-registrar", NAMESPACE)],
                  READER_TOKEN: [("kcrypt-recovery-reader", NAMESPACE), ("kcrypt-recovery-reader", RECOVERY_NAMESPACE)]}


def load(name):
    with open(os.path.join(ROOT, "deploy", "kubernetes", name)) as handle:
        return yaml.safe_load(handle)


def crd_schema():
    return load("crd.yaml")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# -- structural schema ------------------------------------------------------------------------

FORBIDDEN_IN_V1 = ("$ref", "definitions", "dependencies", "id", "$schema", "additionalItems", "patternProperties")


def structural_errors(schema, path="", root=True):
    """Violations of the structural-schema rules (Kubernetes apiextensions.k8s.io/v1)."""
    errors = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    if not schema.get("type") and not preserve:
        errors.append("%s: no type" % (path or "<root>"))
    for key in FORBIDDEN_IN_V1:
        if key in schema:
            errors.append("%s: %s is not allowed" % (path, key))
    if schema.get("uniqueItems") is True:
        errors.append("%s: uniqueItems: true is not allowed" % path)
    if "properties" in schema and "additionalProperties" in schema:
        errors.append("%s: properties and additionalProperties together" % path)
    if schema.get("additionalProperties") is False:
        errors.append("%s: additionalProperties: false is not allowed" % path)
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        for sub in (schema.get(junctor) or []) if junctor != "not" else ([schema["not"]] if "not" in schema else []):
            for key in ("type", "default", "additionalProperties", "description", "nullable", "x-kubernetes-preserve-unknown-fields"):
                if key in sub:
                    errors.append("%s.%s: %s inside a logical junctor" % (path, junctor, key))
    if isinstance(schema.get("items"), list):
        errors.append("%s.items: must be one schema" % path)
    if root and "metadata" in schema.get("properties", {}):
        metadata = schema["properties"]["metadata"]
        extra = set(metadata.get("properties", {})) - {"name", "generateName"}
        if extra or set(metadata) - {"type", "properties", "description"}:
            errors.append("metadata: only name and generateName may be constrained")
    for name, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, "%s.%s" % (path, name), root=False)
    if isinstance(schema.get("items"), dict):
        errors += structural_errors(schema["items"], path + "[]", root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], path + ".*", root=False)
    return errors


def pruned(value, schema):
    """What the API server keeps of ``value`` after pruning fields the structural schema does not know."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(value, (dict, list)):
        return value
    if isinstance(value, list):
        return [pruned(item, schema.get("items", {})) for item in value]
    if "properties" in schema:
        return {key: pruned(item, schema["properties"][key]) for key, item in value.items() if key in schema["properties"]}
    if isinstance(schema.get("additionalProperties"), dict):
        return {key: pruned(item, schema["additionalProperties"]) for key, item in value.items()}
    return {}  # an object schema without properties keeps nothing


def test_crd_schema_is_structural_and_a_valid_json_schema():
    schema = crd_schema()
    assert structural_errors(schema) == []
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI v3's schema object is a JSON Schema draft 4 subset
    # the checker is not vacuous: it finds what the API server would refuse
    assert structural_errors({"type": "object", "properties": {"spec": {"properties": {"x": {"type": "string"}}}}}) == [".spec: no type"]
    assert structural_errors({"type": "object", "properties": {"a": {"type": "object", "additionalProperties": False}}})


# -- RequestInfo and RBAC ---------------------------------------------------------------------

RESOURCE_PATH = re.compile(r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                           r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def request_attributes(entry):
    """(verb, apiGroup, resource[/subresource], namespace) of a request, or None for discovery (non-resource URLs)."""
    match = RESOURCE_PATH.match(entry["path"].rstrip("/"))
    if match is None or (match.group("resource") == "namespaces" and not match.group("namespace")
                         and entry["path"].count("/") <= 3):
        return None
    group = match.group("group") or ""
    resource, name = match.group("resource"), match.group("name")
    if match.group("sub"):
        resource += "/" + match.group("sub")
    method = entry["method"]
    if method == "GET":
        verb = "watch" if entry["query"].get("watch") in ("true", "1") else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = VERBS[method]
    return verb, group, resource, match.group("namespace")


def role_rules(name, namespace):
    items = load("rbac.yaml")["items"]
    (role,) = [item for item in items if item["kind"] == "Role" and item["metadata"]["name"] == name
               and item["metadata"]["namespace"] == namespace]
    return role["rules"]


def bound_roles(service_account):
    """[(Role, namespace)] the manifest's RoleBindings give the ServiceAccount (a RoleBinding refers to a Role of its namespace)."""
    items = load("rbac.yaml")["items"]
    return sorted((item["roleRef"]["name"], item["metadata"]["namespace"]) for item in items
                  if item["kind"] == "RoleBinding" and item["roleRef"]["kind"] == "Role"
                  and any(s["kind"] == "ServiceAccount" and s["name"] == service_account and s["namespace"] == NAMESPACE
                          for s in item["subjects"]))


def allowed(attributes, roles):
    """Whether one of ``roles`` ([(Role, namespace)]) allows the request: a Role grants nothing outside its namespace."""
    verb, group, resource, request_namespace = attributes
    return any(request_namespace == namespace and group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
               for name, namespace in roles for rule in role_rules(name, namespace))


def granted(roles):
    """{(namespace, group, resource, verb)} the Roles grant."""
    return {(namespace, group, resource, verb) for name, namespace in roles for rule in role_rules(name, namespace)
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.fixture
def api(tmp_path):
    started = KubeAPI(str(tmp_path / "api")).start()
    try:
        install_crd(started.kubeconfig)
        started.kubeconfigs = {
            token: started.write_kubeconfig(str(tmp_path / ("%s.kubeconfig" % token)), namespace=NAMESPACE, token=token)
            for token in (CHALLENGER_TOKEN, REGISTRAR_TOKEN, READER_TOKEN)}
        yield started
    finally:
        started.stop()


def store_url(api, token):
    return "kubernetes://?kubeconfig=%s&namespace=%s&recovery_namespace=%s" % (api.kubeconfigs[token], NAMESPACE, RECOVERY_NAMESPACE)


def admin(api, *argv, stdin="", token=REGISTRAR_TOKEN):
    out, err = io.StringIO(), io.StringIO()
    code = challenger_cli.main(list(argv) + ["--store", store_url(api, token)], stdin=io.StringIO(stdin), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def exercise_every_store_path(api, tmp_path):
    """The registrar's admin commands and every server path of the policy, each as its own identity."""
    admin(api, "add", "--tpm-hash", HASH_B, "--partition", "label=COS_PERSISTENT", "--passphrase-file", "-", stdin="static key")
    admin(api, "add", "--tpm-hash", HASH_B, "--partition", "label=COS_OEM2")  # legacy auto key: no Secret yet
    admin(api, "list", "-o", "json")
    admin(api, "show", HASH_B)
    admin(api, "quarantine", HASH_B)
    admin(api, "unquarantine", HASH_B)
    exported = tmp_path / "export.yaml"
    admin(api, "export", "--include-secrets", "-o", str(exported))
    admin(api, "import", "--replace", str(exported))
    with store_factory.open_store(store_url(api, CHALLENGER_TOKEN)) as store:
        policy = Policy(store)
        pcrs = {"0": "aa", "7": "bb", "11": "cc"}
        policy.issue_passphrase(HASH_A, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"))  # TOFU
        policy.issue_passphrase(HASH_A, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"))  # next boot
        policy.issue_passphrase(HASH_A, "PEM", pcrs, PartitionRef(label="COS_OEM"), defer_pcr_enrollment=True)  # new partition
        # the legacy paths first: once /tpm-attestation served HASH_B, its volume has attestation and they refuse it
        assert policy.legacy_post_pass(HASH_B, PartitionRef(label="COS_OEM2"), {"passphrase": "x", "generated_by": "tpm"})
        assert policy.legacy_get_pass(HASH_B, PartitionRef(label="COS_PERSISTENT"))["passphrase"] == "static key"
        policy.issue_passphrase(HASH_B, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"))  # pre-registered, static
        policy.escrow_recovery_key(HASH_A, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"), b"r" * 71)  # escrow
        policy.escrow_recovery_key(HASH_A, "PEM", pcrs, PartitionRef(label="COS_PERSISTENT"), b"s" * 71)  # rotation
        store.ping()
    shown = admin(api, "recovery", "show", HASH_A, "--reason", "contract test", "-o", "json", token=READER_TOKEN)  # by TPM
    assert "s" * 71 in shown
    admin(api, "recovery", "show", "tofu-" + HASH_A[:8], "--partition", "COS_PERSISTENT", token=READER_TOKEN)  # by name
    admin(api, "recovery", "audit", token=READER_TOKEN)
    admin(api, "delete", HASH_B, "--purge-secrets")


def test_every_request_is_allowed_by_the_role_of_its_identity(api, tmp_path):
    exercise_every_store_path(api, tmp_path)
    requests = api.requests()
    by_token = {}
    for entry in requests:
        attributes = request_attributes(entry)
        if attributes is not None:
            by_token.setdefault(entry["token"], []).append((attributes, entry))
    assert set(by_token) >= {CHALLENGER_TOKEN, REGISTRAR_TOKEN, READER_TOKEN}
    roles = dict(OPERATOR_BOUND, **{CHALLENGER_TOKEN: bound_roles("kcrypt-challenger")})
    assert roles[CHALLENGER_TOKEN] == [("kcrypt-challenger", NAMESPACE), ("kcrypt-challenger-recovery", RECOVERY_NAMESPACE)]
    for token, calls in by_token.items():
        if token not in roles:
            continue  # the test's own setup (CRD installation) as the default user
        refused = sorted({"%s %s %s in %s" % (verb, group or "core", resource, ns)
                          for (verb, group, resource, ns), entry in calls if not allowed((verb, group, resource, ns), roles[token])})
        assert refused == [], "Roles %s do not allow: %s" % (roles[token], refused)
    # least privilege: the challenger's and the reader's Roles grant exactly what their requests use
    used = {token: {(ns, group, resource, verb) for (verb, group, resource, ns), entry in by_token[token]}
            for token in (CHALLENGER_TOKEN, READER_TOKEN)}
    assert used[CHALLENGER_TOKEN] == granted(roles[CHALLENGER_TOKEN])
    assert used[READER_TOKEN] == granted(roles[READER_TOKEN])
    assert not any(verb in ("delete", "patch", "watch") for (ns, group, resource, verb) in used[CHALLENGER_TOKEN])
    assert (NAMESPACE, "", "secrets", "update") not in used[CHALLENGER_TOKEN]  # the server never changes a passphrase Secret (checklist 34)
    # recovery keys: the server writes them and reads nothing there; nobody but the reader reads them
    assert {verb for (ns, group, resource, verb) in used[CHALLENGER_TOKEN] if ns == RECOVERY_NAMESPACE} == {"create", "update"}
    readers = {entry["token"] for entry in requests if entry["method"] == "GET" and "/namespaces/%s/secrets" % RECOVERY_NAMESPACE in entry["path"]}
    assert readers == {READER_TOKEN}


def test_every_sealedvolume_written_validates_against_the_crd_and_survives_pruning(api, tmp_path):
    exercise_every_store_path(api, tmp_path)
    schema = crd_schema()
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def rfc3339(value):
        if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", value):
            raise ValueError("not RFC 3339: %r" % value)
        return True

    validator = jsonschema.Draft4Validator(schema, format_checker=checker)
    written = [entry["body"] for entry in api.requests()
               if entry["method"] in ("POST", "PUT") and "/sealedvolumes" in entry["path"] and entry["token"] != "kmock-test-token"]
    assert len(written) >= 6  # admin add/quarantine/unquarantine/import, TOFU, learning, new partition, ...
    assert any("attestation" in body["spec"] for body in written)
    for body in written:
        errors = sorted(error.message for error in validator.iter_errors(body))
        assert errors == [], (body, errors)
        for part in ("spec", "status"):
            if part in body:
                assert pruned(body[part], schema["properties"][part]) == body[part], "the API server would drop fields of %r" % body[part]
    # and a document with a field the CRD does not know would be caught
    assert pruned({"TPMHash": "x", "akPublicKey": "y"}, schema["properties"]["spec"]) == {"TPMHash": "x"}
