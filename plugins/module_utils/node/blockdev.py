# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Finding and inspecting block devices: blkid probes, label/UUID lookup, in-use checks.

Private to the collection: the API may change without notice.

Lookup follows Kairos (spec §6.1): a filesystem (or LUKS2 header) label, and for
``COS_OEM``/``COS_PERSISTENT`` the GPT partition names ``oem``/``persistent`` as a
fallback. Everything comes from ``blkid -c /dev/null`` (low-level probing, no cache)
and sysfs, never from udev: initramfs and containers often run without udevd, so
``/dev/disk/by-*`` and lsblk's labels cannot be trusted to exist.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.command import find_program, key_values, run
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

# Kairos' legacy GPT partition names for its two encryptable partitions (spec §6.1).
GPT_NAME_FALLBACKS = {"COS_OEM": "oem", "COS_PERSISTENT": "persistent"}
LABEL_FROM_GPT_NAME = {v: k for k, v in GPT_NAME_FALLBACKS.items()}

BLKID_NOTHING_FOUND = 2
BLKID_AMBIVALENT = 8


class PartitionNotFound(KcryptError):
    """No block device matches the selector."""


@dataclass(frozen=True)
class BlockDevice:
    """What blkid and sysfs say about one block device."""

    path: str  # as given or found, e.g. /dev/vda5
    name: str  # kernel name, e.g. vda5 (upstream names the mapping after it)
    size: int  # bytes
    fstype: str = ""  # blkid TYPE: ext4, crypto_LUKS, ... or "" when blkid recognises nothing
    label: str = ""  # filesystem or LUKS2 header label
    uuid: str = ""  # filesystem or LUKS header UUID
    version: str = ""  # blkid VERSION (LUKS header version, ext4 revision ...)
    partlabel: str = ""  # GPT partition name
    partuuid: str = ""  # GPT partition UUID

    @property
    def is_luks(self):
        return self.fstype == "crypto_LUKS"

    @property
    def kairos_label(self):
        """The label Kairos uses for this partition: its own, else the one implied by its GPT name (§6.1)."""
        if self.label and self.label != "unknown":
            return self.label
        return LABEL_FROM_GPT_NAME.get(self.partlabel, "")

    def describe(self):
        """One line for messages and diffs: the path and what it holds."""
        content = self.fstype or "no recognised content"
        if self.label:
            content += " labelled %s" % self.label
        return "%s (%s)" % (self.path, content)


def _sysfs_dir(rdev):
    return "/sys/dev/block/%d:%d" % (os.major(rdev), os.minor(rdev))


def _block_rdev(path):
    try:
        info = os.stat(path)
    except OSError as error:
        raise PartitionNotFound("%s does not exist (%s)" % (path, error.strerror)) from None
    if not stat.S_ISBLK(info.st_mode):
        raise KcryptError("%s is not a block device" % path)
    return info.st_rdev


def kernel_name(path):
    """The kernel's name for the block device at ``path`` (vda5 for /dev/vda5 or any symlink to it)."""
    return os.path.basename(os.path.realpath(_sysfs_dir(_block_rdev(path))))


def probe(path):
    """A BlockDevice for ``path`` from a low-level blkid probe (no cache, no udev).

    Fails when blkid finds more than one signature: which one is real is unclear,
    and acting on such a device could destroy data.
    """
    rdev = _block_rdev(path)
    result = run(
        ["blkid", "-c", "/dev/null", "-p", "-o", "export", path],
        "probing %s" % path,
        ok_codes=(0, BLKID_NOTHING_FOUND, BLKID_AMBIVALENT),
    )
    if result.returncode == BLKID_AMBIVALENT:
        raise KcryptError(
            "%s holds more than one signature (blkid: ambivalent result); inspect it with "
            "'wipefs %s' and remove the stale one before encrypting" % (path, path)
        )
    values = key_values(result.stdout.decode("utf-8", "replace"))
    with open(os.path.join(_sysfs_dir(rdev), "size")) as handle:
        size = int(handle.read().strip()) * 512
    return BlockDevice(
        path=path,
        name=os.path.basename(os.path.realpath(_sysfs_dir(rdev))),
        size=size,
        fstype=values.get("TYPE", ""),
        label=values.get("LABEL", ""),
        uuid=values.get("UUID", ""),
        version=values.get("VERSION", ""),
        partlabel=values.get("PART_ENTRY_NAME", ""),
        partuuid=values.get("PART_ENTRY_UUID", ""),
    )


def _search(token, scope):
    """Devices whose blkid tag matches ``token`` (NAME=value), probing ``scope`` or all devices."""
    result = run(
        ["blkid", "-c", "/dev/null", "-o", "device", "-t", token] + list(scope or []),
        "searching block devices for %s" % token,
        ok_codes=(0, BLKID_NOTHING_FOUND),
    )
    found = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        if line.strip() and line.strip() not in found:
            found.append(line.strip())
    return _drop_mappings_of(found)


def _drop_mappings_of(paths):
    """Leave out device-mapper devices stacked on another match.

    An opened LUKS partition and the filesystem inside its mapping carry the same
    label (Kairos labels both); the partition is the one meant.
    """
    if len(paths) < 2:
        return paths
    names = {}
    for path in paths:
        try:
            names[path] = kernel_name(path)
        except KcryptError:
            names[path] = ""
    kept = []
    for path in paths:
        slaves_dir = os.path.join("/sys/class/block", names[path], "slaves")
        slaves = set(os.listdir(slaves_dir)) if names[path] and os.path.isdir(slaves_dir) else set()
        if slaves & set(names.values()):
            continue
        kept.append(path)
    return kept


def _single(found, what):
    if len(found) > 1:
        raise KcryptError(
            "%s matches more than one device (%s); select the partition by device path instead" % (what, ", ".join(found))
        )
    return found[0] if found else None


def find_by_label(label, scope=None):
    """The device whose filesystem or LUKS2 label is ``label``, with Kairos' GPT-name fallback.

    Like upstream, ``COS_OEM``/``COS_PERSISTENT`` also match the GPT partition names
    ``oem``/``persistent`` when no device carries the label. Unlike upstream's
    ``blkid -L`` (first match wins) a label found on two devices is an error.
    ``scope`` restricts the search to the given device paths.
    """
    if not label:
        raise KcryptError("an empty label cannot select a partition")
    found = _single(_search("LABEL=%s" % label, scope), "label %s" % label)
    if found is None and label in GPT_NAME_FALLBACKS:
        found = _single(_search("PARTLABEL=%s" % GPT_NAME_FALLBACKS[label], scope), "GPT name %s" % GPT_NAME_FALLBACKS[label])
    if found is None:
        raise PartitionNotFound("no partition has the label %s" % label)
    return probe(found)


def find_by_uuid(uuid, scope=None):
    """The device whose filesystem/LUKS UUID, or else GPT partition UUID, is ``uuid``."""
    if not uuid:
        raise KcryptError("an empty UUID cannot select a partition")
    found = _single(_search("UUID=%s" % uuid, scope), "UUID %s" % uuid)
    if found is None:
        found = _single(_search("PARTUUID=%s" % uuid, scope), "partition UUID %s" % uuid)
    if found is None:
        raise PartitionNotFound("no partition has the UUID %s" % uuid)
    return probe(found)


def find_luks(scope=None):
    """Every LUKS device on the system (or in ``scope``), probed."""
    return [probe(path) for path in find_luks_paths(scope)]


def find_luks_paths(scope=None):
    """The paths of every LUKS device on the system (or in ``scope``), not probed."""
    return _search("TYPE=crypto_LUKS", scope)


def mount_points(path):
    """Where the device at ``path`` is mounted (from /proc/self/mountinfo, matched by device number)."""
    rdev = _block_rdev(path)
    wanted = "%d:%d" % (os.major(rdev), os.minor(rdev))
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and fields[2] == wanted:
                points.append(fields[4].replace("\\040", " "))
    return points


def holders(path):
    """Kernel names of devices stacked on ``path`` (device-mapper, md ...)."""
    directory = os.path.join(_sysfs_dir(_block_rdev(path)), "holders")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def in_use(path):
    """Why ``path`` is busy (mounted, held by a mapping, swap, or opened exclusively), or None if it is free."""
    points = mount_points(path)
    if points:
        return "mounted on %s" % ", ".join(points)
    held = holders(path)
    if held:
        return "in use by %s (an open mapping or RAID member)" % ", ".join(held)
    try:
        # The kernel refuses O_EXCL on a block device that is mounted or claimed (swap, dm, md).
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as error:
        if error.errno == errno.EBUSY:
            return "in use by the kernel (swap, or claimed by another driver)"
        raise KcryptError("cannot open %s: %s" % (path, error.strerror)) from None
    os.close(fd)
    return None


def device_mapper_available():
    """Whether the kernel offers device-mapper (needed to open LUKS devices and to format inside them).

    Checked from /proc/misc without touching /dev/mapper: libdevmapper would create
    the control node as a side effect. Tries ``modprobe dm_mod`` once when absent.
    """
    if _misc_has_device_mapper():
        return True
    try:
        modprobe = find_program("modprobe", "")
    except KcryptError:
        return False
    try:
        run([modprobe, "-q", "dm_mod"], "loading dm_mod", ok_codes=tuple(range(256)))
    except KcryptError:
        return False
    return _misc_has_device_mapper()


def _misc_has_device_mapper():
    try:
        with open("/proc/misc") as handle:
            return any(line.split()[-1:] == ["device-mapper"] for line in handle)
    except OSError:
        return False


def wait_for(path, timeout=10.0):
    """Wait for a device node to appear (without udev, device-mapper creates it itself, a little later)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise KcryptError("%s did not appear within %d s" % (path, timeout))
        time.sleep(0.1)


def mapper_path(name):
    return "/dev/mapper/%s" % name


def mapping_exists(name):
    """Whether a device-mapper device called ``name`` exists (sysfs first: /dev/mapper may lack the node)."""
    if os.path.exists(mapper_path(name)):
        return True
    try:
        entries = os.listdir("/sys/block")
    except OSError:
        return False
    for entry in entries:
        if entry.startswith("dm-"):
            try:
                with open("/sys/block/%s/dm/name" % entry) as handle:
                    if handle.read().strip() == name:
                        return True
            except OSError:
                continue
    return False
