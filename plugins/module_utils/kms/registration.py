# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Registering nodes with the KMS: validated input, a plan with a diff, and applying it.

Private to the collection. Shared by the ``kairos_sealedvolume`` module and the
``kcrypt-challenger`` admin subcommands so both validate and name things the same
way as the server (``policy.secret_ref``). Everything is validated before anything
is written; a plan never carries a passphrase in its diff or summary.
"""

from __future__ import annotations

import copy
import datetime
import re

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as ownership
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    PARTITION_LABEL,
    TPM_HASH_LABEL,
    VOLUME_LABEL,
    label_value,
    names_secret,
    object_name,
    partition_secret_names,
    safe_kube_name,
    secret_ref,
    volume_label_value,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import (
    AlreadyExists,
    Conflict,
    InvalidDocument,
    check_object_name,
    new_secret,
    new_volume,
    normalize_volume,
    parse_rfc3339,
    rfc3339,
    strip_server_fields,
    volume_name,
    yaml_text,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import (
    RELEARN_TO,
    RELEARN_UNTIL,
    close_window,
    open_windows,
)

x509 = optional_import("cryptography.x509")
serialization = optional_import("cryptography.hazmat.primitives.serialization")

LEARN, RELEARN, ENFORCE, IGNORE = "learn", "relearn", "enforce", "ignore"
UPDATE_ON_CREATE, UPDATE_ALWAYS = "on_create", "always"
PCR_VALUE = re.compile(r"^[0-9a-f]{64}$")
DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
MANAGED_BY = "kairos.kcrypt"


class RegistrationError(KcryptError):
    """The registration request is invalid or conflicts with the store; nothing was written."""


# ---------------------------------------------------------------------------
# Validation


def validate_tpm_hash(value):
    text = (value or "").strip().lower()
    if not identity.is_tpm_hash(text):
        raise RegistrationError("tpm_hash must be 64 hexadecimal characters (SHA-256 of the EK, as printed by "
                                "kcrypt-discovery-challenger or kairos.kcrypt.kairos_tpm_hash), got %r" % value)
    return text


def validate_passphrase(value, where="passphrase"):
    """A static passphrase as bytes; refuses what would not unlock the disk it was meant for."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not value:
        raise RegistrationError("%s is empty" % where)
    if b"\n" in value or b"\r" in value:
        raise RegistrationError(
            "%s contains a newline. cryptsetup reads a typed or piped passphrase only up to the first newline, so the "
            "disk would be formatted with a different passphrase than the KMS returns (a known upstream pitfall). "
            "Remove it (printf '%%s' instead of echo; no trailing newline in the file)." % where)
    if b"\x00" in value:
        raise RegistrationError("%s contains a NUL byte" % where)
    return value


class PartitionWish(object):
    """One partition of a registration as the user asked for it."""

    def __init__(self, label="", device_name="", uuid="", secret_name="", secret_path="", passphrase=None):
        self.label = label or ""
        self.device_name = device_name or ""
        self.uuid = uuid or ""
        self.secret_name = secret_name or ""
        self.secret_path = secret_path or ""
        self.passphrase = passphrase

    def ref(self):
        return PartitionRef(self.label, self.device_name, self.uuid)

    def describe(self):
        return self.ref().describe()

    def validate(self, index):
        where = "partitions[%d]" % index
        if self.ref().is_empty():
            raise RegistrationError("%s has no identifier: give at least one of label, device_name, uuid" % where)
        problem = self.ref().problem()  # the bounds a node's request must keep, so the node can be served
        if problem:
            raise RegistrationError("%s: %s" % (where, problem))
        if self.passphrase is not None:
            self.passphrase = validate_passphrase(self.passphrase, "%s.passphrase" % where)
            if not self.label and not self.secret_name:
                raise RegistrationError("%s has a static passphrase but neither label nor secret_name to name its Secret" % where)
        return self

    def entry(self, existing=None):
        """The spec partition; keeps a Secret reference the server wrote if the user did not set one."""
        entry = {}
        for key, value in (("label", self.label), ("deviceName", self.device_name), ("uuid", self.uuid)):
            if value:
                entry[key] = value
        if self.secret_name or self.secret_path:
            entry["secret"] = {k: v for k, v in (("name", self.secret_name), ("path", self.secret_path)) if v}
        elif existing and existing.get("secret"):
            entry["secret"] = copy.deepcopy(existing["secret"])
        return entry


def parse_partition_spec(text):
    """``label=COS_PERSISTENT,name=vda5,uuid=...,secret=NAME,path=KEY`` (CLI form) -> PartitionWish."""
    keys = {"label": "label", "name": "device_name", "device_name": "device_name", "devicename": "device_name",
            "uuid": "uuid", "secret": "secret_name", "secret_name": "secret_name", "path": "secret_path",
            "secret_path": "secret_path"}
    values = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            if not values:  # a bare word is the label
                values["label"] = item.strip()
                continue
            raise RegistrationError("partition %r: expected key=value items (label, name, uuid, secret, path)" % text)
        key, value = item.split("=", 1)
        key = key.strip().lower()
        if key not in keys:
            raise RegistrationError("partition %r: unknown key %r (use label, name, uuid, secret, path)" % (text, key))
        values[keys[key]] = value.strip()
    return PartitionWish(**values)


def ek_pem_from_text(text, tpm_hash):
    """Normalise an EK given as PUBLIC KEY or CERTIFICATE PEM to the server's PEM; it must hash to ``tpm_hash``."""
    require("cryptography", "to read the EK public key")
    data = (text or "").strip().encode("ascii", "replace")
    try:
        if b"BEGIN CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise RegistrationError("ek_public_key is not a PEM public key or certificate")
    if identity.tpm_hash(key) != tpm_hash:
        raise RegistrationError("ek_public_key does not belong to TPM %s (its hash is %s)" % (tpm_hash, identity.tpm_hash(key)))
    return identity.public_key_pem(key)


def attestation_after(existing, wish, tpm_hash, now=None):
    """The ``spec.attestation`` a wish leads to, given what the server stored (``existing``, may be None).

    ``wish = {"ek": learn|relearn|enforce, "ek_public_key": PEM, "pcrs": {index: learn|relearn|ignore|hex},
    "relearn_until": timestamp or duration, "relearn_to": {index: hex}}``:
    ``learn`` keeps a learned value (else "" = learn on next contact), ``relearn`` forgets it,
    ``enforce``/hex set the value, ``ignore`` (PCRs) drops the key = never checked.
    With ``relearn_until``, ``relearn`` keeps the value and opens an upgrade window instead
    (volume_attestation.py): until then a changed value is learned once, and only
    ``relearn_to``'s value when one is given; a PCR in any other mode has no window.
    Timestamps the server wrote are kept.
    """
    existing = existing or {}
    now = now or datetime.datetime.now(datetime.timezone.utc)
    result = {}
    ek_mode = wish.get("ek") or LEARN
    if ek_mode == RELEARN and wish.get("ek_public_key"):
        raise RegistrationError("attestation.ek=relearn contradicts attestation.ek_public_key (which enforces that key)")
    if ek_mode == ENFORCE or wish.get("ek_public_key"):
        if not wish.get("ek_public_key"):
            raise RegistrationError("attestation.ek=enforce needs attestation.ek_public_key")
        result["ekPublicKey"] = ek_pem_from_text(wish["ek_public_key"], tpm_hash)
    elif ek_mode == LEARN:
        result["ekPublicKey"] = existing.get("ekPublicKey") or ""
    elif ek_mode == RELEARN:
        result["ekPublicKey"] = ""
    else:
        raise RegistrationError("attestation.ek must be learn, relearn or enforce, got %r" % ek_mode)
    stored_values = existing.get("pcrValues") or {}
    stored = stored_values.get("pcrs") or {}
    modes = {}
    for index, mode in (wish.get("pcrs") or {}).items():
        modes[_pcr_key(index, "attestation.pcrs")] = str(mode).strip().lower()
    deadline = relearn_deadline(wish.get("relearn_until"), now)
    targets = {}
    for index, value in (wish.get("relearn_to") or {}).items():
        key = _pcr_key(index, "attestation.relearn_to")
        if modes.get(key) != RELEARN:
            raise RegistrationError("attestation.relearn_to.%s: PCR %s is not in relearn mode in attestation.pcrs" % (key, key))
        if deadline is None:
            raise RegistrationError("attestation.relearn_to needs attestation.relearn_until (how long the window stays open)")
        value = str(value).strip().lower()
        if not PCR_VALUE.match(value):
            raise RegistrationError("attestation.relearn_to.%s must be a SHA-256 value (64 hex), got %r" % (key, value))
        targets[key] = value
    still_open = open_windows(stored_values, now)
    pcrs, until, to = {}, {}, {}
    for key in sorted(modes, key=int):
        mode = modes[key]
        if mode == LEARN:
            pcrs[key] = stored.get(key) or ""
        elif mode == RELEARN and deadline is not None and stored.get(key):
            pcrs[key] = stored[key]
            window = still_open.get(key)
            # a duration re-opens nothing: an open window keeps its deadline (a re-run is not a change)
            until[key] = window.until if window is not None and deadline.duration else deadline.until
            if key in targets:
                to[key] = targets[key]
        elif mode == RELEARN:
            pcrs[key] = targets.get(key, "")  # nothing learned to restore: learn now, or enforce the known-good value
        elif mode == IGNORE:
            continue
        elif PCR_VALUE.match(mode):
            pcrs[key] = mode
        else:
            raise RegistrationError("attestation.pcrs.%s must be learn, relearn, ignore or a SHA-256 value (64 hex), got %r"
                                    % (key, mode))
    if pcrs:
        result["pcrValues"] = {"pcrs": pcrs}
        if until:
            result["pcrValues"][RELEARN_UNTIL] = until
        if to:
            result["pcrValues"][RELEARN_TO] = to
    for stamp in ("enrolledAt", "lastVerifiedAt"):
        if existing.get(stamp):
            result[stamp] = existing[stamp]
    return result


def _pcr_key(index, where):
    key = str(index).strip()
    if not key.isdigit() or not 0 <= int(key) <= 23:
        raise RegistrationError("%s: %r is not a PCR index (0-23)" % (where, index))
    return str(int(key))


class _Deadline(object):
    def __init__(self, until, duration):
        self.until = until  # RFC 3339, UTC
        self.duration = duration  # given as a duration (relative to the run), not as a time


def relearn_deadline(value, now):
    """``relearn_until``: an RFC 3339 time or a duration from ``now`` (``2h``, ``90m``, ``1d12h``), in the future.
    Returns a _Deadline, or None when not given."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    match = DURATION.match(text.lower())
    if match and any(match.groups()):
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        span = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        if not span:
            raise RegistrationError("attestation.relearn_until %r is no time at all" % text)
        return _Deadline(rfc3339(now + span), True)
    moment = parse_rfc3339(text)
    if moment is None:
        raise RegistrationError("attestation.relearn_until must be a duration such as 2h, 90m or 1d12h, or a time such "
                                "as 2026-12-06T18:00:00Z, got %r" % text)
    if moment <= now:
        raise RegistrationError("attestation.relearn_until %s is in the past; a window must close in the future" % text)
    return _Deadline(rfc3339(moment), False)


def pcr_window_report(volume, now=None):
    """{index: {"state": "open"|"expired", "until", "value", "relearn_to"?}} of a volume's upgrade windows,
    for results and playbook reports (an expired window changes nothing: its old value is enforced)."""
    pcr_values = (((volume or {}).get("spec") or {}).get("attestation") or {}).get("pcrValues") or {}
    now = now or datetime.datetime.now(datetime.timezone.utc)
    opened = open_windows(pcr_values, now)
    report = {}
    for index, until in sorted((pcr_values.get(RELEARN_UNTIL) or {}).items(), key=lambda item: int(item[0])):
        entry = {"state": "open" if index in opened else "expired", "until": until,
                 "value": (pcr_values.get("pcrs") or {}).get(index, "")}
        if (pcr_values.get(RELEARN_TO) or {}).get(index):
            entry["relearn_to"] = pcr_values[RELEARN_TO][index]
        report[index] = entry
    return report


def plan_pcr_window(store, tpm_hash, open_pcrs=(), until=None, relearn_to=None, close_pcrs=(), now=None):
    """Open (or move) the upgrade windows of ``open_pcrs`` and close those of ``close_pcrs`` (``"all"``: every one),
    leaving the rest of the TPM's registration as it is (other windows included). A PCR whose value is not
    enforced (still to learn, or not checked) gets no window and is listed in the returned ``skipped``.

    Returns (Plan, skipped {index: why}). Raises RegistrationError and writes nothing on bad input.
    """
    tpm_hash = validate_tpm_hash(tpm_hash)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    existing = store.find_volume(tpm_hash)
    if existing is None:
        raise RegistrationError("TPM %s is not registered" % tpm_hash)
    open_keys = [_pcr_key(index, "pcrs to open") for index in open_pcrs]
    targets = {_pcr_key(index, "relearn_to"): str(value).strip().lower() for index, value in (relearn_to or {}).items()}
    for key, value in targets.items():
        if key not in open_keys:
            raise RegistrationError("relearn_to.%s: PCR %s is not among the PCRs to open" % (key, key))
        if not PCR_VALUE.match(value):
            raise RegistrationError("relearn_to.%s must be a SHA-256 value (64 hex), got %r" % (key, value))
    deadline = relearn_deadline(until, now) if open_keys else None
    if open_keys and deadline is None:
        raise RegistrationError("opening a PCR window needs relearn_until (a time, or a duration such as 2h)")
    after = copy.deepcopy(existing)
    attestation = after["spec"].get("attestation")
    pcr_values = (attestation or {}).get("pcrValues")
    stored = (pcr_values or {}).get("pcrs") or {}
    skipped = {}
    if close_pcrs == "all":
        closing = list((pcr_values or {}).get(RELEARN_UNTIL) or {})
    else:
        closing = [_pcr_key(index, "pcrs to close") for index in close_pcrs]
    for key in closing:
        if pcr_values:
            close_window(pcr_values, key)
    still_open = open_windows(pcr_values, now)
    for key in open_keys:
        if key not in stored:
            skipped[key] = "not checked for this TPM"
            continue
        if not stored[key]:
            skipped[key] = "not learned yet: the next contact learns it"
            continue
        window = still_open.get(key)
        pcr_values.setdefault(RELEARN_UNTIL, {})[key] = window.until if window is not None and deadline.duration else deadline.until
        if key in targets:
            pcr_values.setdefault(RELEARN_TO, {})[key] = targets[key]
        else:
            (pcr_values.get(RELEARN_TO) or {}).pop(key, None)
            if RELEARN_TO in pcr_values and not pcr_values[RELEARN_TO]:
                del pcr_values[RELEARN_TO]
    try:
        normalize_volume(after)
    except InvalidDocument as exc:
        raise RegistrationError(str(exc))
    return Plan(strip_server_fields(existing), after), skipped


# ---------------------------------------------------------------------------
# Plans


class SecretAction(object):
    """What happens to one Secret; never holds the passphrase in anything it prints."""

    def __init__(self, name, path, action, partition, data=None, existing=None):
        self.name, self.path, self.action, self.partition = name, path, action, partition
        self._data = data  # full data dict to write (bytes values)
        self._existing = existing

    def summary(self):
        return {"name": self.name, "key": self.path, "action": self.action, "partition": self.partition}


class Plan(object):
    def __init__(self, before, after, secrets=(), delete=False):
        self.before = before
        self.after = after
        self.secrets = list(secrets)
        self.delete = delete

    @property
    def changed(self):
        if self.delete:
            return self.before is not None
        if self.before is None or self.after is None:
            return self.after is not None
        return (self.before["spec"] != self.after["spec"]
                or any(s.action in ("create", "update") for s in self.secrets))

    def diff(self):
        """Ansible-style diff of the spec (YAML) plus Secret names and what happens to them (never values)."""
        return {"before": _diff_text(self.before, []), "after": _diff_text(None if self.delete else self.after, self.secrets),
                "before_header": _header(self.before), "after_header": _header(None if self.delete else self.after)}


def _header(doc):
    return "SealedVolume %s" % volume_name(doc) if doc else "(absent)"


def _diff_text(doc, secrets):
    if doc is None:
        return ""
    text = yaml_text({"metadata": {"name": volume_name(doc)}, "spec": doc["spec"]}, sort_keys=True)
    for action in secrets:
        text += "# Secret %s (key %s): %s\n" % (action.name, action.path, action.action)
    return text


def find_target(store, tpm_hash, name=None):
    """The registration to manage: by name if given (it must be this TPM's), else the first of the TPM."""
    if name:
        try:
            check_object_name(name, "SealedVolume")
        except InvalidDocument as exc:
            raise RegistrationError(str(exc))
        existing = store.get_volume(name)
        if existing is not None and existing["spec"].get("TPMHash") != tpm_hash:
            raise RegistrationError("SealedVolume %s belongs to TPM %s, not %s" % (name, existing["spec"].get("TPMHash"), tpm_hash))
        others = [volume_name(v) for v in store.volumes_for(tpm_hash) if volume_name(v) != name]
        if existing is None and others:
            raise RegistrationError("TPM %s is already registered as SealedVolume %s; manage that one (name: %s) or remove it first"
                                    % (tpm_hash, others[0], others[0]))
        return existing
    return store.find_volume(tpm_hash)


def default_volume_name(tpm_hash):
    return object_name("tpm-" + tpm_hash[:16])


def plan_registration(store, tpm_hash, partitions, name=None, quarantined=None, attestation=None,
                      update_passphrase=UPDATE_ON_CREATE, merge_partitions=False):
    """Plan a registration (state present) against the store's current content.

    ``partitions``: PartitionWish list — the complete list (module), or partitions to add
    when ``merge_partitions`` (CLI ``add``: existing ones are kept); None keeps the stored ones.
    ``quarantined``/``attestation`` None leave the stored value alone (None on create). Raises
    RegistrationError, writes nothing.
    """
    tpm_hash = validate_tpm_hash(tpm_hash)
    if update_passphrase not in (UPDATE_ON_CREATE, UPDATE_ALWAYS):
        raise RegistrationError("update_passphrase must be on_create or always")
    wishes = [wish.validate(index) for index, wish in enumerate(partitions or [])]
    existing = find_target(store, tpm_hash, name)
    name = volume_name(existing) if existing else (name or default_volume_name(tpm_hash))
    before = strip_server_fields(existing) if existing else None
    spec = copy.deepcopy(existing["spec"]) if existing else {"TPMHash": tpm_hash, "partitions": []}
    current = spec.get("partitions") or []

    entries = list(current) if merge_partitions or partitions is None else []
    for wish in wishes:
        matched = [p for p in current if wish.ref().matches(p)]
        entry = wish.entry(matched[0] if matched else None)
        if merge_partitions and matched:  # keep what is registered; only a given secret reference changes
            position = current.index(matched[0])
            entries[position] = dict(matched[0], **({"secret": entry["secret"]} if "secret" in entry else {}))
        else:
            if any(wish.ref().matches(e) for e in entries):
                raise RegistrationError("partition %s is listed twice" % wish.describe())
            entries.append(entry)
    spec["partitions"] = entries
    if quarantined is not None:
        if quarantined:
            spec["quarantined"] = True
        else:
            spec.pop("quarantined", None)
    if attestation is not None:
        spec["attestation"] = attestation_after(spec.get("attestation"), attestation, tpm_hash)
    after = new_volume(name, tpm_hash, spec["partitions"])
    after["spec"] = spec
    if existing:
        after["metadata"] = copy.deepcopy(existing["metadata"])
    try:
        normalize_volume(after)
    except InvalidDocument as exc:
        raise RegistrationError(str(exc))
    _check_secret_ownership(store, tpm_hash, after, current, wishes)

    secrets = []
    for wish in wishes:
        if wish.passphrase is None:
            continue
        entry = [e for e in entries if wish.ref().matches(e)][0]
        secret_name, path = secret_ref(name, entry)
        try:
            check_object_name(secret_name, "Secret")
        except InvalidDocument as exc:
            raise RegistrationError(str(exc))
        secrets.append(_secret_action(store, tpm_hash, secret_name, path, wish, update_passphrase, name))
    return Plan(before, after, secrets)


def _check_secret_ownership(store, tpm_hash, volume, registered, wishes):
    """One Secret, one partition (kms/secret_ownership.py): refuse partitions that would share a Secret.

    Only partitions this plan adds or changes are checked against the store (``registered``: the
    partitions stored now), so re-running a registration costs no scan: an explicit ``secret_name``
    must not be used by any other partition; an existing Secret under a derived name must not be
    ambiguous, nor someone else's when a passphrase is to be written into it.
    """
    name = volume_name(volume)
    partitions = volume["spec"]["partitions"]
    for index, partition in enumerate(partitions):
        for secret_name in sorted(partition_secret_names(name, partition)):
            users = ownership.referrers([volume], secret_name)
            if ownership.clash(users):
                raise RegistrationError("%s and %s would use the same Secret %s; give one of them its own secret_name (or "
                                        "both a secret_path of their own)" % (users[0].describe(), users[1].describe(), secret_name))
    with_passphrase = [wish.ref() for wish in wishes if wish.passphrase is not None]
    others = None
    for index, partition in enumerate(partitions):
        if partition in registered:
            continue
        secret_name = secret_ref(name, partition)[0]
        if names_secret(partition):
            if others is None:
                others = [v for v in store.list_volumes() if volume_name(v) != name]
            found = ownership.referrers(others, secret_name)
            if ownership.clash(found + ownership.referrers([volume], secret_name)):
                raise RegistrationError("Secret %s is already used by %s: a Secret belongs to one partition; choose "
                                        "another secret_name" % (secret_name, found[0].describe()))
            continue
        existing = store.get_secret(secret_name)
        if existing is None:
            continue  # whoever creates it labels it: the other partition then gets a Secret of its own
        verdict = ownership.verdict(store, tpm_hash, volume, index, secret_name, existing)
        wants_passphrase = any(ref.matches(partition) for ref in with_passphrase)
        if verdict.kind == ownership.AMBIGUOUS or (verdict.kind == ownership.FOREIGN and wants_passphrase):
            raise RegistrationError("Secret %s, which partition %s would use, is not its: %s; set secret_name"
                                    % (secret_name, _describe(partition), verdict.reason))


def _describe(partition):
    return PartitionRef(partition.get("label", ""), partition.get("deviceName", ""), partition.get("uuid", "")).describe()


def _secret_action(store, tpm_hash, name, path, wish, update_passphrase, volume):
    existing = store.get_secret(name)
    partition = wish.describe()
    if existing is None:
        labels = {"app.kubernetes.io/name": "kcrypt-challenger", "app.kubernetes.io/component": "encryption-secret",
                  TPM_HASH_LABEL: safe_kube_name(tpm_hash), PARTITION_LABEL: label_value(wish.label),
                  VOLUME_LABEL: volume_label_value(volume), "app.kubernetes.io/managed-by": MANAGED_BY}
        return SecretAction(name, path, "create", partition, data={path: wish.passphrase}, existing=labels)
    owner = ownership.label_owner(existing, tpm_hash, volume)
    if owner:
        raise RegistrationError("Secret %s belongs to another TPM or SealedVolume (%s); choose another secret_name" % (name, owner))
    if existing["data"].get(path) == wish.passphrase:
        return SecretAction(name, path, "unchanged", partition)
    if update_passphrase == UPDATE_ALWAYS:
        data = dict(existing["data"])
        data[path] = wish.passphrase
        return SecretAction(name, path, "update", partition, data=data, existing=existing)
    return SecretAction(name, path, "kept (exists; update_passphrase=on_create)", partition)


def apply_plan(store, plan):
    """Write a plan: Secrets first (the server may be asked for them as soon as the volume exists), then the volume.

    Returns the stored volume (None after a removal). Raises RegistrationError if the store
    changed since the plan was made (re-run to re-plan).
    """
    try:
        if plan.delete:
            if plan.before is not None:
                store.delete_volume(volume_name(plan.before))
            return None
        for action in plan.secrets:
            if action.action == "create":
                store.create_secret(new_secret(action.name, action._data, labels=action._existing))
            elif action.action == "update":
                doc = copy.deepcopy(action._existing)
                doc["data"] = action._data
                store.update_secret(doc)
        if plan.before is None:
            return store.create_volume(plan.after)
        if plan.before["spec"] != plan.after["spec"]:
            return store.update_volume(plan.after)
        return store.get_volume(volume_name(plan.after))
    except (AlreadyExists, Conflict) as exc:
        raise RegistrationError("the store changed while registering (%s); run again" % exc)


def plan_removal(store, tpm_hash, name=None):
    tpm_hash = validate_tpm_hash(tpm_hash)
    existing = store.get_volume(name) if name else store.find_volume(tpm_hash)
    if existing is not None and existing["spec"].get("TPMHash") != tpm_hash:
        raise RegistrationError("SealedVolume %s belongs to TPM %s, not %s; nothing removed" % (name, existing["spec"].get("TPMHash"), tpm_hash))
    return Plan(strip_server_fields(existing) if existing else None, None, delete=True)


def public_view(doc):
    """A volume for results and output: no server bookkeeping beyond name/namespace/resourceVersion."""
    if doc is None:
        return {}
    view = copy.deepcopy(doc)
    metadata = view.get("metadata", {})
    view["metadata"] = {k: metadata[k] for k in ("name", "namespace", "resourceVersion", "creationTimestamp", "labels") if k in metadata}
    return view
