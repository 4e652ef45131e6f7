# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Recovery keys in the KMS: escrowed by a node that proved its TPM, revealed only to an administrator.

Private to the collection.

* :func:`escrow` runs in the server (``/recovery-escrow``) after the same TPM proof as
  ``/tpm-attestation`` (credential activation, then a quote bound to the activation secret): the
  TPM must be registered, not quarantined, pass its SealedVolume's EK/PCR checks (the same
  ``volume_attestation.verify_volume`` as a passphrase, PCR upgrade windows included), and the
  partition must be one of its SealedVolume's. Nothing is learned or enrolled here: an escrow
  only ever writes the recovery-key Secret of that one partition. The EK certificate policy
  (kms/ek_certificate.py) decides which unknown TPMs may enrol; an escrow needs a SealedVolume,
  which only an enrolment that passed it or an administrator's registration creates, so with
  ``--ek-certificate require`` a TPM without an accepted certificate cannot escrow either.
* :func:`reveal` runs in the admin tools (``kcrypt-challenger recovery show``, the
  ``kairos_recovery_key`` module). Each partition's audit event is recorded *before* its key is
  read; when the event cannot be recorded, nothing is read.

Recovery-key Secrets are kept apart from passphrase Secrets by the store (``put_recovery_secret``,
``get_recovery_secret``): the protocol paths read passphrase Secrets only, so no request of a
node, whatever partition, label or name it sends, can be answered with a recovery key.
"""

from __future__ import annotations

import getpass
import os
import socket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.identity import is_tpm_hash
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    RECOVERY_SECRET_KEY,
    recovery_secret_labels,
    recovery_secret_name,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import new_secret, now_rfc3339, volume_name
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import (
    PolicyRejection,
    normalize_pcrs,
    verify_volume,
)

ESCROWED_AT_ANNOTATION = "kcrypt.kairos.io/escrowed-at"
ACTION_REVEALED = "recovery-key-revealed"
ACTION_CHECKED = "recovery-key-checked"
MAX_REASON = 500  # characters of the audit event's reason


def partition_suffix(spec_partition):
    """What names a spec partition's recovery Secret: its label, else its device name, else its UUID.

    Taken from the SealedVolume only (never from the request), so the node's escrow and the
    administrator's lookup find the same name.
    """
    for key in ("label", "deviceName", "uuid"):
        if spec_partition.get(key):
            return spec_partition[key]
    return ""


def describe_partition(spec_partition):
    return spec_partition.get("label") or spec_partition.get("deviceName") or spec_partition.get("uuid") or "?"


def escrow(store, tpm_hash, ek_pem, pcrs, partition, recovery_key):
    """Store ``recovery_key`` for ``partition`` (a PartitionRef) of the TPM's SealedVolume; returns the Secret's name.

    Raises PolicyRejection (the node is told why, nothing is written) or StoreError.
    """
    volume = store.find_volume(tpm_hash)
    if volume is None:
        raise PolicyRejection("TPM %s is not registered: a recovery key is escrowed only for a partition the KMS "
                              "already serves (fetch the partition's key first)" % tpm_hash)
    spec = volume["spec"]
    verify_volume(spec, ek_pem, normalize_pcrs(pcrs))
    spec_partition = None
    for candidate in spec.get("partitions") or []:
        if partition.matches(candidate):
            spec_partition = candidate
            break
    if spec_partition is None:
        raise PolicyRejection("partition %s is not registered for this TPM: a recovery key is escrowed only for the "
                              "partitions of its SealedVolume" % partition.describe())
    volume = volume_name(volume)
    name = recovery_secret_name(volume, partition_suffix(spec_partition))
    doc = new_secret(name, {RECOVERY_SECRET_KEY: recovery_key},
                     labels=recovery_secret_labels(tpm_hash, spec_partition.get("label", ""), volume))
    doc["metadata"]["annotations"] = {ESCROWED_AT_ANNOTATION: now_rfc3339()}
    store.put_recovery_secret(doc)
    return name


def local_actor(tool):
    """Who runs this process, for the audit: the login user behind sudo too, the uid, the host and the tool."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container): the uid still says who
        user = "?"
    behind = os.environ.get("SUDO_USER")
    who = "%s via sudo as %s" % (behind, user) if behind and behind != user else user
    return "%s (uid %d) on %s with %s" % (who, os.getuid(), socket.gethostname(), tool)


def find_volume(store, target):
    """A SealedVolume by TPM hash (its first) or by name; KcryptError if none."""
    text = (target or "").strip()
    if is_tpm_hash(text.lower()):
        volume = store.find_volume(text.lower())
        if volume is None:
            raise KcryptError("no SealedVolume for TPM %s" % text)
        return volume
    volume = store.get_volume(text) if text else None
    if volume is None:
        raise KcryptError("no SealedVolume named %s" % (text or "''"))
    return volume


def reveal(store, target, actor, partition=None, show_key=True, reason=""):
    """The recovery keys of a SealedVolume's partitions, each read after its audit event was recorded.

    ``target``: TPM hash or SealedVolume name; ``partition``: a label (or device name or UUID) to
    limit it to one partition; ``show_key`` False only says whether a key is escrowed (still audited:
    the store hands the key to this process either way); ``reason`` (a ticket, a sentence) goes into the
    audit event. Returns one dict per partition:
    ``sealedvolume``, ``tpm_hash``, ``partition``, ``secret``, ``escrowed``, ``escrowed_at``,
    ``recovery_key`` (bytes, or None).
    """
    if len(reason or "") > MAX_REASON:
        raise KcryptError("the reason is %d characters; at most %d are recorded" % (len(reason), MAX_REASON))
    volume = find_volume(store, target)
    name = volume_name(volume)
    tpm_hash = volume["spec"].get("TPMHash", "")
    partitions = volume["spec"].get("partitions") or []
    if partition:
        partitions = [p for p in partitions if partition in (p.get("label"), p.get("deviceName"), p.get("uuid"))]
        if not partitions:
            raise KcryptError("SealedVolume %s has no partition %s" % (name, partition))
    found = []
    for spec_partition in partitions:
        secret_name = recovery_secret_name(name, partition_suffix(spec_partition))
        store.record_audit_event({"action": ACTION_REVEALED if show_key else ACTION_CHECKED, "actor": actor,
                                  "tpm_hash": tpm_hash, "sealedvolume": name,
                                  "partition": describe_partition(spec_partition), "secret": secret_name,
                                  "reason": reason})
        secret = store.get_recovery_secret(secret_name)
        key = (secret or {}).get("data", {}).get(RECOVERY_SECRET_KEY)
        found.append({
            "sealedvolume": name, "tpm_hash": tpm_hash, "partition": describe_partition(spec_partition),
            "secret": secret_name, "escrowed": key is not None,
            "escrowed_at": ((secret or {}).get("metadata", {}).get("annotations") or {}).get(ESCROWED_AT_ANNOTATION, ""),
            "recovery_key": key if show_key else None,
        })
    return found
