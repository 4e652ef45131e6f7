# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""SealedVolume semantics of the challenger: who gets which passphrase (spec §3, §2.B).

Private to the collection. :class:`Policy` runs after the server has verified the
TPM's proof (credential activation + quote); it looks the TPM up in the store,
enrols it on first use (TOFU) or not (``registered-only``), enforces quarantine and
the learn-then-enforce EK/PCR rules, and returns the passphrase bytes.

It follows upstream's ``IssuePassphrase`` and legacy ``/getPass``/``/postPass``
step by step (names, labels, error texts), and fixes upstream's flaws; each fix is
listed in docs/store.md ("Compatibility"):

* Every decision is taken on fresh reads and retried from the start when a write
  loses a race (``AlreadyExists`` on create = someone enrolled first; ``Conflict``
  on update = someone changed the volume). Concurrent first contacts of one TPM
  therefore create exactly one SealedVolume and one Secret.
* The TOFU volume keeps upstream's name ``tofu-<hash[:8]>`` when it is free; if
  another TPM owns it, a longer prefix of the hash is used.
* A Secret labelled for another TPM is never reused (upstream would hand it out).
* No write when nothing changed (upstream updates unconditionally).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    new_secret,
    new_volume,
    now_rfc3339,
    volume_name,
)

ENROLLMENT_TOFU = "tofu"
ENROLLMENT_REGISTERED_ONLY = "registered-only"
ENROLLMENT_MODES = (ENROLLMENT_TOFU, ENROLLMENT_REGISTERED_ONLY)

DEFAULT_SECRET_PATH = "passphrase"
GENERATED_BY_KEY = "generated_by"
TPM_HASH_LABEL = "kcrypt.kairos.io/tpm-hash"
PARTITION_LABEL = "kcrypt.kairos.io/partition"
MAX_ATTEMPTS = 20

log = logging.getLogger("kcrypt.policy")


class PolicyRejection(KcryptError):
    """The KMS says no. ``str(exc)`` is upstream's detail text; the server sends it to
    the node as ``Attestation verification failed: <text>`` (never retried by clients)."""


class _Retry(Exception):
    """A write lost a race: start over from fresh reads."""


# ---------------------------------------------------------------------------
# Names (spec §3.3, pkg/kube/names.go)


def _is_alnum(char):
    return "a" <= char <= "z" or "A" <= char <= "Z" or "0" <= char <= "9"


# ASCII only, so a match is also its own byte length.
_VALID_KUBE_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?\Z")


def is_valid_kube_name(name):
    """Upstream IsValidKubeName: 1..63 bytes, alnum at both ends (upper case allowed), alnum or '-' inside."""
    return bool(_VALID_KUBE_NAME.match(name))


def sanitize_kube_name(name):
    """Upstream SanitizeKubeName: keep a-z0-9-, lower-case A-Z, any other character -> '-', trim '-'."""
    out = []
    for char in name:
        if "a" <= char <= "z" or "0" <= char <= "9" or char == "-":
            out.append(char)
        elif "A" <= char <= "Z":
            out.append(char.lower())
        else:
            out.append("-")
    return "".join(out).strip("-")


def safe_kube_name(name):
    """Upstream SafeKubeName, byte for byte (golden vectors in tests/unit/test_policy.py)."""
    if is_valid_kube_name(name):
        return name
    checksum = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    cleaned = sanitize_kube_name(name)
    if not cleaned:
        return "kube-" + checksum
    if len(cleaned) > 63:
        cleaned = cleaned[:54]
        if cleaned.endswith("-"):  # Go strings.TrimSuffix removes one
            cleaned = cleaned[:-1]
        cleaned = cleaned + "-" + checksum
    return cleaned


def object_name(name):
    """A Kubernetes object name from ``name``: SafeKubeName, then lower case.

    Deviation: SafeKubeName keeps valid upper-case names ("node-DATA"), which the API
    server refuses for Secrets, so upstream cannot enrol a partition labelled "DATA".
    Such names cannot exist in Kubernetes, so lower-casing breaks nothing that worked.
    """
    return safe_kube_name(name).lower()


def clean_kube_name(name):
    """Legacy servers' cleanKubeName: '_' -> '-', lower case."""
    return name.replace("_", "-").lower()


def secret_ref(volume, partition, namer=safe_kube_name):
    """(Secret name, data key) of a spec partition: upstream ``SealedVolumeData.DefaultSecret``.

    Name defaults to ``<volume>-<label>``, key to ``passphrase``; both go through ``namer``
    (the name is lower-cased as well, see :func:`object_name`; keys may hold upper case).
    """
    secret = partition.get("secret") or {}
    name = secret.get("name") or "%s-%s" % (volume, partition.get("label", ""))
    path = secret.get("path") or DEFAULT_SECRET_PATH
    return namer(name).lower(), namer(path)


def has_secret_ref(partition):
    secret = partition.get("secret") or {}
    return bool(secret.get("name") or secret.get("path"))


def label_value(text):
    """``text`` as a valid Kubernetes label value (unchanged when it already is one, as filesystem labels are)."""
    value = "".join(c if (_is_alnum(c) or c in "-_.") else "-" for c in text)[:63]
    while value and not _is_alnum(value[0]):
        value = value[1:]
    while value and not _is_alnum(value[-1]):
        value = value[:-1]
    return value


def secret_labels(tpm_hash, partition_label):
    """Labels upstream puts on TOFU Secrets (checklist 26)."""
    return {
        "app.kubernetes.io/name": "kcrypt-challenger",
        "app.kubernetes.io/component": "encryption-secret",
        TPM_HASH_LABEL: safe_kube_name(tpm_hash),
        PARTITION_LABEL: label_value(partition_label),
        "kcrypt.kairos.io/managed-by": "kcrypt-challenger",
    }


def tofu_volume_names(tpm_hash):
    """Candidate TOFU volume names: upstream's ``tofu-<hash[:8]>`` first, longer prefixes if taken."""
    names = []
    for length in (8, 16, 32, 64):
        name = object_name("tofu-" + tpm_hash[:length])
        if name not in names:
            names.append(name)
    return names


def generate_passphrase():
    """32 random bytes, base64 (standard, padded): 44 ASCII characters, as upstream."""
    return base64.b64encode(os.urandom(32))


# ---------------------------------------------------------------------------
# Attestation rules (spec §3.4 step 6, checklist 30-33)


def verify_pcrs(stored, current):
    """Upstream verifyPCRValuesSelective. ``stored`` is ``spec.attestation.pcrValues`` (or None),
    ``current`` the node's ``{"0": hex}`` (or None). Raises PolicyRejection with upstream's text."""
    stored_pcrs = (stored or {}).get("pcrs") if stored is not None else None
    if stored_pcrs is None:
        return
    order = sorted(stored_pcrs, key=_pcr_order)  # Go's map order is random; ours is numeric
    if current is None:
        for index in order:
            if stored_pcrs[index] != "":
                raise PolicyRejection("no current PCR values provided but PCR%s is required" % index)
        return
    for index in order:
        expected = stored_pcrs[index]
        if expected == "":
            continue
        value = current.get(index, "")
        if value == "":
            raise PolicyRejection("PCR%s mismatch: expected %s, but not provided in current values" % (index, expected))
        if value != expected:
            raise PolicyRejection("PCR%s changed - boot state verification failed: expected %s, got %s" % (index, expected, value))


def verify_ek(attestation, ek_pem):
    """Upstream verifyEKMatchSelective: stored "" accepts any EK, else exact PEM string equality."""
    stored = attestation.get("ekPublicKey", "") or ""
    if stored and stored != ek_pem:
        raise PolicyRejection("EK public key does not match enrolled key - potential TPM impersonation")


def verify_attestation(attestation, ek_pem, pcrs):
    """Upstream verifyAttestationData for an existing volume; nil attestation = nothing to verify."""
    if attestation is None:
        return
    try:
        verify_ek(attestation, ek_pem)
    except PolicyRejection as exc:
        raise PolicyRejection("EK verification failed: %s" % exc)
    if pcrs is not None:
        try:
            verify_pcrs(attestation.get("pcrValues"), pcrs)
        except PolicyRejection as exc:
            raise PolicyRejection("PCR verification failed: %s" % exc)


def initial_attestation(ek_pem, pcrs, now=None):
    """Upstream createInitialTOFUAttestation + EK: stores every PCR it is given."""
    now = now or now_rfc3339()
    attestation = {"ekPublicKey": ek_pem, "enrolledAt": now, "lastVerifiedAt": now}
    if pcrs is not None:
        attestation["pcrValues"] = {"pcrs": dict(pcrs)} if pcrs else {}
    return attestation


def learn_attestation(attestation, ek_pem, pcrs, now=None):
    """Upstream updateAttestationDataSelective: fill "" EK and "" PCRs (only keys already present).

    Mutates ``attestation``; returns True if anything was learned (then ``lastVerifiedAt`` is set).
    """
    changed = False
    if not attestation.get("ekPublicKey"):
        attestation["ekPublicKey"] = ek_pem
        changed = True
    stored = attestation.get("pcrValues")
    if stored is not None and pcrs:
        stored_pcrs = stored.get("pcrs") or {}
        for index in sorted(pcrs, key=_pcr_order):
            if index in stored_pcrs and stored_pcrs[index] == "" and pcrs[index] != "":
                stored_pcrs[index] = pcrs[index]
                changed = True
        if stored_pcrs:
            stored["pcrs"] = stored_pcrs
    if changed:
        attestation["lastVerifiedAt"] = now or now_rfc3339()
    return changed


def should_defer_pcrs(defer_requested, volume):
    """LiveCD deferral with anti-downgrade (spec §3.4 step 4).

    Honoured for a new TPM and for a volume whose stored PCRs are all empty; ignored
    once any PCR is enrolled. Deviation: also honoured when the volume has no
    ``attestation`` yet (upstream then stores the LiveCD's PCRs and enforces them).
    """
    if not defer_requested:
        return False
    if volume is None:
        return True
    attestation = volume["spec"].get("attestation")
    if attestation is None:
        return True
    stored = (attestation.get("pcrValues") or {}).get("pcrs") or {}
    return all(value == "" for value in stored.values())


def normalize_pcrs(pcrs):
    """``{index: hex}`` with decimal-string keys and lower-case hex values (spec §3.4 step 1)."""
    if pcrs is None:
        return {}
    clean = {}
    for index, value in pcrs.items():
        if isinstance(value, bytes):
            value = value.hex()
        clean[str(int(index))] = value.lower()
    return clean


def _pcr_order(index):
    return (0, int(index)) if str(index).isdigit() else (1, str(index))


def find_partition(volume, partition):
    """Index of the first spec partition the request matches (upstream findPartitionInVolume), or None."""
    for index, spec_partition in enumerate(volume["spec"].get("partitions") or []):
        if partition.matches(spec_partition):
            return index
    return None


def partition_entry(partition):
    """A spec partition for a request (empty identifiers omitted, as Go's omitempty does)."""
    entry = {}
    for key, value in (("label", partition.label), ("deviceName", partition.device_name), ("uuid", partition.uuid)):
        if value:
            entry[key] = value
    return entry


def _secret_suffix(spec_partition, partition):
    """What follows ``<volume>-`` in a generated Secret's name.

    Upstream uses the request's label; a request without label would name every such
    Secret ``<volume>`` (one passphrase for several partitions), so we fall back to
    the device name or UUID. With a label the name is upstream's.
    """
    for value in (spec_partition.get("label"), partition.label, spec_partition.get("deviceName"),
                  partition.device_name, spec_partition.get("uuid"), partition.uuid):
        if value:
            return value
    return ""


# ---------------------------------------------------------------------------
# The policy


class Policy(object):
    """Decides, with the store, whether and which passphrase a verified TPM gets.

    ``enrollment``: ``tofu`` (default; an unknown TPM is enrolled on first contact) or
    ``registered-only`` (only TPMs and partitions registered by an administrator are
    served; a registered partition without a Secret still gets a generated one).
    """

    def __init__(self, store, enrollment=ENROLLMENT_TOFU):
        if enrollment not in ENROLLMENT_MODES:
            raise KcryptError("enrollment must be one of %s, got %r" % (", ".join(ENROLLMENT_MODES), enrollment))
        self.store = store
        self.enrollment = enrollment

    # -- newest protocol ---------------------------------------------------

    def issue_passphrase(self, tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment=False):
        """Return the passphrase bytes for ``partition`` of the TPM, or raise PolicyRejection.

        ``ek_pem``: the EK as ``PUBLIC KEY`` PEM (identity.public_key_pem); ``pcrs``:
        ``{"0": hex, ...}`` from the verified quote. Store failures raise StoreError
        (a KcryptError that is not a rejection: the node may retry).
        """
        pcrs = normalize_pcrs(pcrs)
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self._issue(tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment)
            except _Retry as exc:
                log.debug("TPM %s: %s; retrying (attempt %d)", tpm_hash[:8], exc, attempt + 1)
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise KcryptError("TPM %s: the store kept changing under %d attempts; try again" % (tpm_hash[:8], MAX_ATTEMPTS))

    def _issue(self, tpm_hash, ek_pem, pcrs, partition, defer):
        volume = self.store.find_volume(tpm_hash)
        if defer and should_defer_pcrs(defer, volume):
            pcrs = {index: "" for index in pcrs}
        if volume is None:
            if self.enrollment != ENROLLMENT_TOFU:
                raise PolicyRejection("TPM %s is not registered and enrollment is registered-only" % tpm_hash)
            return self._enroll(tpm_hash, ek_pem, pcrs, partition)

        spec = volume["spec"]
        index = find_partition(volume, partition)
        if spec.get("quarantined"):
            raise PolicyRejection("TPM is quarantined")
        attestation = spec.get("attestation")
        try:
            verify_attestation(attestation, ek_pem, pcrs)
        except PolicyRejection as exc:
            raise PolicyRejection("attestation verification failed: %s" % exc)

        if index is None:
            return self._add_partition(volume, tpm_hash, partition)
        return self._existing_partition(volume, index, tpm_hash, ek_pem, pcrs, partition)

    def _enroll(self, tpm_hash, ek_pem, pcrs, partition):
        """New TPM: Secret first (created or reused), then the SealedVolume (spec §3.4 step 7)."""
        name = self._free_volume_name(tpm_hash)
        entry = partition_entry(partition)
        secret_name, passphrase = self._claim_secret(
            object_name("%s-%s" % (name, _secret_suffix(entry, partition))), tpm_hash, partition.label,
            "initial enrollment: creating TOFU secret")
        entry["secret"] = {"name": secret_name, "path": DEFAULT_SECRET_PATH}
        doc = new_volume(name, tpm_hash, [entry], attestation=initial_attestation(ek_pem, pcrs))
        try:
            self.store.create_volume(doc)
        except AlreadyExists:
            raise _Retry("SealedVolume %s was created concurrently" % name)
        log.info("TPM %s enrolled on first use as SealedVolume %s (%s)", tpm_hash[:8], name, partition.describe())
        return passphrase

    def _free_volume_name(self, tpm_hash):
        for name in tofu_volume_names(tpm_hash):
            existing = self.store.get_volume(name)
            if existing is None:
                return name
            if existing["spec"].get("TPMHash") == tpm_hash:
                raise _Retry("SealedVolume %s for this TPM appeared" % name)
        raise PolicyRejection("initial enrollment: every SealedVolume name for TPM %s is taken" % tpm_hash)

    def _add_partition(self, volume, tpm_hash, partition):
        """New partition on an enrolled TPM: own Secret, appended to the volume; attestation untouched."""
        if self.enrollment != ENROLLMENT_TOFU:
            raise PolicyRejection("partition %s is not registered for this TPM and enrollment is registered-only"
                                  % partition.describe())
        entry = partition_entry(partition)
        secret_name, passphrase = self._claim_secret(
            object_name("%s-%s" % (volume_name(volume), _secret_suffix(entry, partition))), tpm_hash,
            partition.label, "adding new partition: creating TOFU secret")
        entry["secret"] = {"name": secret_name, "path": DEFAULT_SECRET_PATH}
        volume["spec"].setdefault("partitions", []).append(entry)
        self._update(volume)
        log.info("TPM %s: partition %s added to SealedVolume %s", tpm_hash[:8], partition.describe(), volume_name(volume))
        return passphrase

    def _existing_partition(self, volume, index, tpm_hash, ek_pem, pcrs, partition):
        # ``volume`` is a fresh copy from the store (Store contract), so it is changed in place.
        spec = volume["spec"]
        spec_partition = spec["partitions"][index]
        name = volume_name(volume)
        changed = False
        if spec.get("attestation") is None:
            # No attestation yet: learn everything; a partition without a Secret reference
            # gets a generated Secret ("deferred TOFU").
            if not has_secret_ref(spec_partition):
                self._generate_for(volume, spec_partition, tpm_hash, partition, "re-enrollment data update: creating TOFU secret")
            spec["attestation"] = initial_attestation(ek_pem, pcrs)
            changed = True
        else:
            changed = learn_attestation(spec["attestation"], ek_pem, pcrs)
            if not has_secret_ref(spec_partition) and self.store.get_secret(secret_ref(name, spec_partition)[0]) is None:
                # Deviation: upstream fails with "secret not found" here; we generate it.
                self._generate_for(volume, spec_partition, tpm_hash, partition, "re-enrollment data update: creating TOFU secret")
                changed = True
        if changed:
            self._update(volume)
        return self._read_passphrase(name, spec_partition)

    def _generate_for(self, volume, spec_partition, tpm_hash, partition, context):
        base = object_name("%s-%s" % (volume_name(volume), _secret_suffix(spec_partition, partition)))
        secret_name = self._claim_secret(base, tpm_hash, spec_partition.get("label", partition.label), context)[0]
        spec_partition["secret"] = {"name": secret_name, "path": DEFAULT_SECRET_PATH}

    def _claim_secret(self, base_name, tpm_hash, partition_label, context):
        """Create the Secret or reuse an existing one of this TPM; returns (name, passphrase).

        An existing Secret is reused (upstream) unless its tpm-hash label names another
        TPM: then a name with a longer hash suffix is tried, so one TPM never gets
        another's passphrase.
        """
        owner = safe_kube_name(tpm_hash)
        candidates = [base_name] + [object_name("%s-%s" % (base_name, tpm_hash[:n])) for n in (8, 16, 32)]
        for name in candidates:
            passphrase = generate_passphrase()
            try:
                self.store.create_secret(new_secret(name, {DEFAULT_SECRET_PATH: passphrase},
                                                    labels=secret_labels(tpm_hash, partition_label)))
                return name, passphrase
            except AlreadyExists:
                existing = self.store.get_secret(name)
            if existing is None:
                raise _Retry("Secret %s disappeared" % name)
            labels = existing["metadata"].get("labels") or {}
            if labels.get(TPM_HASH_LABEL) not in (None, owner):
                log.warning("Secret %s belongs to another TPM; not reusing it for TPM %s", name, tpm_hash[:8])
                continue
            value = existing["data"].get(DEFAULT_SECRET_PATH)
            if not value:
                raise PolicyRejection("%s: existing secret does not contain expected passphrase data at path %s"
                                      % (context, DEFAULT_SECRET_PATH))
            log.info("TPM %s: reusing existing Secret %s", tpm_hash[:8], name)
            return name, value
        raise PolicyRejection("%s: every Secret name for TPM %s is taken by another TPM" % (context, tpm_hash))

    def _update(self, volume):
        try:
            self.store.update_volume(volume)
        except (Conflict, NotFound):
            raise _Retry("SealedVolume %s changed concurrently" % volume_name(volume))

    def _read_passphrase(self, name, spec_partition):
        secret_name, path = secret_ref(name, spec_partition)
        secret = self.store.get_secret(secret_name)
        if secret is None:
            raise PolicyRejection('retrieving secret: secrets "%s" not found' % secret_name)
        if path not in secret["data"]:
            raise PolicyRejection("passphrase not found in secret at key: %s" % path)
        return secret["data"][path]

    # -- legacy protocol (spec §2.B) ----------------------------------------

    def _legacy_find(self, tpm_hash, partition):
        """Upstream findVolumeFor: the first volume of this TPM with a matching partition."""
        for volume in self.store.volumes_for(tpm_hash):
            index = find_partition(volume, partition)
            if index is not None:
                return volume, volume["spec"]["partitions"][index]
        return None, None

    def legacy_get_pass(self, tpm_hash, partition):
        """The ``/getPass`` answer: ``{"passphrase", "error", "generated_by"}`` (all keys always present)."""
        volume, spec_partition = self._legacy_find(tpm_hash, partition)
        if volume is None:
            return legacy_payload(error="no volume found with data from request and hash: %s" % tpm_hash)
        label = spec_partition.get("label", "")
        if volume["spec"].get("quarantined"):
            return legacy_payload(error="quarantined: %s" % label)
        secret_name, path = secret_ref(volume_name(volume), spec_partition, namer=clean_kube_name)
        secret = self.store.get_secret(secret_name)
        if secret is None:
            return legacy_payload(error="No secret found for %s and %s" % (tpm_hash, label))
        data = secret["data"]
        return legacy_payload(passphrase=data.get(path, b"").decode("utf-8", "replace"),
                              generated_by=data.get(GENERATED_BY_KEY, b"").decode("utf-8", "replace"))

    def legacy_post_pass(self, tpm_hash, partition, payload):
        """``/postPass``: store the node's TPM-encrypted passphrase unless a Secret exists already.

        Returns True if a Secret was created, False if one existed (upstream ignores the
        post then: a Secret is never overwritten). Raises PolicyRejection with upstream's texts.
        """
        volume, spec_partition = self._legacy_find(tpm_hash, partition)
        if volume is None:
            raise PolicyRejection("no TPM Hash found for %s" % tpm_hash)
        passphrase = (payload or {}).get("passphrase") or ""
        error = (payload or {}).get("error") or ""
        if not isinstance(passphrase, str) or not passphrase:
            raise PolicyRejection("invalid answer from client: doesn't contain any passphrase")
        if error:  # upstream reports it and goes on storing; we stop
            raise PolicyRejection("error: %s" % error)
        generated_by = (payload or {}).get(GENERATED_BY_KEY) or ""
        secret_name, path = secret_ref(volume_name(volume), spec_partition, namer=clean_kube_name)
        if self.store.get_secret(secret_name) is not None:
            return False
        labels = secret_labels(tpm_hash, spec_partition.get("label", ""))
        try:
            self.store.create_secret(new_secret(secret_name, {path: passphrase, GENERATED_BY_KEY: str(generated_by)}, labels=labels))
        except AlreadyExists:
            return False
        return True


def legacy_payload(passphrase="", error="", generated_by=""):
    return {"passphrase": passphrase, "error": error, "generated_by": generated_by}
