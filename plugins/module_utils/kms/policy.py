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
* A Secret is one partition's (kms/secret_ownership.py): an existing Secret under a derived
  name is used only when it is this partition's; a new partition whose derived name is
  someone else's Secret gets a Secret of its own under another name. Upstream reuses
  whatever it finds, so a TPM could claim another volume's passphrase.
* What a node declares is bounded (common/partition_ref.py) and a TPM gets at most
  ``max_partitions_per_tpm`` partitions; a request naming no partition is refused.
* A volume with ``attestation`` is served over ``/tpm-attestation`` only
  (volume_attestation.legacy_refusal): the legacy protocol has no quote.
* No write when nothing changed (upstream updates unconditionally).
* With ``ek_certificates`` (kms/ek_certificate.py), an unknown TPM enrols only if its EK
  certificate chains to a trusted manufacturer CA (or, ``verify-if-present``, sends none);
  TPMs with a SealedVolume are served by it.

Every refusal is a PolicyRejection raised before anything is written.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as ownership
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.ek_certificate import EKCertificatePolicy
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    DEFAULT_SECRET_PATH,
    clean_kube_name,
    has_secret_ref,
    names_secret,
    object_name,
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
    legacy_refusal,
    normalize_pcrs,
    relearn_pcrs,
    should_defer_pcrs,
    verify_volume,
)

ENROLLMENT_TOFU = "tofu"
ENROLLMENT_REGISTERED_ONLY = "registered-only"
ENROLLMENT_MODES = (ENROLLMENT_TOFU, ENROLLMENT_REGISTERED_ONLY)
GENERATED_BY_KEY = "generated_by"
MAX_ATTEMPTS = 20
# Kairos encrypts COS_PERSISTENT and COS_OEM, sometimes a few data partitions: 16 leaves room, and bounds
# what one enrolled TPM can make the store hold (each partition: a spec entry and a Secret).
DEFAULT_MAX_PARTITIONS_PER_TPM = 16
MAX_PARTITIONS_LIMIT = 1024

log = logging.getLogger("kcrypt.policy")
audit_log = logging.getLogger("kcrypt.audit")


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
    """A spec partition for a request (empty identifiers and ``uuid: unknown`` omitted, as Go's omitempty does)."""
    entry = {}
    for key, value in (("label", partition.label), ("deviceName", partition.device_name), ("uuid", partition.known_uuid)):
        if value:
            entry[key] = value
    return entry


def check_partition(partition):
    """Refuse what a node may not declare (sizes, characters, nothing named) before anything is read or written."""
    problem = partition.problem()
    if problem:
        raise PolicyRejection("invalid partition: %s" % problem)


def _secret_suffix(spec_partition, partition):
    """What follows ``<volume>-`` in a generated Secret's name.

    Upstream uses the request's label; a request without label would name every such
    Secret ``<volume>`` (one passphrase for several partitions), so we fall back to
    the device name or UUID. With a label the name is upstream's.
    """
    for value in (spec_partition.get("label"), partition.label, spec_partition.get("deviceName"),
                  partition.device_name, spec_partition.get("uuid"), partition.known_uuid):
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
    ``max_partitions_per_tpm``: how many partitions a TPM may have before TOFU stops adding
    more (registrations by an administrator are not limited).
    ``ek_certificates``: an EKCertificatePolicy deciding which unknown TPMs may enrol
    (default: any, as upstream).
    """

    def __init__(self, store, enrollment=ENROLLMENT_TOFU, max_partitions_per_tpm=DEFAULT_MAX_PARTITIONS_PER_TPM,
                 ek_certificates=None):
        if enrollment not in ENROLLMENT_MODES:
            raise KcryptError("enrollment must be one of %s, got %r" % (", ".join(ENROLLMENT_MODES), enrollment))
        self.store = store
        self.enrollment = enrollment
        self.max_partitions_per_tpm = parse_max_partitions(max_partitions_per_tpm)
        self.ek_certificates = ek_certificates or EKCertificatePolicy()

    # -- newest protocol ---------------------------------------------------

    def issue_passphrase(self, tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment=False, ek_certificate=b"",
                         ek_chain=()):
        """Return the passphrase bytes for ``partition`` of the TPM, or raise PolicyRejection.

        ``ek_pem``: the EK as ``PUBLIC KEY`` PEM (identity.public_key_pem); ``pcrs``:
        ``{"0": hex, ...}`` from the verified quote; ``ek_certificate``/``ek_chain``: the DER
        certificates the node sent (checked only before an enrolment). Store failures raise
        StoreError (a KcryptError that is not a rejection: the node may retry).
        """
        check_partition(partition)
        pcrs = normalize_pcrs(pcrs)
        admission = _Admission(self.ek_certificates, tpm_hash, ek_pem, ek_certificate, ek_chain)
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self._issue(tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment, admission)
            except _Retry as exc:
                log.debug("TPM %s: %s; retrying (attempt %d)", tpm_hash[:8], exc, attempt + 1)
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise KcryptError("TPM %s: the store kept changing under %d attempts; try again" % (tpm_hash[:8], MAX_ATTEMPTS))

    def _issue(self, tpm_hash, ek_pem, pcrs, partition, defer, admission):
        volume = self.store.find_volume(tpm_hash)
        if defer and should_defer_pcrs(defer, volume):
            pcrs = {index: "" for index in pcrs}
        if volume is None:
            if self.enrollment != ENROLLMENT_TOFU:
                raise PolicyRejection("TPM %s is not registered and enrollment is registered-only" % tpm_hash)
            verdict = admission.verdict()
            if not verdict.admitted:
                raise PolicyRejection("TPM %s refused on first contact: %s" % (tpm_hash, verdict.describe()))
            return self._enroll(tpm_hash, ek_pem, pcrs, partition, verdict)

        index = find_partition(volume, partition)
        verify_volume(volume["spec"], ek_pem, pcrs)
        if index is None:
            return self._add_partition(volume, tpm_hash, partition)
        return self._existing_partition(volume, index, tpm_hash, ek_pem, pcrs, partition)

    def _enroll(self, tpm_hash, ek_pem, pcrs, partition, verdict):
        """New TPM: Secret first (created or reused), then the SealedVolume (spec §3.4 step 7)."""
        name = self._free_volume_name(tpm_hash)
        entry = partition_entry(partition)
        doc = new_volume(name, tpm_hash, [], attestation=initial_attestation(ek_pem, pcrs))
        secret_name, passphrase = self._claim_secret(
            doc, None, object_name("%s-%s" % (name, _secret_suffix(entry, partition))), tpm_hash, partition.label,
            "initial enrollment: creating TOFU secret")
        entry["secret"] = {"name": secret_name, "path": DEFAULT_SECRET_PATH}
        doc["spec"]["partitions"].append(entry)
        try:
            self.store.create_volume(doc)
        except AlreadyExists:
            raise _Retry("SealedVolume %s was created concurrently" % name)
        log.info("TPM %s enrolled on first use as SealedVolume %s (%s); %s", tpm_hash[:8], name, partition.describe(),
                 verdict.describe())
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
        count = len(volume["spec"].get("partitions") or [])
        if count >= self.max_partitions_per_tpm:
            raise PolicyRejection("TPM %s has %d partitions (max_partitions_per_tpm); not adding partition %s"
                                  % (tpm_hash, count, partition.describe()))
        entry = partition_entry(partition)
        secret_name, passphrase = self._claim_secret(
            volume, None, object_name("%s-%s" % (volume_name(volume), _secret_suffix(entry, partition))), tpm_hash,
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
        relearned = []
        if not names_secret(spec_partition):
            changed = self._settle_secret(volume, index, tpm_hash, partition)
        if spec.get("attestation") is None:
            spec["attestation"] = initial_attestation(ek_pem, pcrs)  # nothing verified yet: learn everything
            changed = True
        else:
            changed = learn_attestation(spec["attestation"], ek_pem, pcrs) or changed
            relearned = relearn_pcrs(spec["attestation"], pcrs)  # changed inside an upgrade window
            changed = changed or bool(relearned)
        if changed or self.store.needs_index(volume):  # the write also indexes a volume other tools made
            self._update(volume)
        for pcr, old, new, until in relearned:
            audit_log.info("pcr-relearn volume=%s tpm_hash=%s pcr=%s old=%s new=%s window_until=%s", name, tpm_hash,
                           pcr, old, new, until)
        return self._read_passphrase(name, spec_partition)

    def _settle_secret(self, volume, index, tpm_hash, partition):
        """A registered partition whose Secret name is derived: use the Secret under that name if it is this
        partition's, else generate one (a partition with neither secret name nor path: upstream's "deferred
        TOFU", and our fix for a missing one); then write the name into the partition, so it is checked once.
        Returns True if the partition changed; raises PolicyRejection when the name is ambiguous."""
        spec_partition = volume["spec"]["partitions"][index]
        name, _path = secret_ref(volume_name(volume), spec_partition)
        may_generate = not has_secret_ref(spec_partition)
        existing = self.store.get_secret(name)
        if existing is not None:
            verdict = ownership.verdict(self.store, tpm_hash, volume, index, name, existing)
            if verdict.kind == ownership.OWNED:
                spec_partition["secret"] = dict(spec_partition.get("secret") or {}, name=name)
                spec_partition["secret"].setdefault("path", DEFAULT_SECRET_PATH)
                return True
            if verdict.kind == ownership.AMBIGUOUS or not may_generate:
                raise PolicyRejection("secret %s is not this partition's: %s" % (name, verdict.reason))
            log.warning("TPM %s: Secret %s is not partition %s's (%s); generating one of its own",
                        tpm_hash[:8], name, partition.describe(), verdict.reason)
        elif not may_generate:
            return False  # upstream: reading it fails with "secrets ... not found"
        base = object_name("%s-%s" % (volume_name(volume), _secret_suffix(spec_partition, partition)))
        secret_name = self._claim_secret(volume, index, base, tpm_hash, spec_partition.get("label", partition.label),
                                         "re-enrollment data update: creating TOFU secret")[0]
        spec_partition["secret"] = {"name": secret_name, "path": DEFAULT_SECRET_PATH}
        return True

    def _claim_secret(self, volume, index, base_name, tpm_hash, partition_label, context):
        """Create a Secret for partition ``index`` of ``volume`` (None: one being added), or reuse one that is
        this partition's (upstream reuses whatever exists); returns (name, passphrase).

        A name whose Secret is someone else's (secret_ownership) is skipped for one with a hash
        suffix, so a partition never gets another's passphrase.
        """
        candidates = [base_name] + [object_name("%s-%s" % (base_name, tpm_hash[:n])) for n in (8, 16, 32)]
        labels = secret_labels(tpm_hash, partition_label, volume_name(volume))
        for name in candidates:
            passphrase = new_tofu_passphrase()
            try:
                self.store.create_secret(new_secret(name, {DEFAULT_SECRET_PATH: passphrase}, labels=labels))
                return name, passphrase
            except AlreadyExists:
                existing = self.store.get_secret(name)
            if existing is None:
                raise _Retry("Secret %s disappeared" % name)
            verdict = ownership.verdict(self.store, tpm_hash, volume, index, name, existing)
            if verdict.kind != ownership.OWNED:
                log.warning("TPM %s: not reusing Secret %s: %s", tpm_hash[:8], name, verdict.reason)
                continue
            value = existing["data"].get(DEFAULT_SECRET_PATH)
            if not value:
                raise PolicyRejection("%s: existing secret does not contain expected passphrase data at path %s"
                                      % (context, DEFAULT_SECRET_PATH))
            log.info("TPM %s: reusing existing Secret %s", tpm_hash[:8], name)
            return name, value
        raise PolicyRejection("%s: every Secret name for TPM %s is taken by another partition" % (context, tpm_hash))

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
        """``/recovery-escrow`` after the TPM proof: kms/recovery.py. Returns the recovery Secret's name.

        The partition is bounded as for a passphrase (check_partition); nothing is enrolled or added here.
        """
        check_partition(partition)
        return recovery.escrow(self.store, tpm_hash, ek_pem, pcrs, partition, recovery_key)

    # -- legacy protocol (spec §2.B) ----------------------------------------

    def _legacy_find(self, tpm_hash, partition):
        """Upstream findVolumeFor: the first volume of this TPM with a matching partition, and its index.

        Refused (PolicyRejection) for a TPM with a volume that must use the attestation protocol.
        """
        volumes = self.store.volumes_for(tpm_hash)
        for volume in volumes:
            refusal = legacy_refusal(volume)
            if refusal:
                raise PolicyRejection(refusal)
        for volume in volumes:
            index = find_partition(volume, partition)
            if index is not None:
                return volume, index
        return None, None

    def _check_derived_secret(self, tpm_hash, volume, index, name, secret):
        """Unless partition ``index`` names its Secret, PolicyRejection if it may not use ``secret`` (or, when None,
        create a Secret) under its derived ``name`` (secret_ownership)."""
        if names_secret(volume["spec"]["partitions"][index]):
            return  # named by an administrator, or settled by the newest protocol
        verdict = ownership.verdict(self.store, tpm_hash, volume, index, name, secret)
        if verdict.kind != ownership.OWNED:
            raise PolicyRejection("secret %s is not this partition's: %s" % (name, verdict.reason))

    def legacy_get_pass(self, tpm_hash, partition):
        """The ``/getPass`` answer: ``{"passphrase", "error", "generated_by"}`` (all keys always present)."""
        try:
            check_partition(partition)
            volume, index = self._legacy_find(tpm_hash, partition)
            if volume is None:
                return _get_pass_reply(error="no volume found with data from request and hash: %s" % tpm_hash)
            spec_partition = volume["spec"]["partitions"][index]
            label = spec_partition.get("label", "")
            if volume["spec"].get("quarantined"):
                return _get_pass_reply(error="quarantined: %s" % label)
            name, path = secret_ref(volume_name(volume), spec_partition, namer=clean_kube_name)
            secret = self.store.get_secret(name)
            if secret is None:
                return _get_pass_reply(error="No secret found for %s and %s" % (tpm_hash, label))
            self._check_derived_secret(tpm_hash, volume, index, name, secret)
        except PolicyRejection as exc:
            return _get_pass_reply(error=str(exc))
        data = secret["data"]
        return _get_pass_reply(passphrase=data.get(path, b"").decode("utf-8", "replace"),
                               generated_by=data.get(GENERATED_BY_KEY, b"").decode("utf-8", "replace"))

    def legacy_post_pass(self, tpm_hash, partition, payload):
        """``/postPass``: store the node's TPM-encrypted passphrase unless a Secret exists already.

        Returns True if a Secret was created, False if one existed (upstream ignores the
        post then: a Secret is never overwritten). Raises PolicyRejection with upstream's texts,
        and for a volume that must use the attestation protocol or a Secret name that is another
        partition's.
        """
        check_partition(partition)
        volume, index = self._legacy_find(tpm_hash, partition)
        if volume is None:
            raise PolicyRejection("no TPM Hash found for %s" % tpm_hash)
        passphrase = (payload or {}).get("passphrase") or ""
        error = (payload or {}).get("error") or ""
        if not isinstance(passphrase, str) or not passphrase:
            raise PolicyRejection("invalid answer from client: doesn't contain any passphrase")
        if error:  # upstream reports it and goes on storing; we stop
            raise PolicyRejection("error: %s" % error)
        generated_by = (payload or {}).get(GENERATED_BY_KEY) or ""
        spec_partition = volume["spec"]["partitions"][index]
        secret_name, path = secret_ref(volume_name(volume), spec_partition, namer=clean_kube_name)
        if self.store.get_secret(secret_name) is not None:
            return False
        self._check_derived_secret(tpm_hash, volume, index, secret_name, None)
        labels = secret_labels(tpm_hash, spec_partition.get("label", ""), volume_name(volume))
        try:
            self.store.create_secret(new_secret(secret_name, {path: passphrase, GENERATED_BY_KEY: str(generated_by)}, labels=labels))
        except AlreadyExists:
            return False
        return True


class _Admission(object):
    """The EK certificate verdict of one request, computed at most once and only when the TPM is unknown."""

    def __init__(self, ek_certificates, tpm_hash, ek_pem, certificate, chain):
        self._args = (tpm_hash, ek_pem, certificate or b"", tuple(chain or ()))
        self._policy = ek_certificates
        self._verdict = None

    def verdict(self):
        if self._verdict is None:
            self._verdict = self._policy.admit(*self._args)
            if not self._verdict.admitted:
                log.warning("TPM %s refused on first contact: %s", self._args[0], self._verdict.describe())
        return self._verdict


def parse_max_partitions(value):
    """``max_partitions_per_tpm``: a whole number from 1 to MAX_PARTITIONS_LIMIT."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise KcryptError("max_partitions_per_tpm must be a number, not %r" % (value,)) from None
    if isinstance(value, bool) or not 1 <= number <= MAX_PARTITIONS_LIMIT or str(number) != str(value).strip():
        raise KcryptError("max_partitions_per_tpm must be a whole number from 1 to %d, not %r" % (MAX_PARTITIONS_LIMIT, value))
    return number


def _get_pass_reply(passphrase="", error="", generated_by=""):
    """The fields of a legacy /getPass payload (the server encodes them with messages.legacy_payload)."""
    return {"passphrase": passphrase, "error": error, "generated_by": generated_by}
