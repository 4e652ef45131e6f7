# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kubernetes names and labels of SealedVolumes and their Secrets (spec §3.3, upstream pkg/kube/names.go).

Private to the collection. Both stores use these names, so a volume written by one
is the volume the other (and upstream) would write.
"""

from __future__ import annotations

import hashlib
import re

DEFAULT_SECRET_PATH = "passphrase"
TPM_HASH_LABEL = "kcrypt.kairos.io/tpm-hash"
PARTITION_LABEL = "kcrypt.kairos.io/partition"
# Ours (upstream does not set it): the SealedVolume a Secret was made for, so "whose is it" is one label
# comparison instead of a scan of every SealedVolume (kms/secret_ownership.py).
VOLUME_LABEL = "kcrypt.kairos.io/sealedvolume"
# Recovery keys (escrowed by nodes, read only by administrators): their own label, key and name suffix
SECRET_TYPE_LABEL = "kcrypt.kairos.io/secret-type"
RECOVERY_SECRET_TYPE = "recovery-key"
RECOVERY_SECRET_KEY = "recovery-key"
RECOVERY_NAME_SUFFIX = "-recovery"


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


def names_secret(partition):
    """True when the partition names its Secret itself (``secret.name``), False when the name is derived."""
    return bool((partition.get("secret") or {}).get("name"))


def partition_secret_names(volume, partition):
    """Every name a partition's Secret is looked up under: the newest protocol's and the legacy one's."""
    return {secret_ref(volume, partition)[0], secret_ref(volume, partition, namer=clean_kube_name)[0]}


def label_value(text):
    """``text`` as a valid Kubernetes label value (unchanged when it already is one, as filesystem labels are)."""
    value = "".join(c if (_is_alnum(c) or c in "-_.") else "-" for c in text)[:63]
    while value and not _is_alnum(value[0]):
        value = value[1:]
    while value and not _is_alnum(value[-1]):
        value = value[:-1]
    return value


def volume_label_value(volume):
    """A SealedVolume name as a label value (63 characters at most: longer names end in a checksum)."""
    if len(volume) <= 63:
        return volume  # object names are lowercase alphanumerics, '-' and '.', alphanumeric at both ends
    return volume[:54].rstrip("-.") + "-" + hashlib.sha256(volume.encode("utf-8")).hexdigest()[:8]


def secret_labels(tpm_hash, partition_label, volume=None):
    """Labels upstream puts on TOFU Secrets (checklist 26), plus the SealedVolume the Secret is made for."""
    labels = {
        "app.kubernetes.io/name": "kcrypt-challenger",
        "app.kubernetes.io/component": "encryption-secret",
        TPM_HASH_LABEL: safe_kube_name(tpm_hash),
        PARTITION_LABEL: label_value(partition_label),
        "kcrypt.kairos.io/managed-by": "kcrypt-challenger",
    }
    if volume:
        labels[VOLUME_LABEL] = volume_label_value(volume)
    return labels


def recovery_secret_name(volume, partition_suffix):
    """The recovery-key Secret of one partition of a SealedVolume: ``<volume>-<partition>-recovery``.

    It lives in the store's recovery space (its own SQLite table, its own Kubernetes namespace), and the
    suffix keeps it apart from passphrase Secrets even where both are listed together (an export, a reader).
    """
    return object_name("%s-%s" % (volume, partition_suffix)) + RECOVERY_NAME_SUFFIX  # at most 72 characters


def recovery_secret_labels(tpm_hash, partition_label, volume):
    """Labels of a recovery-key Secret: a passphrase Secret's (with its SealedVolume), their own component and secret type."""
    labels = secret_labels(tpm_hash, partition_label, volume)
    labels["app.kubernetes.io/component"] = RECOVERY_SECRET_TYPE
    labels[SECRET_TYPE_LABEL] = RECOVERY_SECRET_TYPE
    return labels


def tofu_volume_names(tpm_hash):
    """Candidate TOFU volume names: upstream's ``tofu-<hash[:8]>`` first, longer prefixes if taken."""
    names = []
    for length in (8, 16, 32, 64):
        name = object_name("tofu-" + tpm_hash[:length])
        if name not in names:
            names.append(name)
    return names
