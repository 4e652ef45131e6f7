# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""In-place encryption keeps the data: verified byte for byte without device-mapper, and resumed after interruption.

The encrypted content is read back by decrypting the LUKS2 data segment in Python
(volume key from ``luksDump --dump-volume-key``, aes-xts-plain64) into an image that
debugfs reads: no dm-crypt involved.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, filesystem, key_source, luks
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from support.loopdisk import decrypt_to_image, make_ext4, read_file, sh, unique_label, write_file
from support.node_fixtures import fast_options, loop_disks  # noqa: F401  # pylint: disable=unused-import

PASSPHRASE = b"in-place test passphrase"


def put_known_files(device, workdir):
    files = {
        "random.bin": os.urandom(3 * 1024 * 1024 + 123),
        "hello.txt": b"hello from kairos\n",
        "zeros.bin": bytes(200000),
    }
    for name, data in files.items():
        write_file(device, name, data, workdir)
    return files


def assert_content(device, files, workdir):
    """Decrypt the filesystem area and compare every file byte for byte; e2fsck must find it clean."""
    image = os.path.join(workdir, "decrypted.img")
    decrypt_to_image(device, PASSPHRASE, image, workdir, length="ext4")
    for name, data in files.items():
        assert hashlib.sha256(read_file(image, name, workdir)).hexdigest() == hashlib.sha256(data).hexdigest(), name
    assert sh("e2fsck", "-f", "-n", image, check=False).returncode == 0
    os.unlink(image)


def test_in_place_keeps_every_byte_and_shrinks_only_as_needed(loop_disks, tmp_path):
    disk = loop_disks([("persistent", 64)])
    device = disk.partitions[0]
    label = unique_label()
    make_ext4(device, label)
    files = put_known_files(device, str(tmp_path))
    source = key_source.PassphraseKeySource(PASSPHRASE)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place", options=fast_options())
    plans = encryption.plan(request, source)
    assert plans[0].shrink_to == 32 * 1024 * 1024  # 64 MiB partition minus 32 MiB for the header
    result = encryption.apply(plans, request, source)[0]
    assert (result["action"], result["label"], result["luks_uuid"]) == ("in_place", label, luks.uuid_for_label(label))
    assert_content(device, files, str(tmp_path))


def test_filesystem_that_already_fits_is_not_resized(loop_disks, tmp_path):
    disk = loop_disks([("data", 64)])
    device = disk.partitions[0]
    make_ext4(device, unique_label(), size_mib=20)
    files = put_known_files(device, str(tmp_path))
    size_before = filesystem.size(device)
    source = key_source.PassphraseKeySource(PASSPHRASE)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(device=device),), mode="in_place", options=fast_options())
    plans = encryption.plan(request, source)
    assert plans[0].shrink_to is None
    encryption.apply(plans, request, source)
    assert_content(device, files, str(tmp_path))
    image = os.path.join(str(tmp_path), "check.img")
    decrypt_to_image(device, PASSPHRASE, image, str(tmp_path), length=size_before)
    assert filesystem.size(image) == size_before


def test_half_done_encryption_is_detected_and_finished(loop_disks, tmp_path):
    """Deterministic interruption: the header is written (--init-only) and no data moved yet."""
    disk = loop_disks([("data", 64)])
    device = disk.partitions[0]
    label = unique_label()
    make_ext4(device, label, size_mib=24)
    files = put_known_files(device, str(tmp_path))
    luks.encrypt_in_place(device, PASSPHRASE, fast_options(), uuid=luks.uuid_for_label(label), label=label, init_only=True)
    assert luks.read_header(device).reencrypting

    source = key_source.PassphraseKeySource(PASSPHRASE)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place", options=fast_options())
    plans = encryption.plan(request, source)
    assert [(p.action, p.changes) for p in plans] == [("resume", True)]
    assert plans[0].before()["type"] == "crypto_LUKS (in-place encryption unfinished)"
    assert encryption.apply(plans, request, source)[0]["action"] == "resume"
    assert not luks.read_header(device).reencrypting
    assert_content(device, files, str(tmp_path))
    assert [p.action for p in encryption.plan(request, source)] == ["none"]


def test_killed_encryption_resumes_with_the_cli(loop_disks, tmp_path, repo_root):
    """The real thing: SIGKILL the kcrypt CLI (and its cryptsetup) mid-way, then run it again."""
    disk = loop_disks([("data", 320)])
    device = disk.partitions[0]
    label = unique_label()
    make_ext4(device, label, size_mib=24)  # small filesystem, big device: slow enough to interrupt, quick to verify
    files = put_known_files(device, str(tmp_path))
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE)
    command = [sys.executable, os.path.join(repo_root, "bin", "kcrypt"), "--json", "encrypt", "--label", label,
               "--mode", "in_place", "--key-source", "passphrase", "--passphrase-file", str(secret),
               "--pbkdf-algorithm", "pbkdf2", "--pbkdf-iteration-count", "1000"]
    # A SIGKILLed run cannot remove its private working directory: keep it under tmp_path, not /tmp.
    killed_env = dict(os.environ, TMPDIR=str(tmp_path))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env=killed_env)
    try:
        interrupted = wait_for_progress(device, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert interrupted, "cryptsetup finished before it could be interrupted; the device is too fast for this test"
    assert luks.read_header(device).reencrypting

    second = subprocess.run(command, capture_output=True, check=False)
    assert second.returncode == 0, second.stderr.decode()
    report = json.loads(second.stdout)
    assert report["changed"] and report["partitions"][0]["action"] == "resume"
    assert not luks.read_header(device).reencrypting
    assert_content(device, files, str(tmp_path))


def wait_for_progress(device, process, timeout=30):
    """True once the header shows encrypted data while cryptsetup still runs (then the caller kills it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        dump = sh("cryptsetup", "luksDump", "--dump-json-metadata", "--disable-locks", device, check=False)
        if dump.returncode == 0:
            segments = json.loads(dump.stdout)["segments"].values()
            if any(s["type"] == "crypt" and not s.get("flags") and s.get("size") != "dynamic" for s in segments):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return True
        time.sleep(0.02)
    return False


def test_filesystem_gets_the_luks_label_as_kairos_expects(loop_disks, tmp_path):
    disk = loop_disks([("data", 64)])
    device = disk.partitions[0]
    make_ext4(device, "OLDLABEL", size_mib=24)
    files = put_known_files(device, str(tmp_path))
    new_label = unique_label()
    source = key_source.PassphraseKeySource(PASSPHRASE)
    too_long = encryption.EncryptRequest(partitions=(encryption.Selector(device=device, label="A_LABEL_OF_20_BYTES"),),
                                         mode="in_place", options=fast_options())
    with pytest.raises(KcryptError, match="longer than the 16 bytes"):
        encryption.plan(too_long, source)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(device=device, label=new_label),),
                                        mode="in_place", options=fast_options())
    plans = encryption.plan(request, source)
    assert plans[0].relabel and "relabelled OLDLABEL -> %s" % new_label in plans[0].after()["content"]
    encryption.apply(plans, request, source)
    assert luks.read_header(device).label == new_label
    image = os.path.join(str(tmp_path), "relabelled.img")
    decrypt_to_image(device, PASSPHRASE, image, str(tmp_path), length="ext4")
    assert sh("e2label", image).stdout.decode().strip() == new_label
    assert_content(device, files, str(tmp_path))
