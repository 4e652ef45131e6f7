# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``attestation`` field of a SealedVolume: verify, learn, enrol (spec §3.4 step 6, checklist 30-33).

Private to the collection. Pure functions over the CRD's ``spec.attestation``; the
policy (kms/policy.py) calls them with what the node proved.
"""

from __future__ import annotations

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import now_rfc3339


class PolicyRejection(KcryptError):
    """The KMS says no. ``str(exc)`` is upstream's detail text; the server sends it to
    the node as ``Attestation verification failed: <text>`` (never retried by clients)."""


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


def legacy_refusal(volume):
    """Why a SealedVolume must not be served over the legacy protocol, or "" (issue 14 item 1).

    The legacy protocol proves the TPM (credential activation on its EK) but carries no quote, so
    no boot state can be checked through it. ``spec.attestation`` is the newest protocol's field:
    upstream's newest server writes it whenever ``/tpm-attestation`` enrols or first serves a volume,
    an administrator sets it only to ask for attestation checks, and upstream's legacy server never
    reads or writes it. A volume with ``attestation`` is therefore served on ``/tpm-attestation``
    only: a request over the weaker protocol cannot undo what the stronger one enforces (a PCR that
    changed), and cannot skip what it would learn. Legacy registrations (no ``attestation``) are
    served as before.
    """
    attestation = volume["spec"].get("attestation")
    if attestation is None:
        return ""
    pcrs = (attestation.get("pcrValues") or {}).get("pcrs") or {}
    enforced = ["PCR%s" % i for i in sorted(pcrs, key=_pcr_order) if pcrs[i]]
    learning = ["PCR%s" % i for i in sorted(pcrs, key=_pcr_order) if not pcrs[i]]
    if enforced:
        why = "it enforces %s" % ", ".join(enforced)
    elif learning:
        why = "it learns %s on its next attestation" % ", ".join(learning)
    elif attestation.get("enrolledAt") or attestation.get("lastVerifiedAt"):
        why = "it was enrolled through /tpm-attestation"
    else:
        why = "it has an attestation policy (spec.attestation)"
    return ("SealedVolume %s requires the attestation protocol (/tpm-attestation): %s, and the legacy protocol "
            "carries no TPM quote to check; an administrator must remove spec.attestation to serve it over /getPass"
            % (volume.get("metadata", {}).get("name", ""), why))


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
