# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Recovery keys of encrypted partitions: generate, add in their own key slot, keep, rotate.

Private to the collection: the API may change without notice.
For ``kairos_luks_encrypt``, ``kairos_luks_rekey`` and ``kcrypt encrypt``.

A recovery key opens a partition when its usual key source cannot. It has its own key slot,
marked by a LUKS2 token of type ``kcrypt-recovery`` (no secret), which a re-key keeps. Where the
key is kept (the *escrow*):

- ``controller``: returned once to the caller (the node role writes it to a 0600 file on the
  controller);
- ``kms``: escrowed in the kairos.kcrypt KMS after a TPM proof (client/kms_client.py,
  ``/recovery-escrow``), never returned; an administrator reads it from the KMS, audited.

:func:`add` keeps a key that opens the partition in the escrow at every moment:

1. a new key goes into a new key slot, marked ``pending`` in its token, and is tested on that slot;
2. the escrow keeps it (the KMS replaces the partition's previous recovery key);
3. its token becomes ``kept`` (one ``token import --token-replace``), and only then are the other
   recovery slots removed.

A crash before 3 leaves a pending slot, which a main-key re-key keeps like any recovery slot (its key
may be the escrowed one) and the next run of this code removes once its own new key is kept.
"""

from __future__ import annotations

import secrets as secrets_lib

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import key_source, luks

ESCROW_CONTROLLER = "controller"
ESCROW_KMS = "kms"
ESCROWS = (ESCROW_CONTROLLER, ESCROW_KMS)

STATE_FIELD = "kcrypt_state"  # in the kcrypt-recovery token; a token without it (older versions) is kept
STATE_PENDING = "pending"
STATE_KEPT = "kept"

# Recovery keys look like systemd-cryptenroll's: 256 random bits as 64 "modhex" characters
# in groups of 8. The alphabet reads the same on QWERTY, AZERTY and QWERTZ keyboards.
MODHEX = "cbdefghijklnrtuv"


def generate_recovery_key():
    raw = secrets_lib.token_bytes(32)
    chars = "".join(MODHEX[b >> 4] + MODHEX[b & 0xF] for b in raw)
    return "-".join(chars[i : i + 8] for i in range(0, 64, 8)).encode("ascii")


class ControllerEscrow:
    """The key is returned to the caller, once."""

    name = ESCROW_CONTROLLER
    returns_key = True

    def keep(self, device, label, key):
        pass


class KmsEscrow:
    """The key is escrowed in the KMS, for the partition as the node names it to the KMS (label, name, uuid)."""

    name = ESCROW_KMS
    returns_key = False

    def __init__(self, config):
        self.config = config

    def keep(self, device, label, key):
        kms_client.escrow_recovery_key(self.config, key_source.partition_ref(device, label), key)


def build_escrow(kind, params, config_dirs=None, cmdline_path=None):
    """The escrow ``kind`` (controller | kms); with kms, the KMS is the one the key-source options name
    (``key_source.build``'s options; with ``auto``, the node's Kairos config fills the gaps)."""
    if kind not in ESCROWS:
        raise KcryptError("recovery_escrow must be one of %s, not %r" % (", ".join(ESCROWS), kind))
    if kind == ESCROW_CONTROLLER:
        return ControllerEscrow()
    return KmsEscrow(key_source.kms_client_config(params, config_dirs, cmdline_path, purpose="recovery_escrow=kms"))


def _tokens(header):
    """{token id: token} of the kcrypt-recovery tokens."""
    return {int(k): v for k, v in header.tokens.items() if v.get("type") == luks.RECOVERY_TOKEN_TYPE}


def kept_slots(header):
    """Recovery slots whose key was kept (escrowed or returned): the partition *has* a recovery key."""
    live = set(header.key_slots)
    slots = set()
    for token in _tokens(header).values():
        if token.get(STATE_FIELD, STATE_KEPT) == STATE_KEPT:
            slots.update(int(s) for s in token.get("keyslots", []))
    return sorted(slots & live)


def round_done(header, rekey_id):
    """True when the recovery key of round ``rekey_id`` is kept and is the only recovery slot."""
    kept = [t for t in _tokens(header).values()
            if t.get("rekey_id") == rekey_id and t.get(STATE_FIELD) == STATE_KEPT
            and any(int(s) in header.key_slots for s in t.get("keyslots", []))]
    return bool(kept) and len(header.recovery_slots) == 1


def add(device, current_key, options, escrow, label="", rekey_id=None):
    """Add a new recovery key kept by ``escrow``, then remove every other recovery slot (steps 1-3 above).

    ``current_key`` must open the partition. Returns {"key": bytes, "slot": int, "removed_slots": [int]};
    the caller returns ``key`` only when ``escrow.returns_key``.
    """
    path = device.path
    key = generate_recovery_key()
    slot = luks.add_key(path, current_key, key, options)
    token = {"type": luks.RECOVERY_TOKEN_TYPE, "keyslots": [str(slot)], STATE_FIELD: STATE_PENDING, "escrow": escrow.name}
    if rekey_id is not None:
        token["rekey_id"] = rekey_id
    luks.import_token(path, token)
    if not luks.test_passphrase(path, key, keyslot=slot):
        raise KcryptError("%s: the new recovery key does not open the key slot %d just added" % (path, slot))
    escrow.keep(device, label, key)
    token_id = next(i for i, t in _tokens(luks.read_header(path)).items() if str(slot) in t.get("keyslots", []))
    token[STATE_FIELD] = STATE_KEPT
    luks.replace_token(path, token_id, token)
    removed = [other for other in luks.read_header(path).recovery_slots if other != slot]
    for other in removed:
        luks.kill_slot(path, other, current_key)
    for token_id, stale in _tokens(luks.read_header(path)).items():  # tokens of the removed slots
        if not stale.get("keyslots"):
            luks.remove_token(path, token_id)
    return {"key": key, "slot": slot, "removed_slots": removed}
