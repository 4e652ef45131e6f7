# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``kcrypt`` node CLI as a process: encrypt, NV maintenance, unlock errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, luks
from support.loopdisk import make_ext4, opens_with, unique_label
from support.node_fixtures import loop_disks  # noqa: F401  # pylint: disable=unused-import

FAST = ["--pbkdf-algorithm", "pbkdf2", "--pbkdf-iteration-count", "1000"]


def kcrypt(repo_root, *args, stdin=b""):
    return subprocess.run([sys.executable, os.path.join(repo_root, "bin", "kcrypt")] + list(args),
                          input=stdin, capture_output=True, check=False)


def test_encrypt_check_real_idempotent_and_nv_commands(swtpm, loop_disks, repo_root, tmp_path):
    disk = loop_disks([("persistent", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    common = ["encrypt", "--label", label, "--mode", "in_place", "--tpm-device", swtpm.tcti] + FAST

    checked = kcrypt(repo_root, "--json", *(common + ["--check"]))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["partitions"][0]["action"] == "in_place"
    assert blockdev.probe(disk.partitions[0]).fstype == "ext4"
    empty = kcrypt(repo_root, "checknv", "--tpm-device", swtpm.tcti)
    assert empty.stdout.decode() == "NV index 0x1500000 is empty or does not exist\n"

    done = kcrypt(repo_root, *common)
    assert done.returncode == 0, done.stderr
    line = done.stdout.decode()
    assert line.startswith("%s: in_place label=%s luks_uuid=%s" % (disk.partitions[0], label, luks.uuid_for_label(label)))

    again = kcrypt(repo_root, "--json", *common)
    report = json.loads(again.stdout)
    assert again.returncode == 0 and not report["changed"] and report["partitions"][0]["action"] == "none"

    assert kcrypt(repo_root, "checknv", "--tpm-device", swtpm.tcti).stdout.decode() == "NV index 0x1500000 holds 256 bytes\n"
    read = kcrypt(repo_root, "readnv", "--tpm-device", swtpm.tcti)
    passphrase = read.stdout.rstrip(b"\n")
    assert read.returncode == 0 and len(passphrase) == 32 and opens_with(disk.partitions[0], passphrase)
    assert passphrase not in done.stdout + done.stderr + again.stdout + again.stderr

    refused = kcrypt(repo_root, "cleanupnv", "--tpm-device", swtpm.tcti)  # stdin is no terminal: no prompt
    assert refused.returncode == 1 and b"Error: not confirmed" in refused.stderr
    removed = kcrypt(repo_root, "cleanupnv", "--tpm-device", swtpm.tcti, "--i-know-what-i-am-doing")
    assert removed.stdout.decode() == "NV index 0x1500000 removed\n"
    gone = kcrypt(repo_root, "cleanupnv", "--tpm-device", swtpm.tcti, "--i-know-what-i-am-doing")
    assert gone.returncode == 0 and b"appears to be empty or does not exist" in gone.stdout
    assert kcrypt(repo_root, "readnv", "--tpm-device", swtpm.tcti).returncode == 1


def test_passphrase_on_stdin_recovery_key_and_errors(loop_disks, repo_root):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    result = kcrypt(repo_root, "--json", "encrypt", "--partition", "device=%s,label=%s" % (disk.partitions[0], label),
                    "--mode", "in_place", "--key-source", "passphrase", "--passphrase-file", "-", "--recovery-key", *FAST,
                    stdin=b"from stdin\n")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)["partitions"][0]
    assert opens_with(disk.partitions[0], b"from stdin\n")  # used whole, newline included, as cryptsetup --key-file
    assert opens_with(disk.partitions[0], entry["recovery_key"].encode())

    missing = kcrypt(repo_root, "encrypt", "--label", "KT_NOT_THERE", "--mode", "in_place")
    assert missing.returncode == 1 and missing.stderr.decode() == "Error: no partition has the label KT_NOT_THERE\n"
    wrong = kcrypt(repo_root, "encrypt", "--label", label, "--mode", "in_place", "--key-source", "passphrase",
                   "--passphrase-file", "-", stdin=b"another key")
    assert wrong.returncode == 1 and b"does not open it" in wrong.stderr
    no_selection = kcrypt(repo_root, "encrypt", "--mode", "in_place")
    assert no_selection.returncode == 1 and b"select at least one partition" in no_selection.stderr

    closed = kcrypt(repo_root, "--json", "close", "--label", label)
    assert closed.returncode == 0 and json.loads(closed.stdout)["partitions"][0]["reason"] == "not open"


@pytest.mark.skipif(blockdev._misc_has_device_mapper(), reason="this kernel has device-mapper (the VM tests open for real)")
def test_unlock_without_device_mapper_says_so(loop_disks, repo_root):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    encrypted = kcrypt(repo_root, "encrypt", "--label", label, "--mode", "in_place", "--key-source", "passphrase",
                       "--passphrase-file", "-", *FAST, stdin=b"k")
    assert encrypted.returncode == 0, encrypted.stderr
    for command in (["unlock", "--label", label], ["unlock-all"]):
        result = kcrypt(repo_root, *command, "--key-source", "passphrase", "--passphrase-file", "-", "--attempts", "1", stdin=b"k")
        assert result.returncode == 1
        assert result.stderr.decode().startswith("Error: opening a LUKS partition needs device-mapper")
