# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""ext2/3/4 filesystems: size, minimum size, check, shrink, create (e2fsprogs).

Private to the collection: the API may change without notice.
In-place encryption needs the filesystem to end 32 MiB before the partition does;
only the ext family can be shrunk offline, so only it is supported in place.
"""

from __future__ import annotations

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.command import key_values, output, run
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

SHRINKABLE = ("ext2", "ext3", "ext4")

# e2fsck exit bits (e2fsck(8)): 1 = errors corrected, 2 = corrected, reboot wanted; 4 and up = not fixed.
E2FSCK_UNFIXED = 4


def _superblock(device):
    return key_values(output(["dumpe2fs", "-h", device], "reading the ext superblock of %s" % device), ":")


def size(device):
    """Bytes the ext filesystem on ``device`` occupies (block count x block size)."""
    values = _superblock(device)
    return int(values["Block count"]) * int(values["Block size"])


def block_size(device):
    return int(_superblock(device)["Block size"])


def minimum_size(device):
    """resize2fs' estimate of the smallest size the filesystem can shrink to, in bytes (read-only)."""
    text = output(["resize2fs", "-P", device], "estimating the minimum size of %s" % device)
    for line in text.splitlines():
        if "minimum size" in line:
            return int(line.rsplit(":", 1)[1].strip()) * block_size(device)
    raise KcryptError("resize2fs -P printed no minimum size for %s" % device)


def check(device):
    """``e2fsck -f -p``: resize2fs demands a freshly checked filesystem. Fails on errors preen mode cannot fix."""
    result = run(["e2fsck", "-f", "-p", device], "checking the filesystem on %s" % device, ok_codes=tuple(range(256)))
    if result.returncode >= E2FSCK_UNFIXED:
        raise KcryptError(
            "the filesystem on %s has errors e2fsck -p cannot fix (exit %d); repair it with 'e2fsck -f %s' "
            "before encrypting" % (device, result.returncode, device)
        )


def shrink(device, new_size):
    """Shrink the filesystem on ``device`` to at most ``new_size`` bytes (rounded down to whole blocks)."""
    blocks = new_size // block_size(device)
    run(["resize2fs", device, str(blocks)], "shrinking the filesystem on %s" % device)


EXT_LABEL_MAX = 16  # bytes in the ext superblock's volume name


def set_label(device, label):
    """Set the ext filesystem label (e2label), e.g. to match the LUKS label as Kairos expects."""
    if len(label.encode("utf-8")) > EXT_LABEL_MAX:
        raise KcryptError("ext filesystem labels hold at most %d bytes; %r is longer" % (EXT_LABEL_MAX, label))
    run(["e2label", device, label], "labelling the filesystem on %s" % device)


def make_ext4(device, label=""):
    """``mkfs.ext4 [-L label]``, as upstream formats the inside of a new LUKS device."""
    args = ["mkfs.ext4", "-q", "-F"]
    if label:
        args += ["-L", label]
    run(args + [device], "creating an ext4 filesystem on %s" % device)
