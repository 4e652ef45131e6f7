# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening and closing encrypted partitions, one by one or all of them (upstream's unlock-all).

Private to the collection: the API may change without notice.
One implementation for the ``kairos_luks_unlock`` module and the ``kcrypt unlock``,
``unlock-all`` and ``close`` commands.

As upstream (spec §6.3): the mapping is named after the kernel partition name
(``/dev/mapper/vda5``); a partition whose mapping exists is left alone; unlock-all
takes every LUKS partition, labelled by its LUKS label or, without one, by its GPT
name (``oem``/``persistent``), and skips those with neither; getting the key and
opening are retried with linearly growing pauses. Unlike upstream, a key that does
not open the partition, or a KMS that refuses the TPM, fails at once: retrying
cannot change that answer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.client.kms_client import AttestationRejected
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, luks
from ansible_collections.kairos.kcrypt.plugins.module_utils.node.encryption import Selector
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

DEFAULT_ATTEMPTS = 10  # upstream's unlock loop
OPEN_NEEDS_DEVICE_MAPPER = (
    "opening a LUKS partition needs device-mapper (dm_mod and dm_crypt), and this kernel offers none "
    "('device-mapper' is missing from /proc/misc). Nothing was changed."
)


@dataclass(frozen=True)
class Target:
    """A partition to open or close, with an optional mapping name (default: the kernel name)."""

    selector: Selector = None
    name: str = ""  # mapping name; alone (no selector) it closes that mapping


@dataclass
class UnlockPlan:
    device: blockdev.BlockDevice  # None when closing a mapping named directly
    label: str
    name: str  # mapping name
    action: str  # open | close | none | skip
    reason: str = ""
    done: bool = False  # set once the action has been carried out

    @property
    def changes(self):
        return self.action in ("open", "close")

    def as_result(self, predicted=False):
        """The result entry; ``predicted`` (check mode) reports the planned change instead of the done one."""
        return {
            "device": self.device.path if self.device else "",
            "name": self.device.name if self.device else "",
            "label": self.label,
            "mapper": blockdev.mapper_path(self.name) if self.name else "",
            "action": self.action,
            "changed": self.changes if predicted else self.done,
            "reason": self.reason,
        }


def open_mappings(device):
    """Names of the device-mapper devices stacked on ``device`` (its open LUKS mappings)."""
    names = []
    for holder in blockdev.holders(device.path):
        try:
            with open("/sys/class/block/%s/dm/name" % holder) as handle:
                names.append(handle.read().strip())
        except OSError:
            continue
    return names


def _resolve_luks(selector, scope):
    device = selector.resolve(scope)
    if not device.is_luks:
        raise KcryptError("%s is not LUKS-encrypted; nothing to open or close" % device.describe())
    return device


def plan_open(targets, scope=None):
    """What opening ``targets`` would do; ``targets`` None means every LUKS partition (unlock-all)."""
    plans = []
    if targets is None:
        for device in blockdev.find_luks(scope):
            plans.append(_plan_open_device(device, device.kairos_label, ""))
    else:
        for target in targets:
            if target.selector is None:
                raise KcryptError("opening needs a label, device or uuid for each partition")
            device = _resolve_luks(target.selector, scope)
            plans.append(_plan_open_device(device, target.selector.label or device.kairos_label, target.name))
    if any(p.action == "open" for p in plans) and not blockdev.device_mapper_available():
        raise KcryptError(OPEN_NEEDS_DEVICE_MAPPER)
    return plans


def _plan_open_device(device, label, name):
    existing = open_mappings(device)
    if existing:
        return UnlockPlan(device, label, existing[0], "none", "already open")
    if not label:
        return UnlockPlan(device, "", "", "skip", "no LUKS label and no Kairos GPT name (oem/persistent)")
    name = name or device.name
    if blockdev.mapping_exists(name):
        raise KcryptError("a device-mapper device named %s already exists but is not %s" % (name, device.path))
    return UnlockPlan(device, label, name, "open")


def verify_keys(plans, source):
    """Check mode's stand-in for opening: the key exists and opens each partition (no device-mapper needed)."""
    for item in plans:
        if item.action == "open":
            luks.require_key(item.device.path, _existing_key(source, item), source.describe())


def _existing_key(source, item):
    key = source.existing_key(item.device, item.label)
    if key is None:
        raise luks.WrongKey("%s holds no key for %s (nothing stored yet)" % (source.describe(), item.device.path))
    return key


# Answers a retry cannot change: a wrong key, or the KMS refusing this TPM.
NOT_RETRIED = (luks.WrongKey, AttestationRejected)


def apply_open(plans, source, keyslot=None, attempts=DEFAULT_ATTEMPTS, retry_delay=1.0, log=None, sleep=time.sleep):
    """Open every planned partition, retrying each up to ``attempts`` times (pause: attempt x retry_delay)."""
    log = log or (lambda message: None)
    final = NOT_RETRIED
    for item in plans:
        if item.action != "open":
            continue
        for attempt in range(1, attempts + 1):
            try:
                key = _existing_key(source, item)
                luks.open_device(item.device.path, item.name, key, keyslot=keyslot)
                item.done = True
                log("opened %s as %s" % (item.device.path, blockdev.mapper_path(item.name)))
                break
            except final:
                raise
            except KcryptError as error:
                if attempt == attempts:
                    raise KcryptError("could not open %s after %d attempts: %s" % (item.device.path, attempts, error)) from None
                log("attempt %d to open %s failed: %s" % (attempt, item.device.path, error))
                sleep(attempt * retry_delay)
    return [item.as_result() for item in plans]


def plan_close(targets, scope=None):
    plans = []
    for target in targets:
        if target.selector is None:
            if not target.name:
                raise KcryptError("closing needs a label, device, uuid or mapping name")
            exists = blockdev.mapping_exists(target.name)
            plans.append(UnlockPlan(None, "", target.name, "close" if exists else "none", "" if exists else "not open"))
            continue
        device = _resolve_luks(target.selector, scope)
        names = open_mappings(device)
        label = target.selector.label or device.kairos_label
        if not names:
            plans.append(UnlockPlan(device, label, target.name or device.name, "none", "not open"))
        for name in names:
            plans.append(UnlockPlan(device, label, name, "close"))
    for item in plans:
        if item.action == "close":
            path = blockdev.mapper_path(item.name)
            if os.path.exists(path):
                busy = blockdev.in_use(path)
                if busy:
                    raise KcryptError("%s is %s; unmount it before closing. Nothing was changed." % (path, busy))
    return plans


def apply_close(plans, log=None):
    log = log or (lambda message: None)
    for item in plans:
        if item.action == "close":
            luks.close_device(item.name)
            item.done = True
            log("closed %s" % blockdev.mapper_path(item.name))
    return [item.as_result() for item in plans]
