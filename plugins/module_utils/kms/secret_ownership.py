# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whose is a Secret? One Secret belongs to exactly one partition of one SealedVolume.

Private to the collection. Used by the policy (kms/policy.py), the registration tools
(kms/registration.py) and the admin subcommands (``check``, ``import``).

A partition without ``secret.name`` finds its Secret under a *derived* name, upstream's
``<volume>-<label>`` after Kubernetes naming. Derived names of different partitions can
coincide: volume ``node`` with a partition labelled ``DB-COS-PERSISTENT`` derives
``node-db-cos-persistent``, which is also what volume ``node-db`` with ``COS-PERSISTENT`` derives.
Upstream reuses whatever Secret it finds under the name, so an enrolled TPM that adds such a
partition receives another volume's static passphrase.

So before a derived name is used for an existing Secret (or a legacy node creates one under it),
:func:`verdict` says whose it is:

* ``owned`` — this partition's: use it;
* ``foreign`` — someone else's: labelled for another TPM or another SealedVolume, or another
  partition names it explicitly. A partition that gets a generated passphrase gets a Secret of its
  own under another name instead; anything else is refused;
* ``ambiguous`` — another partition derives the same name and nothing says whose it is. Refused on
  both protocols until an administrator gives one of them an explicit ``secret.name``
  (``kcrypt-challenger check`` lists such cases; ``add`` and ``import`` refuse to create them).

Cost, on the attestation hot path: none for a partition that names its Secret (the steady state: the
server writes the name it settled on into the partition). For a derived name, the Secret is read
anyway and its labels settle most cases (every Secret our server or admin tools create carries the TPM
hash and the SealedVolume). Only a Secret without those labels (made with kubectl, imported from
upstream YAML) costs a scan of every SealedVolume, once: the newest protocol then writes the name
into the partition. Creating a Secret under a fresh name costs nothing: its labels decide later.
"""

from __future__ import annotations

from collections import namedtuple

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    TPM_HASH_LABEL,
    VOLUME_LABEL,
    names_secret,
    partition_secret_names,
    safe_kube_name,
    secret_ref,
    volume_label_value,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import volume_name

OWNED, FOREIGN, AMBIGUOUS = "owned", "foreign", "ambiguous"


class Referrer(namedtuple("Referrer", "volume index partition explicit key")):
    """A partition that uses a Secret name: explicitly (``secret.name``) or by derivation; ``key``: its data key."""

    def describe(self):
        ref = PartitionRef(self.partition.get("label", ""), self.partition.get("deviceName", ""), self.partition.get("uuid", ""))
        return "partition %s of SealedVolume %s" % (ref.describe(), self.volume)


class Verdict(namedtuple("Verdict", "kind reason")):
    """``kind`` is OWNED, FOREIGN or AMBIGUOUS; ``reason`` says why (empty when owned)."""


def referrers(volumes, secret_name, skip=None):
    """Every partition of ``volumes`` whose Secret is ``secret_name``; ``skip`` = ``(volume name, index)`` to leave out."""
    found = []
    for volume in volumes:
        name = volume_name(volume)
        for index, partition in enumerate(volume["spec"].get("partitions") or []):
            if (name, index) != skip and secret_name in partition_secret_names(name, partition):
                found.append(_referrer(name, index, partition))
    return found


def _referrer(volume, index, partition):
    return Referrer(volume, index, partition, names_secret(partition), secret_ref(volume, partition)[1])


def clash(users):
    """Whether these partitions may not share one Secret: they may only when each names it explicitly and reads a
    key of its own (one Secret per node with a key per partition is a pattern upstream's ``secret.path`` allows)."""
    if len(users) < 2:
        return False
    keys = [u.key for u in users]
    return not all(u.explicit for u in users) or len(set(keys)) < len(keys)


def label_owner(secret, tpm_hash, volume):
    """Why the Secret's labels say it is not ``volume``'s (of TPM ``tpm_hash``), or ""."""
    labels = ((secret or {}).get("metadata") or {}).get("labels") or {}
    owner_tpm, owner_volume = labels.get(TPM_HASH_LABEL), labels.get(VOLUME_LABEL)
    if tpm_hash and owner_tpm not in (None, safe_kube_name(tpm_hash)):
        return "it is labelled for another TPM (%s=%s)" % (TPM_HASH_LABEL, owner_tpm)
    if owner_volume not in (None, volume_label_value(volume)):
        return "it belongs to SealedVolume %s (label %s)" % (owner_volume, VOLUME_LABEL)
    return ""


def verdict(store, tpm_hash, volume, index, secret_name, secret=None):
    """May partition ``index`` of ``volume`` (the caller's copy; ``index`` None for a partition not in it yet)
    use the Secret ``secret_name`` under its derived name? ``secret``: the existing Secret, or None when the
    caller is about to create it."""
    name = volume_name(volume)
    foreign = label_owner(secret, tpm_hash, name)
    if foreign:
        return Verdict(FOREIGN, foreign)
    found = referrers([volume], secret_name, skip=(name, index))
    labels = ((secret or {}).get("metadata") or {}).get("labels") or {}
    if TPM_HASH_LABEL not in labels and VOLUME_LABEL not in labels:  # made by hand or not there yet: who else uses the name?
        found += referrers([v for v in store.list_volumes() if volume_name(v) != name], secret_name)
    return _judge(found)


def _judge(found):
    explicit = [r for r in found if r.explicit]
    if explicit:
        return Verdict(FOREIGN, "%s names it (secret.name)" % explicit[0].describe())
    if found:
        return Verdict(AMBIGUOUS, "ambiguous ownership: %s derives the same Secret name; give each partition "
                                  "its own secret.name" % found[0].describe())
    return Verdict(OWNED, "")


def problems(volumes, get_secret):
    """Secrets that are not exactly one partition's, as ``[(volume names involved, text)]``:

    * a name used by more than one partition (see :func:`clash`);
    * a Secret under a derived name whose labels name another TPM or SealedVolume.

    ``get_secret(name)`` returns the Secret or None.
    """
    found, by_name = [], {}
    for volume in volumes:
        name = volume_name(volume)
        for index, partition in enumerate(volume["spec"].get("partitions") or []):
            for secret_name in sorted(partition_secret_names(name, partition)):
                by_name.setdefault(secret_name, []).append(_referrer(name, index, partition))
    for secret_name, users in sorted(by_name.items()):
        if clash(users):
            found.append((sorted({u.volume for u in users}), "Secret %s is used by %s"
                          % (secret_name, " and ".join(u.describe() for u in users))))
    for volume in volumes:
        name = volume_name(volume)
        tpm_hash = (volume.get("spec") or {}).get("TPMHash", "")
        for index, partition in enumerate(volume["spec"].get("partitions") or []):
            if names_secret(partition):
                continue  # an administrator's explicit choice (e.g. a replaced TPM keeping its disk's Secret)
            for secret_name in sorted(partition_secret_names(name, partition)):
                reason = label_owner(get_secret(secret_name), tpm_hash, name)
                if reason:
                    found.append(([name], "Secret %s, which %s derives, is not its: %s"
                                  % (secret_name, _referrer(name, index, partition).describe(), reason)))
    return found
