# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline mode end to end: swtpm + partitioned loop devices + cryptsetup, checked with tpm2-tools alone."""

from __future__ import annotations

import os
import re

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, encryption, key_source, luks
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.loopdisk import luks_json, make_ext4, opens_with, sh, unique_label, write_file
from support.node_fixtures import fast_options, loop_disks, mounter, tpm2_tools  # noqa: F401  # pylint: disable=unused-import


def encrypt_request(*selectors, mode="in_place", **kwargs):
    return encryption.EncryptRequest(partitions=tuple(selectors), mode=mode, options=fast_options(), **kwargs)


def nv_passphrase_by_tpm2_tools(tcti, workdir, nv_index="0x1500000", c_index="0x81000008"):
    """The offline passphrase recovered with tpm2-tools only: NV read + RSA-OAEP-SHA256 decrypt in the TPM."""
    blob = os.path.join(workdir, "blob.bin")
    plain = os.path.join(workdir, "plain.bin")
    tpm2_tools(tcti, "tpm2_nvread", "-C", "o", "-s", "256", nv_index, "-o", blob)
    tpm2_tools(tcti, "tpm2_rsadecrypt", "-c", c_index, "-s", "oaep", "-o", plain, blob)
    with open(plain, "rb") as handle:
        return handle.read()


def nv_defined(tcti, index):
    listing = tpm2_tools(tcti, "tpm2_getcap", "handles-nv-index").stdout.decode()
    return index.lower() in listing.lower()


def unchanged_ext4(device, before):
    after = blockdev.probe(device)
    assert (after.fstype, after.uuid, after.label) == (before.fstype, before.uuid, before.label)


def test_offline_in_place_check_apply_idempotent_and_tpm2_tools_recovery(swtpm, loop_disks, tmp_path):
    disk = loop_disks([("oem", 16), ("persistent", 64)])
    label = unique_label()
    make_ext4(disk.partitions[1], label)
    write_file(disk.partitions[1], "hello.txt", b"kairos", str(tmp_path))
    before = blockdev.probe(disk.partitions[1])
    request = encrypt_request(encryption.Selector(label=label))

    # check mode: the plan, and nothing written anywhere (no NV blob, no TPM key, same filesystem)
    source = key_source.TpmKeySource(swtpm.tcti)
    plans = encryption.plan(request, source)
    assert [(p.action, p.device.path, p.luks_uuid) for p in plans] == [("in_place", disk.partitions[1], luks.uuid_for_label(label))]
    assert plans[0].before()["type"] == "ext4" and plans[0].after()["type"] == "crypto_LUKS (luks2)"
    assert not nv_defined(swtpm.tcti, "0x1500000")
    unchanged_ext4(disk.partitions[1], before)

    results = encryption.apply(plans, request, source)
    assert source.created
    entry = results[0]
    assert entry == {
        "device": disk.partitions[1], "name": before.name, "label": label, "luks_uuid": luks.uuid_for_label(label),
        "partuuid": before.partuuid, "key_source": "tpm", "action": "in_place", "changed": True, "recovery_key_added": False,
    }
    after = blockdev.probe(disk.partitions[1])
    assert (after.fstype, after.label, after.uuid) == ("crypto_LUKS", label, luks.uuid_for_label(label))

    # tpm2-tools alone recover the passphrase, and it opens the partition
    passphrase = nv_passphrase_by_tpm2_tools(swtpm.tcti, str(tmp_path))
    assert re.fullmatch(rb"[0-9a-z]{32}", passphrase)
    assert opens_with(disk.partitions[1], passphrase)
    assert not opens_with(disk.partitions[1], passphrase[:-1])
    assert len(tpm2_tools(swtpm.tcti, "tpm2_nvreadpublic", "0x1500000").stdout) > 0

    # idempotent, with a fresh source as a second run would have
    again = encryption.plan(request, key_source.TpmKeySource(swtpm.tcti))
    assert [(p.action, p.changes) for p in again] == [("none", False)]


def test_blob_written_the_upstream_way_is_read_by_us(swtpm, loop_disks, tmp_path):
    """Key and NV blob made with tpm2-tools + openssl following spec §6.4, as a Kairos node makes them."""
    work = str(tmp_path)
    tpm2_tools(swtpm.tcti, "tpm2_createprimary", "-C", "o", "-G", "rsa2048:null:null", "-g", "sha256",
               "-a", "sign|decrypt|userwithauth|sensitivedataorigin", "-c", os.path.join(work, "primary.ctx"))
    tpm2_tools(swtpm.tcti, "tpm2_evictcontrol", "-C", "o", "-c", os.path.join(work, "primary.ctx"), "0x81000008")
    tpm2_tools(swtpm.tcti, "tpm2_readpublic", "-c", "0x81000008", "-f", "pem", "-o", os.path.join(work, "pub.pem"))
    passphrase = b"k7q2m9x4c1v8b5n3z6a0s2d4f6g8h0j1"
    with open(os.path.join(work, "pass"), "wb") as handle:
        handle.write(passphrase)
    sh("openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", os.path.join(work, "pub.pem"),
       "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256",
       "-in", os.path.join(work, "pass"), "-out", os.path.join(work, "blob"))
    tpm2_tools(swtpm.tcti, "tpm2_nvdefine", "-C", "o", "-s", "256", "-g", "sha1",  # go-tpm legacy NVDefineSpace
               "-a", "ownerwrite|ownerread|authread|ppread", "0x1500000")
    tpm2_tools(swtpm.tcti, "tpm2_nvwrite", "-C", "o", "-i", os.path.join(work, "blob"), "0x1500000")

    source = key_source.TpmKeySource(swtpm.tcti)
    assert source.existing_key() == passphrase

    # a partition a Kairos node encrypted with that passphrase is recognised as done
    disk = loop_disks([("persistent", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    given = key_source.PassphraseKeySource(passphrase)
    request = encrypt_request(encryption.Selector(label=label))
    encryption.apply(encryption.plan(request, given), request, given)
    assert [p.action for p in encryption.plan(request, key_source.TpmKeySource(swtpm.tcti))] == ["none"]


def test_non_default_nv_and_c_index_are_honoured_on_encrypt_and_decrypt(swtpm, loop_disks, tmp_path):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    source = key_source.TpmKeySource(swtpm.tcti, nv_index="0x1500001", c_index="0x81000009")
    request = encrypt_request(encryption.Selector(label=label))
    encryption.apply(encryption.plan(request, source), request, source)
    passphrase = nv_passphrase_by_tpm2_tools(swtpm.tcti, str(tmp_path), nv_index="0x1500001", c_index="0x81000009")
    assert opens_with(disk.partitions[0], passphrase)
    assert not nv_defined(swtpm.tcti, "0x1500000")
    persistent = tpm2_tools(swtpm.tcti, "tpm2_getcap", "handles-persistent").stdout.decode().lower()
    assert "0x81000009" in persistent and "0x81000008" not in persistent


@pytest.mark.skipif(blockdev._misc_has_device_mapper(), reason="this kernel has device-mapper (the VM tests cover format)")
def test_format_refused_clearly_without_device_mapper(swtpm, loop_disks):
    disk = loop_disks([("persistent", 32)])
    source = key_source.TpmKeySource(swtpm.tcti)
    request = encrypt_request(encryption.Selector(label="COS_PERSISTENT"), mode="format")
    with pytest.raises(KcryptError) as caught:
        encryption.plan(request, source, scope=disk.partitions)
    assert "mode=format needs device-mapper" in str(caught.value) and "Nothing was changed" in str(caught.value)
    assert blockdev.probe(disk.partitions[0]).fstype == ""
    assert not nv_defined(swtpm.tcti, "0x1500000")  # the TPM was not touched either


def test_format_never_destroys_a_filesystem_without_wipe(loop_disks):
    disk = loop_disks([("data", 32)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    before = blockdev.probe(disk.partitions[0])
    source = key_source.PassphraseKeySource("a long test passphrase")
    with pytest.raises(KcryptError, match="is not empty: mode=format would destroy it. Set wipe=true"):
        encryption.plan(encrypt_request(encryption.Selector(label=label), mode="format"), source)
    unchanged_ext4(disk.partitions[0], before)


def test_wrong_key_fails_and_never_reformats(swtpm, loop_disks):
    disk = loop_disks([("a", 40), ("b", 40)])
    labels = [unique_label(), unique_label()]
    for device, label in zip(disk.partitions, labels):
        make_ext4(device, label)
    other = key_source.PassphraseKeySource("some other key")
    request_b = encrypt_request(encryption.Selector(label=labels[1]))
    encryption.apply(encryption.plan(request_b, other), request_b, other)
    header_before = luks_json(disk.partitions[1])

    tpm = key_source.TpmKeySource(swtpm.tcti)
    # no NV blob yet: the LUKS partition cannot be ours
    with pytest.raises(luks.WrongKey, match="holds no key yet"):
        encryption.plan(encrypt_request(encryption.Selector(label=labels[1])), tpm)
    # with a blob (made by encrypting partition a), the key simply does not open b
    request_a = encrypt_request(encryption.Selector(label=labels[0]))
    encryption.apply(encryption.plan(request_a, tpm), request_a, tpm)
    for mode in ("in_place", "format"):
        with pytest.raises(luks.WrongKey, match="does not open it"):
            encryption.plan(encrypt_request(encryption.Selector(label=labels[1]), mode=mode, wipe=True), key_source.TpmKeySource(swtpm.tcti))
    assert luks_json(disk.partitions[1]) == header_before
    assert opens_with(disk.partitions[1], b"some other key")


def test_missing_partition_in_use_too_small_and_unshrinkable_change_nothing(swtpm, loop_disks, mounter, tmp_path):
    disk = loop_disks([("small", 36), ("full", 40), ("busy", 40), ("swap", 40)])
    small, full, busy, swap = disk.partitions
    source = key_source.TpmKeySource(swtpm.tcti)

    with pytest.raises(blockdev.PartitionNotFound, match="no partition has the label KT_NOPE"):
        encryption.plan(encrypt_request(encryption.Selector(label="KT_NOPE")), source, scope=disk.partitions)

    make_ext4(small, unique_label())
    small_before = blockdev.probe(small)
    with pytest.raises(KcryptError, match="too small to encrypt in place"):
        encryption.plan(encrypt_request(encryption.Selector(device=small)), source)
    unchanged_ext4(small, small_before)

    make_ext4(full, unique_label())
    write_file(full, "big.bin", os.urandom(20 * 1024 * 1024), str(tmp_path))  # leaves < 8 MiB to shrink to
    full_before = blockdev.probe(full)
    with pytest.raises(KcryptError, match="too small to encrypt in place: the filesystem needs at least"):
        encryption.plan(encrypt_request(encryption.Selector(device=full)), source)
    unchanged_ext4(full, full_before)

    make_ext4(busy, unique_label())
    target = mounter(busy)
    with pytest.raises(KcryptError, match="is mounted on %s; unmount or close it" % target):
        encryption.plan(encrypt_request(encryption.Selector(device=busy)), source)
    assert blockdev.probe(busy).fstype == "ext4"

    sh("mkswap", swap)
    with pytest.raises(KcryptError, match="only ext2/ext3/ext4 can be shrunk offline, not swap"):
        encryption.plan(encrypt_request(encryption.Selector(device=swap)), source)
    with pytest.raises(KcryptError, match="holds no filesystem to keep"):
        sh("wipefs", "-a", swap)
        encryption.plan(encrypt_request(encryption.Selector(device=swap)), source)
    assert not nv_defined(swtpm.tcti, "0x1500000")


def test_all_partitions_are_checked_before_any_changes(swtpm, loop_disks):
    disk = loop_disks([("a", 48), ("b", 36)])
    good, small = disk.partitions
    make_ext4(good, unique_label())
    make_ext4(small, unique_label())
    good_before = blockdev.probe(good)
    source = key_source.TpmKeySource(swtpm.tcti)
    request = encrypt_request(encryption.Selector(device=good), encryption.Selector(device=small))
    with pytest.raises(KcryptError, match="too small"):
        encryption.plan(request, source)
    unchanged_ext4(good, good_before)
    with pytest.raises(KcryptError, match="select the same partition"):
        encryption.plan(encrypt_request(encryption.Selector(device=good), encryption.Selector(uuid=good_before.uuid)), source)


def test_recovery_key_added_once_in_its_own_slot(swtpm, loop_disks):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    source = key_source.TpmKeySource(swtpm.tcti)
    request = encrypt_request(encryption.Selector(label=label), recovery_key=True)
    result = encryption.apply(encryption.plan(request, source), request, source)[0]
    recovery = result["recovery_key"].encode()
    assert result["recovery_key_added"] and recovery not in source.secrets
    assert opens_with(disk.partitions[0], recovery)
    header = luks.read_header(disk.partitions[0])
    assert header.key_slots == [0, 1] and header.recovery_slots == [1]
    # the TPM key stays in slot 0, which is the only slot Kairos' own unlock tries (spec §6.3)
    assert luks.test_passphrase(disk.partitions[0], source.existing_key(), keyslot=0)
    again = encryption.plan(request, key_source.TpmKeySource(swtpm.tcti))
    assert [(p.action, p.add_recovery_key, p.changes) for p in again] == [("none", False, False)]


def test_recovery_key_added_to_an_already_encrypted_partition(loop_disks):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    source = key_source.PassphraseKeySource("existing passphrase")
    plain = encrypt_request(encryption.Selector(label=label))
    encryption.apply(encryption.plan(plain, source), plain, source)
    with_recovery = encrypt_request(encryption.Selector(label=label), recovery_key=True)
    plans = encryption.plan(with_recovery, source)
    assert [(p.action, p.add_recovery_key, p.changes) for p in plans] == [("none", True, True)]
    assert plans[0].after()["recovery key"] == "added in a new key slot"
    result = encryption.apply(plans, with_recovery, source)[0]
    recovery = result["recovery_key"].encode()
    assert result["changed"] and opens_with(disk.partitions[0], recovery)
    # key slots can be removed again (authorised by the other key): the recovery key stops working
    luks.kill_slot(disk.partitions[0], luks.read_header(disk.partitions[0]).recovery_slots[0], b"existing passphrase")
    assert not opens_with(disk.partitions[0], recovery) and opens_with(disk.partitions[0], b"existing passphrase")


def test_tpm_is_checked_before_changes(loop_disks):
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    before = blockdev.probe(disk.partitions[0])
    source = key_source.TpmKeySource("swtpm:host=127.0.0.1,port=9")  # nothing listens there
    with pytest.raises(KcryptError, match="TPM"):
        encryption.plan(encrypt_request(encryption.Selector(label=label)), source)
    unchanged_ext4(disk.partitions[0], before)
    with pytest.raises(KcryptError):
        with TPM("swtpm:host=127.0.0.1,port=9"):
            pass


def test_generated_keys_get_upstreams_pbkdf_by_default(swtpm, loop_disks):
    """No pbkdf options: the TPM key gets upstream's --iter-time 5 (argon2id at its floor), not cryptsetup's 2 s."""
    disk = loop_disks([("data", 48)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    source = key_source.TpmKeySource(swtpm.tcti)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place")
    encryption.apply(encryption.plan(request, source), request, source)
    kdf = luks.read_header(disk.partitions[0]).keyslots["0"]["kdf"]
    assert kdf["type"] == "argon2id"
    assert kdf["time"] == 4 and kdf["memory"] <= 65536  # cryptsetup's floor, what --iter-time 5 yields


def test_verify_fetches_the_key_again_and_fails_when_it_does_not_open(swtpm, loop_disks):
    """encryption.verify (kairos_luks_encrypt verify=true) tests a key from a new source against every partition."""
    disk = loop_disks([("a", 40), ("b", 40)])
    labels = [unique_label(), unique_label()]
    for device, label in zip(disk.partitions, labels):
        make_ext4(device, label)
    request = encrypt_request(encryption.Selector(label=labels[0]))
    source = key_source.TpmKeySource(swtpm.tcti)
    encryption.apply(encryption.plan(request, source), request, source)

    encryption.verify(request, key_source.TpmKeySource(swtpm.tcti))  # the NV blob read again opens it
    with pytest.raises(luks.WrongKey, match="does not open it"):
        encryption.verify(request, key_source.PassphraseKeySource("not the key"))
    # a partition still to encrypt is reported, and left as it is
    both = encrypt_request(encryption.Selector(label=labels[0]), encryption.Selector(label=labels[1]))
    with pytest.raises(KcryptError, match="%s would still be changed" % re.escape(disk.partitions[1])):
        encryption.verify(both, key_source.TpmKeySource(swtpm.tcti))
    assert blockdev.probe(disk.partitions[1]).fstype == "ext4"
