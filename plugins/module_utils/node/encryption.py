# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Encrypting data partitions: resolve them, get the key, plan (check mode, diff), apply.

Private to the collection: the API may change without notice.
One implementation for the ``kairos_luks_encrypt`` module and the ``kcrypt encrypt`` CLI.

``plan()`` does every check that can fail - partition lookup, key test, in-use,
size, device-mapper - before ``apply()`` changes anything, so a bad task fails with
nothing changed. Two explicit modes:

- ``format``: upstream's exact sequence (spec §6.2): ``luksFormat --type luks2``
  with label and uuid5(label), open, ``mkfs.ext4 -L label``, ``refresh --persistent
  --allow-discards``, close. Needs device-mapper. Destroys the content, so a partition
  holding anything recognisable is only formatted with ``wipe``.
- ``in_place``: keeps the ext2/3/4 filesystem: check it, shrink it by 32 MiB when needed,
  ``cryptsetup reencrypt --encrypt`` offline (no device-mapper). An interrupted run
  leaves a header that asks for reencryption; the next run finds it and finishes it.

An encrypted partition whose key opens it is left alone; one whose key does not open it
is an error, never a reason to format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, filesystem, luks, recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

MODES = ("format", "in_place")

# Upstream formats with --iter-time 5 (ms). For machine-generated keys (TPM NV: ~165 bits,
# KMS TOFU: 256 bits) brute force is hopeless whatever the PBKDF costs, so the default
# keeps upstream's cheap setting; a passphrase typed by a person gets cryptsetup's default.
GENERATED_KEY_ITER_TIME_MS = 5

FORMAT_NEEDS_DEVICE_MAPPER = (
    "mode=format needs device-mapper (dm_mod and dm_crypt) to open the new LUKS device and create the "
    "filesystem inside it, and this kernel offers none ('device-mapper' is missing from /proc/misc). "
    "Use mode=in_place, which needs no device-mapper, or run on a kernel with dm-crypt. Nothing was changed."
)


@dataclass(frozen=True)
class Selector:
    """Which partition, and the label it should carry.

    ``device`` or ``uuid`` select; ``label`` alone selects by label (Kairos' way,
    with the GPT-name fallback) and otherwise names the LUKS header.
    """

    label: str = ""
    device: str = ""
    uuid: str = ""

    def validate(self):
        if self.device and self.uuid:
            raise KcryptError("select a partition by device or by uuid, not both (%s)" % self.describe())
        if not (self.device or self.uuid or self.label):
            raise KcryptError("each partition needs a label, a device or a uuid")
        return self

    def describe(self):
        parts = ["%s=%s" % (k, v) for k, v in (("device", self.device), ("uuid", self.uuid), ("label", self.label)) if v]
        return ", ".join(parts)

    def resolve(self, scope=None):
        if self.device:
            return blockdev.probe(self.device)
        if self.uuid:
            return blockdev.find_by_uuid(self.uuid, scope)
        return blockdev.find_by_label(self.label, scope)


def selectors(partitions):
    """Selectors from a module's ``partitions`` option (dicts with label / device / uuid)."""
    return tuple(Selector(label=p.get("label") or "", device=p.get("device") or "", uuid=p.get("uuid") or "") for p in partitions)


@dataclass(frozen=True)
class EncryptRequest:
    partitions: tuple
    mode: str
    wipe: bool = False
    options: luks.LuksOptions = luks.LuksOptions()
    recovery_key: bool = False
    recovery_escrow: object = recovery.ControllerEscrow()  # where a new recovery key is kept (node/recovery.py)

    def validate(self):
        if self.mode not in MODES:
            raise KcryptError("mode must be one of %s, not %r" % (", ".join(MODES), self.mode))
        if not self.partitions:
            raise KcryptError("no partitions given")
        for selector in self.partitions:
            selector.validate()
        self.options.validate()
        return self


@dataclass
class PartitionPlan:
    selector: Selector
    device: blockdev.BlockDevice
    label: str  # the LUKS label after encryption ("" = none)
    action: str  # none | format | in_place | resume
    add_recovery_key: bool = False
    shrink_to: int = None  # bytes, when the filesystem must shrink first
    luks_uuid: str = ""  # known or planned LUKS UUID ("" = chosen by cryptsetup)
    relabel: bool = False  # in place: give the filesystem the LUKS label too
    notes: list = field(default_factory=list)

    @property
    def changes(self):
        return self.action != "none" or self.add_recovery_key

    def before(self):
        state = _state(self.device.fstype or "(nothing recognised)", self.device.label, self.device.uuid)
        if self.action == "resume":
            state["type"] = "crypto_LUKS (in-place encryption unfinished)"
        return state

    def after(self):
        if self.action == "none":
            state = self.before()
        elif self.action == "resume":
            state = _state("crypto_LUKS (luks2)", self.device.label, self.device.uuid)
        else:
            state = _state("crypto_LUKS (luks2)", self.label, self.luks_uuid or "(new random UUID)")
            if self.action == "format":
                state["content"] = "new ext4 filesystem%s" % (" labelled %s" % self.label if self.label else "")
            else:
                state["content"] = "%s filesystem kept%s" % (self.device.fstype, " (shrunk to %d bytes)" % self.shrink_to if self.shrink_to else "")
                if self.relabel:
                    state["content"] += ", relabelled %s -> %s" % (self.device.label or "(none)", self.label)
        if self.add_recovery_key:
            state["recovery key"] = "added in a new key slot"
        return state


def _state(fstype, label, uuid):
    return {"type": fstype, "label": label or "(none)", "uuid": uuid or "(none)"}


def effective_options(options, source):
    """The LUKS options to use with ``source``: upstream's cheap PBKDF for generated keys unless set."""
    if source.generated and options.iter_time_ms is None and options.iterations is None:
        return dataclasses.replace(options, iter_time_ms=GENERATED_KEY_ITER_TIME_MS)
    return options


def plan(request, source, scope=None):
    """What encrypting ``request.partitions`` with keys from ``source`` would do. Changes nothing.

    Raises KcryptError on the first partition that cannot be handled.
    ``scope`` limits label/UUID lookups to the given device paths (tests).
    """
    request.validate()
    plans = []
    seen = {}
    for selector in request.partitions:
        device = selector.resolve(scope)
        if device.name in seen:
            raise KcryptError("%s and %s select the same partition %s" % (seen[device.name], selector.describe(), device.path))
        seen[device.name] = selector.describe()
        plans.append(_plan_partition(request, source, selector, device))
    if any(p.action == "format" for p in plans) and not blockdev.device_mapper_available():
        raise KcryptError(FORMAT_NEEDS_DEVICE_MAPPER)
    if any(p.changes for p in plans):
        source.preflight()
    return plans


def verify(request, source, scope=None):
    """Prove that keys from ``source`` open every partition of ``request``: a new plan finds nothing to do.

    Give a new source (nothing cached), so each key is fetched again as at boot (KMS attestation,
    TPM NV read) and tested against the partition with cryptsetup. Raises KcryptError otherwise.
    """
    pending = [item.device.path for item in plan(request, source, scope) if item.changes]
    if pending:
        raise KcryptError("%s would still be changed by another run; the encryption did not take" % ", ".join(pending))


def _plan_partition(request, source, selector, device):
    label = selector.label or device.kairos_label
    if device.is_luks:
        return _plan_encrypted(request, source, selector, device, label)
    item = PartitionPlan(selector, device, label, request.mode, luks_uuid=luks.uuid_for_label(label) if label else "")
    if request.mode == "in_place":
        if not device.fstype:
            raise KcryptError("%s holds no filesystem to keep; use mode=format to create one" % device.describe())
        if device.fstype not in filesystem.SHRINKABLE:
            raise KcryptError(
                "%s: in-place encryption must shrink the filesystem by 32 MiB for the LUKS header, and only "
                "%s can be shrunk offline, not %s. Nothing was changed." % (device.describe(), "/".join(filesystem.SHRINKABLE), device.fstype)
            )
        item.shrink_to = _shrink_target(device)
        if label and label != device.label:
            # Kairos mounts the filesystem inside by the same label as the LUKS header (spec §6.2, §6.3)
            if len(label.encode("utf-8")) > filesystem.EXT_LABEL_MAX:
                raise KcryptError(
                    "label %s is longer than the %d bytes an ext filesystem label holds; the filesystem inside "
                    "must carry the same label as the LUKS header. Nothing was changed." % (label, filesystem.EXT_LABEL_MAX)
                )
            item.relabel = True
    elif device.fstype and not request.wipe:
        raise KcryptError(
            "%s is not empty: mode=format would destroy it. Set wipe=true to format it anyway, or use "
            "mode=in_place to encrypt it keeping its data. Nothing was changed." % device.describe()
        )
    _require_free(device)
    if blockdev.mapping_exists(device.name) and request.mode == "format":
        raise KcryptError("a device-mapper device named %s already exists; close it first" % device.name)
    item.add_recovery_key = request.recovery_key
    return item


def _plan_encrypted(request, source, selector, device, label):
    if (selector.device or selector.uuid) and selector.label and device.label and device.label != selector.label:
        raise KcryptError(
            "%s is already LUKS-encrypted with the label %s, not %s; nothing was changed" % (device.path, device.label, selector.label)
        )
    key = source.existing_key(device, label)
    if key is None:
        raise luks.WrongKey(
            "%s is LUKS-encrypted but %s holds no key yet, so it was encrypted with another key "
            "(another TPM or NV index). Nothing was changed." % (device.path, source.describe())
        )
    luks.require_key(device.path, key, source.describe())
    header = luks.read_header(device.path)
    item = PartitionPlan(selector, device, device.label, "none", luks_uuid=header.uuid)
    if header.reencrypting:
        item.action = "resume"
        item.notes.append("in-place encryption was interrupted; it will be finished")
        _require_free(device)
    if request.recovery_key and not recovery.kept_slots(header):
        item.add_recovery_key = True
    return item


def _require_free(device):
    busy = blockdev.in_use(device.path)
    if busy:
        raise KcryptError("%s is %s; unmount or close it before encrypting. Nothing was changed." % (device.path, busy))


def _shrink_target(device):
    """The size the filesystem must shrink to (None when it already fits), or KcryptError if it cannot."""
    available = device.size - luks.REDUCE_DEVICE_SIZE
    if available <= 0:
        raise KcryptError(
            "%s is %d bytes; in-place encryption needs more than 32 MiB for the LUKS header" % (device.path, device.size)
        )
    if filesystem.size(device.path) <= available:
        return None
    minimum = filesystem.minimum_size(device.path)
    if minimum > available:
        raise KcryptError(
            "%s is too small to encrypt in place: the filesystem needs at least %d bytes and only %d remain "
            "after reserving 32 MiB for the LUKS header. Free space in it, or grow the partition. "
            "Nothing was changed." % (device.path, minimum, available)
        )
    return available


def apply(plans, request, source, log=None, results=None):
    """Carry out ``plans`` (from ``plan``). Returns one result dict per partition.

    Stops at the first failure: earlier partitions keep their (finished) changes, and an
    interrupted in-place encryption is finished by running again. Pass ``results`` (a
    list) to keep the results of the partitions done before a failure.
    """
    log = log or (lambda message: None)
    options = effective_options(request.options, source)
    results = [] if results is None else results
    for item in plans:
        results.append(_apply_partition(item, options, source, log, request.recovery_escrow))
    return results


def _apply_partition(item, options, source, log, escrow):
    path = item.device.path
    recovery_key = None
    if not item.changes:
        return result(item, source)
    key = source.key(item.device, item.label)
    if item.action == "format":
        log("formatting %s as LUKS2 (label %s)" % (path, item.label or "none"))
        _format(item, key, options)
    elif item.action == "in_place":
        log("encrypting %s in place" % path)
        filesystem.check(path)
        if item.shrink_to:
            filesystem.shrink(path, item.shrink_to)
        if item.relabel:
            filesystem.set_label(path, item.label)
        luks.encrypt_in_place(path, key, options, uuid=item.luks_uuid or None, label=item.label or None)
    elif item.action == "resume":
        log("finishing the interrupted encryption of %s" % path)
        luks.resume(path, key)
    if item.add_recovery_key:
        log("adding a recovery key to %s (kept by: %s)" % (path, escrow.name))
        added = recovery.add(item.device, key, options, escrow, label=item.label)
        # Not added to source.secrets: with the controller escrow the caller must be able to return it (once).
        recovery_key = added["key"] if escrow.returns_key else None
    return result(item, source, applied=True, recovery_key=recovery_key)


def _format(item, key, options):
    path = item.device.path
    name = item.device.name
    luks.format_device(path, key, options, uuid=item.luks_uuid or None, label=item.label or None)
    try:
        luks.open_device(path, name, key)
        try:
            blockdev.wait_for(blockdev.mapper_path(name))
            filesystem.make_ext4(blockdev.mapper_path(name), item.label)
            luks.refresh_persistent_discards(name, key)
        finally:
            luks.close_device(name)
    except KcryptError as error:
        raise KcryptError(
            "%s; %s is now an empty LUKS container without a filesystem. Running again will not finish it "
            "(an encrypted partition is never formatted again): erase it with 'cryptsetup erase %s' and "
            "'wipefs -a %s', then run again" % (error, path, path, path)
        ) from None


def result(item, source, applied=False, recovery_key=None):
    """The per-partition result: identifiers and what happened (or would happen, unapplied in check mode).

    Never holds a key, except a recovery key just created.
    """
    device = item.device
    if applied:
        device = blockdev.probe(device.path)
    entry = {
        "device": device.path,
        "name": device.name,
        "label": device.label if device.is_luks else item.label,
        "luks_uuid": device.uuid if device.is_luks else item.luks_uuid,
        "partuuid": device.partuuid,
        "key_source": source.name,
        "action": item.action,
        "changed": item.changes,
        "recovery_key_added": item.add_recovery_key,
    }
    if recovery_key is not None:
        entry["recovery_key"] = recovery_key.decode("ascii")
    return entry
