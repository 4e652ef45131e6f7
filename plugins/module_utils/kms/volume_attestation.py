# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``attestation`` field of a SealedVolume: verify, learn, enrol (spec §3.4 step 6, checklist 30-33).

Private to the collection. Pure functions over the CRD's ``spec.attestation``; the
policy (kms/policy.py) calls them with what the node proved.

PCR upgrade windows (ours, issue 16): ``pcrValues.relearnUntil`` maps a PCR index to the
time its window closes, and ``pcrValues.relearnTo`` (optional) to the known-good value an
upgraded reference node has. While a PCR's window is open the stored value is still
accepted; a different value is accepted too (only ``relearnTo``'s, when it is set) and is
then learned: the stored value becomes the new one and the window of that PCR closes, so
the PCR is enforced again at once. A window that expires without such a contact changes
nothing: the old value is enforced, as it always was. Nothing runs at expiry.
"""

from __future__ import annotations

import datetime

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import now_rfc3339, parse_rfc3339, rfc3339

RELEARN_UNTIL = "relearnUntil"
RELEARN_TO = "relearnTo"


class PolicyRejection(KcryptError):
    """The KMS says no. ``str(exc)`` is upstream's detail text; the server sends it to
    the node as ``Attestation verification failed: <text>`` (never retried by clients)."""


def verify_pcrs(stored, current, now=None):
    """Upstream verifyPCRValuesSelective, plus open upgrade windows. ``stored`` is ``spec.attestation.pcrValues``
    (or None), ``current`` the node's ``{"0": hex}`` (or None). Raises PolicyRejection with upstream's text."""
    stored_pcrs = (stored or {}).get("pcrs") if stored is not None else None
    if stored_pcrs is None:
        return
    order = sorted(stored_pcrs, key=_pcr_order)  # Go's map order is random; ours is numeric
    if current is None:
        for index in order:
            if stored_pcrs[index] != "":
                raise PolicyRejection("no current PCR values provided but PCR%s is required" % index)
        return
    windows = open_windows(stored, now)
    for index in order:
        expected = stored_pcrs[index]
        if expected == "":
            continue
        value = current.get(index, "")
        if value == "":
            raise PolicyRejection("PCR%s mismatch: expected %s, but not provided in current values" % (index, expected))
        if value != expected:
            window = windows.get(index)
            if window is None:
                raise PolicyRejection("PCR%s changed - boot state verification failed: expected %s, got %s" % (index, expected, value))
            if window.target and value != window.target:
                raise PolicyRejection("PCR%s changed - boot state verification failed: expected %s, got %s (its upgrade "
                                      "window until %s accepts only %s)" % (index, expected, value, window.until, window.target))


class Window(object):
    """An open upgrade window of one PCR: when it closes, and the one new value it accepts ("" = any)."""

    def __init__(self, until, target=""):
        self.until = until
        self.target = target


def open_windows(pcr_values, now=None):
    """{index: Window} of the PCRs whose window is open at ``now`` (an aware datetime; default: now) and whose
    value is enforced. An unreadable deadline counts as closed."""
    pcr_values = pcr_values or {}
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stored = pcr_values.get("pcrs") or {}
    targets = pcr_values.get(RELEARN_TO) or {}
    windows = {}
    for index, until in (pcr_values.get(RELEARN_UNTIL) or {}).items():
        deadline = parse_rfc3339(until)
        if deadline is not None and now < deadline and stored.get(index):
            windows[index] = Window(rfc3339(deadline), targets.get(index, ""))
    return windows


def relearn_pcrs(attestation, current, now=None):
    """Learn the PCRs that changed inside their open window (verify_pcrs accepted them): the stored value becomes
    the new one and the PCR's window closes. Mutates ``attestation``; returns [(index, old, new, until)]."""
    pcr_values = (attestation or {}).get("pcrValues")
    if not pcr_values or not current:
        return []
    stored = pcr_values.get("pcrs") or {}
    events = []
    for index, window in sorted(open_windows(pcr_values, now).items(), key=lambda item: _pcr_order(item[0])):
        value = current.get(index, "")
        if value and value != stored[index] and (not window.target or value == window.target):
            events.append((index, stored[index], value, window.until))
            stored[index] = value
            close_window(pcr_values, index)
    if events:
        attestation["lastVerifiedAt"] = rfc3339(now) if now else now_rfc3339()
    return events


def close_window(pcr_values, index):
    """Remove PCR ``index``'s window; the maps go when they are empty (as if there never was one)."""
    for key in (RELEARN_UNTIL, RELEARN_TO):
        entries = pcr_values.get(key)
        if entries is not None:
            entries.pop(index, None)
            if not entries:
                del pcr_values[key]


def verify_ek(attestation, ek_pem):
    """Upstream verifyEKMatchSelective: stored "" accepts any EK, else exact PEM string equality."""
    stored = attestation.get("ekPublicKey", "") or ""
    if stored and stored != ek_pem:
        raise PolicyRejection("EK public key does not match enrolled key - potential TPM impersonation")


def verify_attestation(attestation, ek_pem, pcrs, now=None):
    """Upstream verifyAttestationData for an existing volume; nil attestation = nothing to verify."""
    if attestation is None:
        return
    try:
        verify_ek(attestation, ek_pem)
    except PolicyRejection as exc:
        raise PolicyRejection("EK verification failed: %s" % exc)
    if pcrs is not None:
        try:
            verify_pcrs(attestation.get("pcrValues"), pcrs, now)
        except PolicyRejection as exc:
            raise PolicyRejection("PCR verification failed: %s" % exc)


def verify_volume(spec, ek_pem, pcrs, now=None):
    """What a verified TPM must pass before its SealedVolume serves it anything, or has anything written for it:
    not quarantined, then verify_attestation (EK, PCRs with their open upgrade windows). The one check of
    ``/tpm-attestation`` (policy.py) and ``/recovery-escrow`` (recovery.py)."""
    if spec.get("quarantined"):
        raise PolicyRejection("TPM is quarantined")
    try:
        verify_attestation(spec.get("attestation"), ek_pem, pcrs, now)
    except PolicyRejection as exc:
        raise PolicyRejection("attestation verification failed: %s" % exc) from None


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
