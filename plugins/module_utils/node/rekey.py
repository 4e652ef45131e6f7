# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Re-keying encrypted partitions: add the new key, verify it, then remove the old one.

Private to the collection: the API may change without notice.
For the ``kairos_luks_rekey`` module. There is never a moment without a working key:

1. ``add``: the key the source serves now (KMS, TPM NV blob, or the old passphrase)
   authorises a new key slot holding the new key; the new key is tested on that slot.
   A LUKS2 token of type ``kcrypt-rekey`` records the slot and the re-key round
   (``rekey_id``). The token holds no secret.
2. The source is switched to the new key (NV blob rewritten in one atomic TPM write;
   the KMS Secret updated by the playbook; a passphrase is the caller's to keep).
3. ``finish``: the key the source serves now must open the recorded slot; every other
   key slot is removed, except recovery-key slots (``luks.RECOVERY_TOKEN_TYPE``).

The recovery key is rotated on request (``rotate_recovery``, after the main key's round): a new one is
added and kept (returned, or escrowed in the KMS), then the old recovery slots go (node/recovery.py).

States a crash can leave, and what a re-run with the same ``rekey_id`` does:

- before 1 completes: no token for this round (or a slot without token holding a key
  nobody knows any more): step 1 runs again; 3 removes the orphan slot later.
- after 1, before 2: the token's slot holds a key that only the crashed run knew (a new
  random key is drawn on each run). The source's key still opens the partition, so the
  stale slot is removed and step 1 adds the new key again.
- after 2, before 3 (or during 3): the source's key opens the token's slot, so step 1
  adds nothing, and 3 removes what is left of the old slots.
- after 3: as above, and 3 finds nothing to remove: nothing changes.
"""

from __future__ import annotations

import os

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, encryption, luks, recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM

REKEY_TOKEN_TYPE = "kcrypt-rekey"  # LUKS2 token: the key slot of the last re-key round
STEPS = ("all", "add", "finish")


def rekey_tokens(header):
    """{token id (int): token} of the kcrypt-rekey tokens in ``header``."""
    return {int(k): v for k, v in header.tokens.items() if v.get("type") == REKEY_TOKEN_TYPE}


def round_slot(header, rekey_id):
    """The key slot recorded for re-key round ``rekey_id``, or None."""
    for token in rekey_tokens(header).values():
        slots = [int(s) for s in token.get("keyslots", [])]
        if token.get("rekey_id") == rekey_id and slots and slots[0] in header.key_slots:
            return slots[0]
    return None


def slots_opened_by(device, key, header):
    """The key slots of ``device`` that ``key`` opens (one cryptsetup test per slot)."""
    return [slot for slot in header.key_slots if luks.test_passphrase(device, key, keyslot=slot)]


def encrypted_devices(selectors, scope=None):
    """The block devices of ``selectors`` (encryption.Selector); each must be a finished LUKS2 partition."""
    devices, seen = [], set()
    for selector in selectors:
        selector.validate()
        device = selector.resolve(scope)
        if device.name in seen:
            raise KcryptError("%s selects the partition %s twice" % (selector.describe(), device.path))
        seen.add(device.name)
        if not device.is_luks:
            raise KcryptError("%s is not LUKS-encrypted: there is no key to change (encrypt it first)" % device.path)
        if luks.read_header(device.path).reencrypting:
            raise KcryptError(
                "%s: its in-place encryption is unfinished; finish it with kairos_luks_encrypt before re-keying" % device.path
            )
        devices.append(device)
    return devices


def add(device, current_key, new_key, source_name, rekey_id, options, check_mode=False, force=False):
    """Step 1 on one partition. Returns {"added": bool, "removed_slots": [stale slot]}.

    ``current_key`` is the key the source serves now; ``rekey_id`` None means no round is
    recorded (an explicit new passphrase identifies itself: when it opens, it is in).
    ``force`` adds ``new_key`` even when the round looks done on this partition.
    """
    path = device.path
    outcome = {"added": False, "removed_slots": []}
    if new_key is not None and luks.test_passphrase(path, new_key):
        return outcome  # already added (or already the only key)
    header = luks.read_header(path)
    slot = round_slot(header, rekey_id) if rekey_id is not None else None
    if slot is not None and not force and luks.test_passphrase(path, current_key, keyslot=slot):
        return outcome  # the source already serves this round's key: step 2 is done
    if force:
        slot = None  # the round's slot holds the current key: keep it
    luks.require_key(path, current_key, source_name)
    if new_key is None:
        raise KcryptError("%s: no new key to add" % path)
    if slot is not None:
        # this round's slot holds a key a crashed run drew and never stored: drop it, add anew
        outcome["removed_slots"].append(slot)
        if not check_mode:
            luks.kill_slot(path, slot, current_key)
    outcome["added"] = True
    if check_mode:
        return outcome
    new_slot = luks.add_key(path, current_key, new_key, options)
    if not luks.test_passphrase(path, new_key, keyslot=new_slot):
        raise KcryptError("%s: the new key does not open the key slot %d just added; the old key still works" % (path, new_slot))
    if rekey_id is not None:
        _record_round(path, rekey_id, new_slot)
    return outcome


def _record_round(path, rekey_id, slot):
    for token_id in sorted(rekey_tokens(luks.read_header(path))):
        luks.remove_token(path, token_id)
    luks.import_token(path, {"type": REKEY_TOKEN_TYPE, "keyslots": [str(slot)], "rekey_id": rekey_id})


def finish(device, current_key, source_name, rekey_id, check_mode=False):
    """Step 3 on one partition: remove every slot but the source key's and recovery slots.

    Refuses (removing nothing) unless the source's key opens the slot of round ``rekey_id``:
    then the source does not serve the new key yet, and removing the old slots would lock it out.
    Returns the removed (or, in check mode, to be removed) slots.
    """
    path = device.path
    luks.require_key(path, current_key, source_name)
    header = luks.read_header(path)
    keep = set(slots_opened_by(path, current_key, header))
    if rekey_id is not None:
        slot = round_slot(header, rekey_id)
        if slot is None or slot not in keep:
            raise KcryptError(
                "%s: the key from %s does not open the key slot added by re-key %s, so it does not serve the new "
                "key yet; switch the source to the new key first. No key slot was removed." % (path, source_name, rekey_id)
            )
    keep.update(header.recovery_slots)
    remove = [slot for slot in header.key_slots if slot not in keep]
    if not check_mode:
        for slot in remove:
            luks.kill_slot(path, slot, current_key)
    return remove


def old_slots(device):
    """Check mode, after a predicted ``add``: the slots ``finish`` would remove (all but recovery slots)."""
    header = luks.read_header(device.path)
    return [slot for slot in header.key_slots if slot not in header.recovery_slots]


def _refuse_unlisted(devices, current):
    """The NV key is shared: refuse when it also opens a LUKS device that is not being re-keyed.

    Rewriting the blob would leave that device without a key the TPM can give.
    """
    listed = {device.name for device in devices}
    others = []
    for path in blockdev.find_luks_paths():
        try:
            if blockdev.kernel_name(path) not in listed and luks.test_passphrase(path, current):
                others.append(path)
        except KcryptError:
            if os.path.exists(path):
                raise
            # gone since the scan (a detached loop device): it holds nothing to strand
    if others:
        raise KcryptError(
            "the offline TPM key also opens %s, which is not listed: the new NV blob would not open it. List every "
            "partition encrypted with this key. Nothing was changed." % ", ".join(others)
        )


def rekey_tpm(devices, source, rekey_id, options, check_mode=False, log=None):
    """The offline (``tpm``) source end to end: new random key, add, verify, rewrite the NV blob, verify, remove.

    Returns ({device path: outcome}, nv_rewritten).
    """
    log = log or (lambda message: None)
    current = source.existing_key()
    if current is None:
        raise KcryptError("%s holds no key: there is nothing to re-key from" % source.describe())
    _refuse_unlisted(devices, current)
    outcomes = {}
    new_key = blob.new_tpm_passphrase()
    source.handed_out(new_key)
    for device in devices:
        log("adding the new key to %s" % device.path)
        outcomes[device.path] = add(device, current, new_key, source.describe(), rekey_id, options, check_mode)
    nv_rewritten = any(o["added"] for o in outcomes.values())
    if nv_rewritten:
        # one NV key for all partitions: one that looked done (e.g. newly listed with a finished
        # round id) gets the new key too, or the new blob would not open it
        for device in devices:
            if not outcomes[device.path]["added"]:
                outcomes[device.path] = add(device, current, new_key, source.describe(), rekey_id, options, check_mode, force=True)
    if nv_rewritten and not check_mode:
        for device in devices:  # every partition must open with the new key before the blob changes
            luks.require_key(device.path, new_key, "the new key")
        log("rewriting the NV blob")
        with TPM(source.tpm_device) as tpm:
            tpm.nv_rewrite(source.nv_index, blob.encrypt_blob(tpm, new_key, source.c_index, source.layout))
            if blob.read_nv_passphrase(tpm, source.nv_index, source.c_index) != new_key:
                raise KcryptError("the NV blob read back does not hold the new key; the old key slots were kept")
        current = new_key
    for device in devices:
        if check_mode and outcomes[device.path]["added"]:
            outcomes[device.path]["removed_slots"] = old_slots(device)
            continue
        outcomes[device.path]["removed_slots"] += finish(device, current, source.describe(), rekey_id, check_mode)
    return outcomes, nv_rewritten


def rekey_with_source(devices, source, step, new_key, rekey_id, options, check_mode=False):
    """The ``passphrase`` and ``kms`` sources: ``add`` the new key, then (``finish``) retire the old slots.

    ``all`` does both (passphrase); ``kms`` runs ``add``, then the caller updates the KMS, then
    ``finish``. Returns {device path: outcome}.
    """
    outcomes = {}
    for device in devices:
        outcome = {"added": False, "removed_slots": []}
        if step in ("all", "add"):
            current = source.existing_key(device, device.label)
            outcome = add(device, current, new_key, source.describe(), rekey_id, options, check_mode)
        if step in ("all", "finish"):
            # passphrase: the new passphrase is now the source; kms: whatever the KMS serves now
            current = new_key if source.name == "passphrase" else source.existing_key(device, device.label)
            if check_mode and outcome["added"]:
                outcome["removed_slots"] = old_slots(device)
            else:
                outcome["removed_slots"] += finish(device, current, source.describe(), rekey_id, check_mode)
        outcomes[device.path] = outcome
    return outcomes


def rotate_recovery(devices, key_for, escrow, rekey_id, options, check_mode=False):
    """Give each partition a new recovery key kept by ``escrow`` and remove its old recovery slots (node/recovery.py).

    ``key_for(device)`` is the key that opens the partition now (after the main-key re-key of the same
    run). A partition whose recovery key of round ``rekey_id`` is kept and alone is left as it is.
    Returns {device path: {"rotated": bool, "removed_slots": [slot], "recovery_key": bytes or None}}.
    """
    outcomes = {}
    for device in devices:
        header = luks.read_header(device.path)
        outcome = {"rotated": False, "removed_slots": [], "recovery_key": None}
        if not recovery.round_done(header, rekey_id):
            outcome["rotated"] = True
            current = key_for(device)
            luks.require_key(device.path, current, "the key source")
            if check_mode:
                outcome["removed_slots"] = list(header.recovery_slots)
            else:
                added = recovery.add(device, current, options, escrow, label=device.label, rekey_id=rekey_id)
                outcome["removed_slots"] = added["removed_slots"]
                outcome["recovery_key"] = added["key"] if escrow.returns_key else None
        outcomes[device.path] = outcome
    return outcomes


def new_key_options(source):
    """Key slot PBKDF for the new key: upstream's cheap one for generated keys, cryptsetup's default otherwise."""
    return encryption.effective_options(luks.LuksOptions(), source)
