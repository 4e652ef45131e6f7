# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Partitioned loop devices for tests, and the ext4 / LUKS helpers the node tests share.

Loop devices are shared with other test runs on the machine: a LoopDisk detaches
only the device it attached (recorded from ``losetup --show``), after ``partx -d``.
Here ``losetup -P`` creates no partition nodes: they are made the lab's way
(roles/lab/files/kcrypt_lab.py ``show_partitions``). Labels in tests carry a random
suffix: blkid searches every device on the machine, including other runs' loop devices.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "roles", "lab", "files"))
from kcrypt_lab import show_partitions  # noqa: E402  (the lab's way; one implementation)


def sh(*args, stdin=b"", check=True, env=None):
    """Run a command for test set-up (C locale, extra ``env``); returns the CompletedProcess (bytes)."""
    environment = dict(os.environ, LANG="C", LC_ALL="C")
    environment.update(env or {})
    result = subprocess.run(list(args), input=stdin, capture_output=True, env=environment, check=False)
    if check and result.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(args), result.returncode, result.stderr.decode(errors="replace")))
    return result


def unique_label(prefix="KT"):
    """A filesystem label no other test run uses (ext4 labels: up to 16 bytes)."""
    return "%s_%s" % (prefix, secrets.token_hex(4).upper())


class LoopDisk:
    """A GPT disk image attached to a loop device with its partitions visible as /dev/loopNpM.

    ``layout`` is a list of (gpt_name, size_mib) with size 0 meaning "the rest".
    """

    def __init__(self, directory, layout, size_mib=None):
        self.image = os.path.join(directory, "disk-%s.img" % secrets.token_hex(3))
        self.layout = layout
        self.size_mib = size_mib or (sum(size for name, size in layout) + 4)
        self.loop = None

    def attach(self):
        with open(self.image, "wb") as handle:
            handle.truncate(self.size_mib * 1024 * 1024)
        args = ["sgdisk"]
        for number, (name, size) in enumerate(self.layout, start=1):
            args += ["-n", "%d:0:%s" % (number, "+%dM" % size if size else "0"), "-c", "%d:%s" % (number, name)]
        sh(*(args + [self.image]))
        self.loop = sh("losetup", "-f", "--show", self.image).stdout.decode().strip()
        try:
            show_partitions(self.loop, len(self.layout))
        except BaseException:
            self.detach()
            raise
        return self

    @property
    def partitions(self):
        return ["%sp%d" % (self.loop, i) for i in range(1, len(self.layout) + 1)]

    def detach(self):
        if self.loop is None:
            return
        sh("partx", "-d", self.loop, check=False)
        sh("losetup", "-d", self.loop, check=False)
        self.loop = None
        if os.path.exists(self.image):
            os.unlink(self.image)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()


def make_ext4(device, label, size_mib=None):
    args = ["mkfs.ext4", "-q", "-F", "-L", label, device]
    if size_mib:
        args.append("%dM" % size_mib)
    sh(*args)


def write_file(device, name, data, workdir):
    """Put ``data`` at /``name`` on the unmounted ext4 ``device`` (debugfs: no mount to leak)."""
    source = os.path.join(workdir, "src-%s" % secrets.token_hex(3))
    with open(source, "wb") as handle:
        handle.write(data)
    sh("debugfs", "-w", "-R", "write %s %s" % (source, name), device)
    os.unlink(source)


def read_file(image_or_device, name, workdir):
    """The bytes of /``name`` in the ext4 filesystem of an image or device (debugfs dump)."""
    target = os.path.join(workdir, "out-%s" % secrets.token_hex(3))
    sh("debugfs", "-R", "dump /%s %s" % (name, target), image_or_device)
    if not os.path.exists(target):
        raise AssertionError("/%s is not in the filesystem" % name)
    with open(target, "rb") as handle:
        data = handle.read()
    os.unlink(target)
    return data


def luks_json(device):
    return json.loads(sh("cryptsetup", "luksDump", "--dump-json-metadata", device).stdout)


def opens_with(device, passphrase):
    """True if cryptsetup accepts ``passphrase`` for ``device`` (independent of the code under test)."""
    result = sh("cryptsetup", "open", "--test-passphrase", "--key-file", "-", device, stdin=passphrase, check=False)
    return result.returncode == 0


def decrypt_to_image(device, passphrase, image, workdir, length=None):
    """Decrypt the LUKS2 data segment of ``device`` into the file ``image`` without device-mapper.

    The volume key comes from ``luksDump --dump-volume-key``; aes-xts-plain64 with the
    IV = 512-byte sector number counted from the segment start (plus iv_tweak).
    ``length`` limits how many bytes are decrypted (default: the whole segment; "ext4": the
    filesystem the decrypted superblock describes).
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key_file = os.path.join(workdir, "vk-%s" % secrets.token_hex(3))
    sh("cryptsetup", "luksDump", "--dump-volume-key", "--volume-key-file", key_file, "-q", "--key-file", "-", device, stdin=passphrase)
    with open(key_file, "rb") as handle:
        key = handle.read()
    os.unlink(key_file)
    segments = [s for s in luks_json(device)["segments"].values() if s["type"] == "crypt" and not s.get("flags")]
    assert len(segments) == 1, segments
    segment = segments[0]
    assert segment["encryption"] == "aes-xts-plain64", segment
    sector_size = segment["sector_size"]
    assert sector_size == 512, "4K-sector IV numbering is not implemented here"
    offset = int(segment["offset"])
    tweak = int(segment["iv_tweak"])

    def decrypt(data, start):
        out = bytearray()
        for i in range(0, len(data), sector_size):
            iv_sector = tweak + (start + i) // 512
            decryptor = Cipher(algorithms.AES(key), modes.XTS(iv_sector.to_bytes(16, "little"))).decryptor()
            out += decryptor.update(data[i : i + sector_size]) + decryptor.finalize()
        return bytes(out)

    with open(device, "rb") as source:
        total = source.seek(0, os.SEEK_END) - offset
        if length == "ext4":  # just the filesystem: its size is in the (decrypted) superblock
            source.seek(offset)
            superblock = decrypt(source.read(2048), 0)[1024:]
            assert superblock[0x38:0x3A] == b"\x53\xef", "no ext superblock in the decrypted data"
            length = int.from_bytes(superblock[4:8], "little") * (1024 << int.from_bytes(superblock[24:28], "little"))
        if length is not None:
            total = min(total, length)
        source.seek(offset)
        with open(image, "wb") as target:
            chunk = 1024 * 1024
            done = 0
            while done < total:
                data = source.read(min(chunk, total - done))
                target.write(decrypt(data, done))
                done += len(data)
