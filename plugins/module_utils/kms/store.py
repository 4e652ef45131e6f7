# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The store interface, SealedVolume/Secret documents, YAML import/export (opening one: store_factory).

Private to the collection. Two backends implement :class:`Store`: ``store_sqlite``
(embedded, the default) and ``store_kubernetes`` (SealedVolume custom resources and
Secrets). Documents are plain dicts in the Kubernetes shape (spec §4), so a YAML
export of either store can be applied with kubectl and an upstream YAML imported:

* SealedVolume: ``{"apiVersion": "keyserver.kairos.io/v1alpha1", "kind": "SealedVolume",
  "metadata": {"name", "namespace", "resourceVersion", "creationTimestamp", "uid", "labels"?},
  "spec": {"TPMHash", "partitions": [{"label", "deviceName", "uuid", "secret": {"name", "path"}}],
  "quarantined", "attestation": {"ekPublicKey", "pcrValues": {"pcrs": {"0": hex}},
  "enrolledAt", "lastVerifiedAt"}}}``
* Secret: ``{"apiVersion": "v1", "kind": "Secret", "metadata": {...}, "type": "Opaque",
  "data": {key: bytes}}`` — values are *bytes* in memory, base64 only in YAML/JSON.

Writes are optimistic: ``update_*`` raise :class:`Conflict` when the document's
``metadata.resourceVersion`` is stale, ``create_*`` raise :class:`AlreadyExists`.
Every read goes to the backing store (no cache), so create-or-reuse decisions see
the latest committed state.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import os

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

yaml = optional_import("yaml")

GROUP = "keyserver.kairos.io"
VERSION = "v1alpha1"
API_VERSION = GROUP + "/" + VERSION
KIND = "SealedVolume"
PLURAL = "sealedvolumes"
DEFAULT_NAMESPACE = "kcrypt"
DEFAULT_SQLITE_PATH = "/var/lib/kcrypt-challenger/kms.db"

# The CRD schema (spec §4) as key -> type; nested dicts describe objects.
PARTITION_KEYS = {"label": str, "deviceName": str, "uuid": str, "secret": {"name": str, "path": str}}
# pcrValues.relearnUntil / relearnTo (ours, issue 16): PCR upgrade windows, see volume_attestation.py. Upstream's
# CRD prunes them, which closes every window (the old values stay enforced); docs/store.md.
ATTESTATION_KEYS = {"ekPublicKey": str, "pcrValues": {"pcrs": "pcrs", "relearnUntil": "pcrs", "relearnTo": "pcrs"},
                    "enrolledAt": str, "lastVerifiedAt": str}
SPEC_KEYS = {"TPMHash": str, "partitions": [PARTITION_KEYS], "quarantined": bool, "attestation": ATTESTATION_KEYS}


class StoreError(KcryptError):
    """The store failed; the message names the store, never a secret."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached (file, API server)."""


class NotFound(StoreError):
    """The document does not exist."""


class AlreadyExists(StoreError):
    """A document with that name exists already (someone else created it first)."""


class Conflict(StoreError):
    """The document changed since it was read (stale resourceVersion): re-read and retry."""


class InvalidDocument(StoreError):
    """A document does not have the SealedVolume/Secret shape."""


class Store(object):
    """What the policy, the admin CLI and the module need from a backend.

    All methods are synchronous and safe to call from several threads. Every document
    returned is a fresh copy the caller may modify (backends never hand out cached objects).
    ``list_volumes``/``volumes_for`` return volumes in name order; the first one
    with a TPM hash is "the" volume of that TPM (upstream picks the first of its
    cache's list, whose order is not defined).
    """

    namespace = DEFAULT_NAMESPACE
    url = ""  # how it was opened, for logs and messages (never carries a secret)

    def ping(self):
        """Raise StoreUnavailable unless the store can serve requests (readiness)."""
        raise NotImplementedError

    def list_volumes(self):
        raise NotImplementedError

    def volumes_for(self, tpm_hash):
        """Every SealedVolume whose ``spec.TPMHash`` equals ``tpm_hash`` exactly, in name order."""
        return [v for v in self.list_volumes() if volume_tpm_hash(v) == tpm_hash]

    def needs_index(self, volume):
        """True when ``update_volume(volume)`` would make the volume cheaper to find (a backend's index).

        The embedded store indexes every write itself; the Kubernetes store labels volumes
        that other tools wrote without its tpm-hash label.
        """
        return False

    def find_volume(self, tpm_hash):
        """The first SealedVolume of this TPM, or None (spec §3.2 ``findVolumeForTPM``)."""
        volumes = self.volumes_for(tpm_hash)
        return volumes[0] if volumes else None

    def get_volume(self, name):
        raise NotImplementedError

    def create_volume(self, doc):
        raise NotImplementedError

    def update_volume(self, doc):
        raise NotImplementedError

    def delete_volume(self, name):
        """Delete by name; return False if it did not exist."""
        raise NotImplementedError

    def get_secret(self, name):
        raise NotImplementedError

    def create_secret(self, doc):
        raise NotImplementedError

    def update_secret(self, doc):
        """Replace a Secret (admin tools only; the server never changes a Secret)."""
        raise NotImplementedError

    def delete_secret(self, name):
        """Delete by name; return False if it did not exist (admin tools only)."""
        raise NotImplementedError

    # Recovery keys live apart from passphrase Secrets (their own SQLite table, their own Kubernetes
    # namespace): ``get_secret`` never returns one, so no protocol path can serve one to a node.

    def put_recovery_secret(self, doc):
        """Create or replace a recovery-key Secret. Returns nothing: the server, which calls it, never
        reads a recovery key (with Kubernetes it has no right to: docs/store.md, "Recovery keys")."""
        raise NotImplementedError

    def get_recovery_secret(self, name):
        """A recovery-key Secret, or None (administrators only; kms/recovery.py audits every call)."""
        raise NotImplementedError

    def record_audit_event(self, event):
        """Append an audit event (a dict of AUDIT_FIELDS strings; ``time`` is set here)."""
        raise NotImplementedError

    def audit_events(self):
        """The recorded audit events, oldest first."""
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Documents


def now_rfc3339():
    """UTC time as Kubernetes' metav1.Time writes it (seconds, ``Z``)."""
    return rfc3339(datetime.datetime.now(datetime.timezone.utc))


def rfc3339(moment):
    """An aware datetime as metav1.Time writes it: UTC, whole seconds, ``Z``."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text):
    """An aware datetime from ``2026-12-06T10:00:00Z`` (fractions and ``+01:00`` offsets too), or None."""
    if not isinstance(text, str) or not text:
        return None
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None or "T" not in value.upper():
        return None
    return moment.astimezone(datetime.timezone.utc)


def new_volume(name, tpm_hash, partitions=(), quarantined=False, attestation=None, namespace=None):
    spec = {"TPMHash": tpm_hash, "partitions": [copy.deepcopy(p) for p in partitions]}
    if quarantined:
        spec["quarantined"] = True
    if attestation is not None:
        spec["attestation"] = copy.deepcopy(attestation)
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def new_secret(name, data, labels=None, namespace=None):
    """A Secret document; ``data`` maps keys to bytes."""
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
            "data": {k: _as_bytes(v) for k, v in data.items()}}


AUDIT_FIELDS = ("time", "action", "actor", "tpm_hash", "sealedvolume", "partition", "secret", "reason")


def audit_event(**fields):
    """An audit event: the AUDIT_FIELDS as strings (missing ones empty), ``time`` now unless given."""
    unknown = sorted(set(fields) - set(AUDIT_FIELDS))
    if unknown:
        raise InvalidDocument("unknown audit field(s) %s" % ", ".join(unknown))
    event = {name: str(fields.get(name) or "") for name in AUDIT_FIELDS}
    # microseconds: events of one second keep their order wherever they are listed by time
    event["time"] = event["time"] or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return event


def volume_name(doc):
    return doc.get("metadata", {}).get("name", "")


def volume_tpm_hash(doc):
    return (doc.get("spec") or {}).get("TPMHash", "") or ""


def resource_version(doc):
    return str(doc.get("metadata", {}).get("resourceVersion", "") or "")


def _as_bytes(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InvalidDocument("Secret data values must be bytes or text")


def _check_shape(value, schema, where):
    """Validate ``value`` against a SPEC_KEYS-style schema; raise InvalidDocument naming the place."""
    if schema == "pcrs":
        if not isinstance(value, dict):
            raise InvalidDocument("%s must be a map of PCR index to hex value" % where)
        for key, item in value.items():
            if not isinstance(key, str) or not key.isdigit():
                raise InvalidDocument("%s: PCR index %r must be a decimal number" % (where, key))
            if not isinstance(item, str):
                raise InvalidDocument("%s.%s must be a string (hex value, or \"\" to learn it)" % (where, key))
        return
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise InvalidDocument("%s must be a list" % where)
        for index, item in enumerate(value):
            _check_shape(item, schema[0], "%s[%d]" % (where, index))
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise InvalidDocument("%s must be an object" % where)
        unknown = sorted(set(value) - set(schema))
        if unknown:
            raise InvalidDocument("%s has unknown key(s) %s (known: %s)" % (where, ", ".join(unknown), ", ".join(sorted(schema))))
        for key, item in value.items():
            if item is None:
                continue  # JSON null = absent, as the API server treats it
            _check_shape(item, schema[key], "%s.%s" % (where, key))
        return
    if schema is bool:
        if not isinstance(value, bool):
            raise InvalidDocument("%s must be true or false" % where)
        return
    if not isinstance(value, schema):
        raise InvalidDocument("%s must be a %s" % (where, schema.__name__.replace("str", "string")))


def normalize_volume(doc, namespace=None):
    """Validate a SealedVolume document and return a clean copy (None values dropped).

    Raises InvalidDocument with the offending field for anything the CRD would not hold.
    """
    if not isinstance(doc, dict):
        raise InvalidDocument("a SealedVolume must be a mapping")
    if doc.get("kind", KIND) != KIND:
        raise InvalidDocument("expected kind SealedVolume, got %r" % doc.get("kind"))
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidDocument("SealedVolume apiVersion must be %s, got %r" % (API_VERSION, doc.get("apiVersion")))
    metadata = doc.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidDocument("a SealedVolume needs metadata.name")
    check_object_name(name, "SealedVolume")
    spec = doc.get("spec") or {}
    _check_shape(spec, SPEC_KEYS, "spec")
    clean = copy.deepcopy(doc)
    clean["apiVersion"] = API_VERSION
    clean["kind"] = KIND
    clean["spec"] = _omit_empty(_drop_none(copy.deepcopy(spec)))
    clean["metadata"] = {k: v for k, v in metadata.items() if v is not None}
    if namespace:
        clean["metadata"]["namespace"] = namespace
    clean.pop("status", None)
    return clean


def normalize_secret(doc, namespace=None):
    """Validate a Secret document (``data`` base64 or bytes, or ``stringData``) -> data as bytes."""
    if not isinstance(doc, dict) or doc.get("kind", "Secret") != "Secret":
        raise InvalidDocument("expected kind Secret")
    if doc.get("apiVersion", "v1") != "v1":
        raise InvalidDocument("Secret apiVersion must be v1")
    metadata = doc.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidDocument("a Secret needs metadata.name")
    check_object_name(name, "Secret")
    data = {}
    for key, value in (doc.get("data") or {}).items():
        if isinstance(value, bytes):
            data[key] = value
        elif isinstance(value, str):
            try:
                data[key] = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise InvalidDocument("Secret %s: data.%s is not base64 (use stringData for plain text)" % (name, key))
        else:
            raise InvalidDocument("Secret %s: data.%s must be a base64 string" % (name, key))
    for key, value in (doc.get("stringData") or {}).items():
        if not isinstance(value, str):
            raise InvalidDocument("Secret %s: stringData.%s must be a string" % (name, key))
        data[key] = value.encode("utf-8")
    clean = {"apiVersion": "v1", "kind": "Secret",
             "metadata": {k: v for k, v in metadata.items() if v is not None},
             "type": doc.get("type") or "Opaque", "data": data}
    if namespace:
        clean["metadata"]["namespace"] = namespace
    return clean


def check_object_name(name, kind):
    """Kubernetes object names: lowercase alphanumerics, '-' and '.', at most 253 characters."""
    valid = (0 < len(name) <= 253 and name[0].isalnum() and name[-1].isalnum()
             and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-." for c in name))
    if not valid:
        raise InvalidDocument("%s name %r is not a valid Kubernetes object name (lowercase letters, digits, '-', '.')" % (kind, name))


def _omit_empty(spec):
    """Drop what Go's ``omitempty`` drops when upstream writes a SealedVolume (false, empty strings),
    so a volume compares equal however it was written. Attestation values are kept: "" means "learn"."""
    if spec.get("quarantined") is False:
        del spec["quarantined"]
    for partition in spec.get("partitions") or []:
        for key in ("label", "deviceName", "uuid"):
            if partition.get(key) == "":
                del partition[key]
        secret = partition.get("secret")
        if isinstance(secret, dict):
            for key in ("name", "path"):
                if secret.get(key) == "":
                    del secret[key]
    return spec


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def strip_server_fields(doc):
    """A copy without the fields the store assigns (for export and comparison)."""
    clean = copy.deepcopy(doc)
    metadata = clean.get("metadata", {})
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "selfLink"):
        metadata.pop(key, None)
    return clean


# ---------------------------------------------------------------------------
# YAML


def secret_to_wire(doc):
    """A Secret with ``data`` as base64 strings (the Kubernetes JSON/YAML form)."""
    clean = copy.deepcopy(doc)
    clean["data"] = {k: base64.b64encode(v).decode("ascii") for k, v in doc.get("data", {}).items()}
    return clean


def yaml_text(data, all_documents=False, sort_keys=False):
    """YAML with multi-line strings (PEM keys) as literal blocks, as kubectl shows them."""
    require("yaml", "to write YAML")

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    if all_documents:
        return yaml.dump_all(data, Dumper=Dumper, default_flow_style=False, sort_keys=sort_keys, explicit_start=True)
    return yaml.dump(data, Dumper=Dumper, default_flow_style=False, sort_keys=sort_keys)


def dump_yaml(docs):
    """Multi-document YAML of SealedVolumes/Secrets, server-assigned fields removed."""
    out = []
    for doc in docs:
        doc = strip_server_fields(doc)
        if doc.get("kind") == "Secret":
            doc = secret_to_wire(doc)
        out.append(doc)
    return yaml_text(out, all_documents=True)


def load_yaml(text, namespace=None):
    """Parse YAML (documents, or ``kind: List``) into validated (volumes, secrets).

    Accepts upstream-shaped SealedVolumes and Secrets (``data`` or ``stringData``);
    anything else is an InvalidDocument naming the problem.
    """
    require("yaml", "to read YAML")
    try:
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidDocument("not valid YAML: %s" % exc)
    items = []
    for doc in loaded:
        if isinstance(doc, dict) and doc.get("kind") in ("List", "SealedVolumeList", "SecretList"):
            items.extend(doc.get("items") or [])
        else:
            items.append(doc)
    volumes, secrets = [], []
    for doc in items:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind == KIND:
            volumes.append(normalize_volume(strip_server_fields(doc), namespace))
        elif kind == "Secret":
            secrets.append(normalize_secret(strip_server_fields(doc), namespace))
        else:
            raise InvalidDocument("unsupported document kind %r: only SealedVolume and Secret can be imported" % kind)
    return volumes, secrets


def ensure_private_dir(path):
    """Create the parent directory of ``path`` (mode 0700) if it is missing."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
