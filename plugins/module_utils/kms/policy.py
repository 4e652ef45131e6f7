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
import logging
import os
import random
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    DEFAULT_SECRET_PATH,
    TPM_HASH_LABEL,
    clean_kube_name,
    has_secret_ref,
    object_name,
    safe_kube_name,
    secret_labels,
    secret_ref,
    tofu_volume_names,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    new_secret,
    new_volume,
    volume_name,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import (
    PolicyRejection,
    initial_attestation,
    learn_attestation,
    normalize_pcrs,
    should_defer_pcrs,
    verify_attestation,
)

ENROLLMENT_TOFU = "tofu"
ENROLLMENT_REGISTERED_ONLY = "registered-only"
ENROLLMENT_MODES = (ENROLLMENT_TOFU, ENROLLMENT_REGISTERED_ONLY)
GENERATED_BY_KEY = "generated_by"
MAX_ATTEMPTS = 20

log = logging.getLogger("kcrypt.policy")


class _Retry(Exception):
    """A write lost a race: start over from fresh reads."""


def new_tofu_passphrase():
    """32 random bytes, base64 (standard, padded): 44 ASCII characters, as upstream."""
    return base64.b64encode(os.urandom(32))


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
            passphrase = new_tofu_passphrase()
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

    # -- recovery-key escrow (ours) ------------------------------------------

    def escrow_recovery_key(self, tpm_hash, ek_pem, pcrs, partition, recovery_key):
        """``/recovery-escrow`` after the TPM proof: kms/recovery.py. Returns the recovery Secret's name."""
        return recovery.escrow(self.store, tpm_hash, ek_pem, pcrs, partition, recovery_key)

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
            return _get_pass_reply(error="no volume found with data from request and hash: %s" % tpm_hash)
        label = spec_partition.get("label", "")
        if volume["spec"].get("quarantined"):
            return _get_pass_reply(error="quarantined: %s" % label)
        secret_name, path = secret_ref(volume_name(volume), spec_partition, namer=clean_kube_name)
        secret = self.store.get_secret(secret_name)
        if secret is None:
            return _get_pass_reply(error="No secret found for %s and %s" % (tpm_hash, label))
        data = secret["data"]
        return _get_pass_reply(passphrase=data.get(path, b"").decode("utf-8", "replace"),
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


def _get_pass_reply(passphrase="", error="", generated_by=""):
    """The fields of a legacy /getPass payload (the server encodes them with messages.legacy_payload)."""
    return {"passphrase": passphrase, "error": error, "generated_by": generated_by}
