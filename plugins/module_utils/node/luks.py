# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""cryptsetup wrappers: LUKS2 headers, passphrase tests, key slots, format, in-place encryption, open/close.

Private to the collection: the API may change without notice.
Passphrases go to cryptsetup on stdin (``--key-file -``, read whole, no newline
stripping, the same bytes Kairos' luks.go unlock uses) or, for a second secret, on an
inherited pipe; never in argv. Error messages carry cryptsetup's stderr, which never
echoes a key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import uuid as uuid_lib
from dataclasses import dataclass, field

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.command import CommandError, run, secret_pipe
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

# cryptsetup exit codes (man cryptsetup, RETURN CODES)
EXIT_WRONG_KEY = 2

# In-place encryption shrinks the data by this much: room for the LUKS2 header (16 MiB)
# at the front plus the same again for the data shift, as cryptsetup(8) recommends.
REDUCE_DEVICE_SIZE = 32 * 1024 * 1024

PBKDF_ALGORITHMS = ("argon2id", "argon2i", "pbkdf2")
RECOVERY_TOKEN_TYPE = "kcrypt-recovery"  # LUKS2 token marking the recovery key slot


class WrongKey(KcryptError):
    """The passphrase opens no key slot."""


def uuid_for_label(label):
    """Upstream's deterministic LUKS UUID: uuid5(NAMESPACE_URL, label) (spec §6.2, checklist 44)."""
    return str(uuid_lib.uuid5(uuid_lib.NAMESPACE_URL, label))


@dataclass(frozen=True)
class LuksOptions:
    """Format parameters; None leaves cryptsetup's compiled default.

    ``iter_time_ms`` and ``iterations`` are mutually exclusive (cryptsetup's
    ``--iter-time`` benchmarks, ``--pbkdf-force-iterations`` does not).
    """

    type: str = "luks2"
    cipher: str = None
    key_size: int = None  # bits
    hash: str = None
    sector_size: int = None
    pbkdf: str = None
    iter_time_ms: int = None
    iterations: int = None
    memory_kib: int = None
    parallel: int = None

    @classmethod
    def from_options(cls, type="luks2", cipher=None, keysize=None, hash=None, sector_size=None, pbkdf=None):
        """From the options kairos_luks_encrypt and ``kcrypt encrypt`` share (same names, same units).

        ``pbkdf`` is a dict with ``algorithm``, ``iteration_time`` (seconds), ``iteration_count``,
        ``memory`` (KiB) and ``parallel``; missing or None entries keep cryptsetup's defaults.
        """
        pbkdf = pbkdf or {}
        iteration_time = pbkdf.get("iteration_time")
        return cls(
            type=type,
            cipher=cipher,
            key_size=keysize,
            hash=hash,
            sector_size=sector_size,
            pbkdf=pbkdf.get("algorithm"),
            iter_time_ms=int(round(iteration_time * 1000)) if iteration_time is not None else None,
            iterations=pbkdf.get("iteration_count"),
            memory_kib=pbkdf.get("memory"),
            parallel=pbkdf.get("parallel"),
        )

    def validate(self):
        if self.type != "luks2":
            raise KcryptError(
                "type=%s is not supported: only LUKS2 carries the label partitions are found by" % self.type
            )
        if self.pbkdf is not None and self.pbkdf not in PBKDF_ALGORITHMS:
            raise KcryptError("pbkdf algorithm must be one of %s, not %s" % (", ".join(PBKDF_ALGORITHMS), self.pbkdf))
        if self.iter_time_ms is not None and self.iterations is not None:
            raise KcryptError("give either a PBKDF iteration time or an iteration count, not both")
        if self.pbkdf == "pbkdf2" and (self.memory_kib is not None or self.parallel is not None):
            raise KcryptError("PBKDF memory and parallel apply to argon2i/argon2id only, not pbkdf2")
        for name in ("key_size", "sector_size", "iter_time_ms", "iterations", "memory_kib", "parallel"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise KcryptError("%s must be a positive number, not %s" % (name, value))
        return self

    def pbkdf_args(self):
        args = []
        if self.pbkdf:
            args += ["--pbkdf", self.pbkdf]
        if self.iter_time_ms is not None:
            args += ["--iter-time", str(self.iter_time_ms)]
        if self.iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.iterations)]
        if self.memory_kib is not None:
            args += ["--pbkdf-memory", str(self.memory_kib)]
        if self.parallel is not None:
            args += ["--pbkdf-parallel", str(self.parallel)]
        return args

    def format_args(self):
        args = ["--type", self.type]
        if self.cipher:
            args += ["--cipher", self.cipher]
        if self.key_size:
            args += ["--key-size", str(self.key_size)]
        if self.hash:
            args += ["--hash", self.hash]
        if self.sector_size:
            args += ["--sector-size", str(self.sector_size)]
        return args + self.pbkdf_args()


@dataclass(frozen=True)
class LuksHeader:
    """The parts of a LUKS2 header (``luksDump --dump-json-metadata``) this collection acts on."""

    uuid: str
    label: str
    keyslots: dict = field(default_factory=dict)  # id (str) -> keyslot JSON
    tokens: dict = field(default_factory=dict)  # id (str) -> token JSON
    segments: dict = field(default_factory=dict)
    requirements: tuple = ()

    @property
    def reencrypting(self):
        """True while an (in-place) reencryption is unfinished: the header requires online-reencrypt."""
        return any(req.startswith("online-reencrypt") for req in self.requirements)

    @property
    def key_slots(self):
        """Ids of the slots that hold keys (the reencryption bookkeeping slot is not one)."""
        return sorted(int(k) for k, v in self.keyslots.items() if v.get("type") != "reencrypt")

    @property
    def recovery_slots(self):
        """Key slots marked by a kcrypt-recovery token."""
        slots = set()
        for token in self.tokens.values():
            if token.get("type") == RECOVERY_TOKEN_TYPE:
                slots.update(int(s) for s in token.get("keyslots", []))
        return sorted(slots & set(self.key_slots))

    @property
    def cipher(self):
        for segment in self.segments.values():
            if segment.get("type") == "crypt" and "backup-final" not in segment.get("flags", []):
                return segment.get("encryption", "")
        return ""


def _key_file_args():
    return ["--key-file", "-"]


def is_luks(device):
    return run(["cryptsetup", "isLuks", device], "checking %s for a LUKS header" % device, ok_codes=(0, 1)).returncode == 0


def read_header(device):
    """The LUKS2 header of ``device``; KcryptError if it has none or is LUKS1."""
    text = run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", device], "reading the LUKS header of %s" % device
    ).stdout.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        raise KcryptError("cryptsetup printed no JSON metadata for %s (a LUKS1 header?)" % device) from None
    uuid_text = run(["cryptsetup", "luksUUID", device], "reading the LUKS UUID of %s" % device).stdout
    return LuksHeader(
        uuid=uuid_text.decode("ascii", "replace").strip(),
        label=_header_label(device),
        keyslots=data.get("keyslots", {}),
        tokens=data.get("tokens", {}),
        segments=data.get("segments", {}),
        requirements=tuple(data.get("config", {}).get("requirements", {}).get("mandatory", [])),
    )


def _header_label(device):
    """The LUKS2 label (not part of the JSON area; luksDump prints it in the binary header section)."""
    text = run(["cryptsetup", "luksDump", device], "reading the LUKS header of %s" % device).stdout.decode("utf-8", "replace")
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Label":
            value = value.strip()
            return "" if value == "(no label)" else value
    return ""


def test_passphrase(device, passphrase, keyslot=None):
    """Whether ``passphrase`` opens a key slot of ``device`` (or the given slot). Needs no device-mapper."""
    args = ["cryptsetup", "open", "--test-passphrase", "--type", "luks"] + _key_file_args()
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    result = run(args + [device], "testing the key of %s" % device, stdin=passphrase, ok_codes=(0, EXIT_WRONG_KEY))
    return result.returncode == 0


def require_key(device, passphrase, source):
    """WrongKey unless ``passphrase`` opens ``device``. ``source`` names where the key came from."""
    if not test_passphrase(device, passphrase):
        raise WrongKey(
            "%s is LUKS-encrypted but the key from %s does not open it; it was encrypted with another "
            "key (another TPM, NV index or KMS entry). Nothing was changed." % (device, source)
        )


def format_device(device, passphrase, options, uuid=None, label=None):
    """luksFormat ``device`` (destroys its content), upstream's way: ``-q``, given UUID and label."""
    args = ["cryptsetup", "luksFormat", "-q"] + options.format_args() + _key_file_args()
    if uuid:
        args += ["--uuid", uuid]
    if label:
        args += ["--label", label]
    run(args + [device], "formatting %s as LUKS" % device, stdin=passphrase)


REENCRYPT_LOCK_DIR = "/run/lock"


@contextlib.contextmanager
def reencryption_lock(luks_uuid):
    """Take turns with other kcrypt processes on this machine re-encrypting a device with this LUKS UUID.

    cryptsetup locks an in-place (re)encryption by LUKS UUID (in /run/cryptsetup) and refuses a second
    one at the same time ("Reencryption process is already running"). Our UUIDs derive from the label,
    as upstream's, so devices with the same label on one machine share them: waiting here turns that
    refusal into taking turns. (Lab nodes each have their own /run/cryptsetup and /run/lock, so they
    encrypt in parallel like separate machines; see roles/lab.)
    """
    if not luks_uuid:
        yield
        return
    directory = REENCRYPT_LOCK_DIR if os.path.isdir(REENCRYPT_LOCK_DIR) else tempfile.gettempdir()
    descriptor = os.open(os.path.join(directory, "kcrypt-reencrypt-%s.lock" % luks_uuid),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def encrypt_in_place(device, passphrase, options, uuid=None, label=None, init_only=False, hotzone_size=None):
    """Encrypt ``device`` keeping its data (offline ``cryptsetup reencrypt --encrypt``, no device-mapper).

    The data must already fit in the device minus REDUCE_DEVICE_SIZE: cryptsetup moves
    it to make room for the header. Interrupted runs are finished by ``resume``.
    """
    args = ["cryptsetup", "reencrypt", "--encrypt", "-q", "--reduce-device-size", "%dM" % (REDUCE_DEVICE_SIZE // 1048576)]
    args += options.format_args() + _key_file_args()
    if uuid:
        args += ["--uuid", uuid]
    if label:
        args += ["--label", label]
    if init_only:
        args.append("--init-only")
    if hotzone_size:
        args += ["--hotzone-size", str(hotzone_size)]
    with reencryption_lock(uuid):
        run(args + [device], "encrypting %s in place" % device, stdin=passphrase)


def resume(device, passphrase):
    """Finish an interrupted reencryption: repair the hotzone if a crash left it dirty, then resume."""
    run(["cryptsetup", "repair", "-q"] + _key_file_args() + [device], "recovering the interrupted encryption of %s" % device, stdin=passphrase)
    try:
        with reencryption_lock(read_header(device).uuid):
            run(["cryptsetup", "reencrypt", "--resume-only", "-q"] + _key_file_args() + [device], "resuming the encryption of %s" % device, stdin=passphrase)
    except CommandError as error:
        raise KcryptError(
            "%s; the partition is in a half-encrypted state that cryptsetup cannot finish here. "
            "Do not format it: back up the LUKS header (cryptsetup luksHeaderBackup) and retry with a newer "
            "cryptsetup, which can also open it while reencryption is pending" % error
        ) from None


def add_key(device, passphrase, new_passphrase, options, keyslot=None):
    """Add ``new_passphrase`` in a new key slot (the first free one, or ``keyslot``); returns the slot id."""
    before = set(read_header(device).key_slots)
    args = ["cryptsetup", "luksAddKey", "-q"] + options.pbkdf_args() + _key_file_args()
    if keyslot is not None:
        args += ["--new-key-slot", str(keyslot)]
    with secret_pipe(new_passphrase) as (path, fd):
        run(args + [device, path], "adding a key to %s" % device, stdin=passphrase, pass_fds=(fd,))
    added = sorted(set(read_header(device).key_slots) - before)
    if len(added) != 1:
        raise KcryptError("adding a key to %s: expected one new key slot, found %s" % (device, added or "none"))
    return added[0]


def kill_slot(device, slot, passphrase):
    """Remove key slot ``slot``, authorised by a passphrase from another slot."""
    run(["cryptsetup", "luksKillSlot", "-q"] + _key_file_args() + [device, str(slot)], "removing key slot %d of %s" % (slot, device), stdin=passphrase)


def import_token(device, token):
    """Add a LUKS2 token (JSON, no secrets) to the header."""
    run(
        ["cryptsetup", "token", "import", "--json-file", "-", device],
        "adding a token to %s" % device,
        stdin=json.dumps(token).encode("utf-8"),
    )


def replace_token(device, token_id, token):
    """Replace LUKS2 token ``token_id`` in one header write (never a moment without it)."""
    run(
        ["cryptsetup", "token", "import", "--json-file", "-", "--token-id", str(token_id), "--token-replace", device],
        "replacing token %s of %s" % (token_id, device),
        stdin=json.dumps(token).encode("utf-8"),
    )


def remove_token(device, token_id):
    """Remove LUKS2 token ``token_id`` (JSON metadata only; key slots are untouched)."""
    run(["cryptsetup", "token", "remove", "--token-id", str(token_id), device], "removing token %s of %s" % (token_id, device))


def open_device(device, name, passphrase, keyslot=None):
    """Map ``device`` to /dev/mapper/``name`` (needs device-mapper)."""
    args = ["cryptsetup", "open", "--type", "luks"] + _key_file_args()
    if keyslot is not None:
        args += ["--key-slot", str(keyslot)]
    try:
        run(args + [device, name], "opening %s as %s" % (device, name), stdin=passphrase)
    except CommandError as error:
        if error.returncode == EXIT_WRONG_KEY:
            raise WrongKey("the key does not open %s" % device) from None
        raise


def close_device(name):
    run(["cryptsetup", "close", name], "closing /dev/mapper/%s" % name)


def refresh_persistent_discards(name, passphrase):
    """Upstream's last format step: store allow-discards as a persistent flag (cryptsetup refresh by name)."""
    run(
        ["cryptsetup", "refresh", "--persistent", "--allow-discards"] + _key_file_args() + [name],
        "setting allow-discards on /dev/mapper/%s" % name,
        stdin=passphrase,
    )
