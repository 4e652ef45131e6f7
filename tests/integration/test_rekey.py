# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kairos_luks_rekey on real LUKS2 partitions (loop devices), a swtpm and a real challenger.

The module runs as Ansible runs it (a subprocess with an argument file), so its output is
checked for secrets too. Crashes are simulated by running the first steps through
module_utils.node.rekey and then re-running the module.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger as challenger_cli
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server, store_factory as store
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, encryption, key_source, luks, rekey
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob as tpm_blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerThread
from support.loopdisk import make_ext4, opens_with, unique_label
from support.node_fixtures import fast_options, loop_disks, node  # noqa: F401  # pylint: disable=unused-import

pytestmark = pytest.mark.slow(minutes=3)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(ROOT, "plugins", "modules", "kairos_luks_rekey.py")


def run_module(tmp_path, check_mode=False, **args):
    """Run the module as Ansible does; returns (result dict, raw output)."""
    if check_mode:
        args["_ansible_check_mode"] = True
    args_file = tmp_path / ("args-%s.json" % secrets.token_hex(4))
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, ".collections"))
    process = subprocess.run([sys.executable, MODULE, str(args_file)], capture_output=True, text=True, env=env,
                             check=False, timeout=300)
    args_file.unlink()
    output = process.stdout + process.stderr
    return json.loads(process.stdout[process.stdout.index("{"):]), output


def encrypted_partitions(loop_disks, source, count=1, recovery_key=False):
    disk = loop_disks([("part%d" % i, 40) for i in range(count)])
    labels = [unique_label() for index in range(count)]
    for device, label in zip(disk.partitions, labels):
        make_ext4(device, label)
    request = encryption.EncryptRequest(partitions=tuple(encryption.Selector(label=label) for label in labels),
                                        mode="in_place", options=fast_options(), recovery_key=recovery_key)
    results = encryption.apply(encryption.plan(request, source), request, source)
    return disk.partitions, labels, [r.get("recovery_key", "").encode() for r in results]


def key_slots(device):
    return luks.read_header(device).key_slots


def nv_key(tpm):
    with TPM(tpm.tcti) as handle:
        return tpm_blob.read_nv_passphrase(handle)


def assert_no_secret(output, *keys):
    for key in keys:
        assert key.decode() not in output


# -- offline (tpm) ------------------------------------------------------------


def test_tpm_rekey_new_blob_opens_old_does_not(swtpm, loop_disks, tmp_path):
    source = key_source.TpmKeySource(swtpm.tcti)
    devices, labels, recovery = encrypted_partitions(loop_disks, source, count=2, recovery_key=True)
    old = nv_key(swtpm)
    args = dict(partitions=[{"label": label} for label in labels], key_source="tpm", tpm_device=swtpm.tcti, rekey_id="r1")
    slots_before = [key_slots(d) for d in devices]

    result, output = run_module(tmp_path, check_mode=True, **args)
    assert result.get("changed") and result["nv_rewritten"], result
    assert [p["added"] for p in result["partitions"]] == [True, True]
    assert nv_key(swtpm) == old and [key_slots(d) for d in devices] == slots_before

    result, output = run_module(tmp_path, **args)
    assert result.get("changed") and result["nv_rewritten"], result
    new = nv_key(swtpm)
    assert new != old and len(new) == 32
    for device in devices:
        assert opens_with(device, new) and not opens_with(device, old)
    # the recovery slots survive the re-key, and are the only other slots left
    for device, key in zip(devices, recovery):
        assert opens_with(device, key) and len(key_slots(device)) == 2 and luks.read_header(device).recovery_slots
    assert_no_secret(output, old, new, *recovery)

    again, output = run_module(tmp_path, **args)
    assert again.get("changed") is False and not again["nv_rewritten"], again
    assert nv_key(swtpm) == new
    again, output = run_module(tmp_path, check_mode=True, **args)
    assert again.get("changed") is False, again


def test_tpm_rekey_interrupted_after_add_completes(swtpm, loop_disks, tmp_path):
    source = key_source.TpmKeySource(swtpm.tcti)
    devices, labels, dummy = encrypted_partitions(loop_disks, source, count=2)
    old = nv_key(swtpm)
    options = fast_options()
    # a run that added its random key to the first partition only, then died (its key is lost)
    lost = tpm_blob.new_tpm_passphrase()
    device = blockdev.probe(devices[0])
    assert rekey.add(device, old, lost, "test", "r1", options)["added"]
    assert opens_with(devices[0], lost) and opens_with(devices[0], old)

    result, output = run_module(tmp_path, partitions=[{"label": label} for label in labels], key_source="tpm",
                                tpm_device=swtpm.tcti, rekey_id="r1")
    assert result.get("changed") and result["nv_rewritten"], result
    new = nv_key(swtpm)
    assert new not in (old, lost)
    for path in devices:
        assert opens_with(path, new) and not opens_with(path, old) and not opens_with(path, lost)
        assert len(key_slots(path)) == 1


def test_tpm_rekey_interrupted_after_nv_rewrite_completes(swtpm, loop_disks, tmp_path):
    source = key_source.TpmKeySource(swtpm.tcti)
    devices, (label,), dummy = encrypted_partitions(loop_disks, source)
    old = nv_key(swtpm)
    # a run that added its key, rewrote the blob and died before removing the old slot
    new = tpm_blob.new_tpm_passphrase()
    rekey.add(blockdev.probe(devices[0]), old, new, "test", "r1", fast_options())
    with TPM(swtpm.tcti) as handle:
        handle.nv_rewrite(0x1500000, tpm_blob.encrypt_blob(handle, new))
    assert opens_with(devices[0], old) and opens_with(devices[0], new)

    result, output = run_module(tmp_path, partitions=[{"label": label}], key_source="tpm", tpm_device=swtpm.tcti, rekey_id="r1")
    assert result.get("changed") and not result["nv_rewritten"], result  # the blob already held the round's key
    assert result["partitions"][0]["removed_slots"] and not result["partitions"][0]["added"]
    assert nv_key(swtpm) == new and opens_with(devices[0], new) and not opens_with(devices[0], old)


def test_tpm_rekey_refuses_to_strand_an_unlisted_partition(swtpm, loop_disks, tmp_path):
    """One NV key for all partitions: re-keying some of them would lock the others out."""
    source = key_source.TpmKeySource(swtpm.tcti)
    devices, labels, dummy = encrypted_partitions(loop_disks, source, count=2)
    old = nv_key(swtpm)
    refused, output = run_module(tmp_path, partitions=[{"label": labels[0]}], key_source="tpm", tpm_device=swtpm.tcti, rekey_id="r1")
    assert refused.get("failed") and devices[1] in refused["msg"] and "Nothing was changed" in refused["msg"], refused
    assert nv_key(swtpm) == old and key_slots(devices[0]) == [0]


def test_tpm_rekey_partition_encrypted_after_a_finished_round(swtpm, loop_disks, tmp_path):
    """A partition encrypted after round r1 and listed under r1: both partitions get a new key together."""
    source = key_source.TpmKeySource(swtpm.tcti)
    devices, labels, dummy = encrypted_partitions(loop_disks, source)
    first, output = run_module(tmp_path, partitions=[{"label": labels[0]}], key_source="tpm", tpm_device=swtpm.tcti, rekey_id="r1")
    assert first.get("changed"), first
    later, more_labels, dummy = encrypted_partitions(loop_disks, key_source.TpmKeySource(swtpm.tcti))  # with the r1 key
    both, output = run_module(tmp_path, partitions=[{"label": labels[0]}, {"label": more_labels[0]}], key_source="tpm",
                              tpm_device=swtpm.tcti, rekey_id="r1")
    assert both.get("changed") and both["nv_rewritten"], both
    assert [p["added"] for p in both["partitions"]] == [True, True]
    new = nv_key(swtpm)
    for path in devices + later:
        assert opens_with(path, new) and len(key_slots(path)) == 1


# -- explicit passphrases -------------------------------------------------------


def test_passphrase_rekey_old_to_new(loop_disks, tmp_path):
    old, new = b"old passphrase " + secrets.token_hex(4).encode(), b"new passphrase " + secrets.token_hex(4).encode()
    devices, (label,), dummy = encrypted_partitions(loop_disks, key_source.PassphraseKeySource(old))
    args = dict(partitions=[{"device": devices[0]}], key_source="passphrase", passphrase=old.decode(), new_passphrase=new.decode())
    # a wrong old passphrase: clear error, nothing changed
    wrong = dict(args)
    wrong["passphrase"] = "wrong"
    bad, output = run_module(tmp_path, **wrong)
    assert bad.get("failed") and "does not open" in bad["msg"], bad
    assert key_slots(devices[0]) == [0] and not opens_with(devices[0], new)

    result, output = run_module(tmp_path, **args)
    assert result.get("changed") and result["partitions"][0]["added"] and result["partitions"][0]["removed_slots"] == [0]
    assert opens_with(devices[0], new) and not opens_with(devices[0], old)
    assert_no_secret(output, old, new)
    again, output = run_module(tmp_path, **args)
    assert again.get("changed") is False, again


# -- KMS --------------------------------------------------------------------------


@pytest.fixture
def kms(tmp_path):
    url = "sqlite://%s/kms.db" % tmp_path
    opened = store.open_store(url)
    thread = ChallengerThread(server.Challenger(policy.Policy(opened, enrollment="tofu"), ready_check=opened.ping)).start()
    thread.store, thread.store_url = opened, url
    try:
        yield thread
    finally:
        thread.stop()
        opened.close()


def kms_update(kms, tpm_hash, label, passphrase):
    """What the rekey playbook does on the KMS host: the store admin CLI, passphrase on stdin."""
    out, err = io.StringIO(), io.StringIO()
    code = challenger_cli.main(["--store", kms.store_url, "add", "--tpm-hash", tpm_hash, "--partition", "label=" + label,
                                "--passphrase-file", "-", "--update-passphrase"], stdin=io.BytesIO(passphrase), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def served_key(kms, node, device, label):
    source = key_source.build({"key_source": "kms", "challenger_server": kms.url, "tpm_device": node.tcti,
                               "kms_attempts": 2, "kms_retry_delay": 0.05})
    return source.existing_key(blockdev.probe(device), label)


def test_kms_rekey_add_update_finish(node, kms, loop_disks, tmp_path):
    source = key_source.build({"key_source": "kms", "challenger_server": kms.url, "tpm_device": node.tcti,
                               "kms_attempts": 2, "kms_retry_delay": 0.05})
    devices, (label,), (recovery,) = encrypted_partitions(loop_disks, source, recovery_key=True)
    old = served_key(kms, node, devices[0], label)
    common = dict(partitions=[{"label": label}], key_source="kms", challenger_server=kms.url, tpm_device=node.tcti,
                  kms_attempts=2, kms_retry_delay=0.05, rekey_id="r1")
    new = secrets.token_urlsafe(32).encode()

    result, output = run_module(tmp_path, check_mode=True, step="add", new_passphrase=new.decode(), **common)
    assert result.get("changed") and not opens_with(devices[0], new)

    result, output = run_module(tmp_path, step="add", new_passphrase=new.decode(), **common)
    assert result.get("changed") and result["partitions"][0]["added"], result
    assert opens_with(devices[0], new) and opens_with(devices[0], old)
    assert_no_secret(output, old, new)

    # finishing before the KMS serves the new key is refused and removes nothing
    early, output = run_module(tmp_path, step="finish", **common)
    assert early.get("failed") and "does not serve the new key" in early["msg"], early
    assert opens_with(devices[0], old) and opens_with(devices[0], new)

    assert "update" in kms_update(kms, node.tpm_hash, label, new)
    assert served_key(kms, node, devices[0], label) == new

    result, output = run_module(tmp_path, step="finish", **common)
    assert result.get("changed") and result["partitions"][0]["removed_slots"], result
    assert opens_with(devices[0], new) and not opens_with(devices[0], old) and opens_with(devices[0], recovery)
    assert_no_secret(output, old, new, recovery)

    # a re-run of the whole round (the playbook draws a fresh key) changes nothing
    again, output = run_module(tmp_path, step="add", new_passphrase=secrets.token_urlsafe(32), **common)
    assert again.get("changed") is False and not again["partitions"][0]["added"], again
    again, output = run_module(tmp_path, step="finish", **common)
    assert again.get("changed") is False, again
    assert served_key(kms, node, devices[0], label) == new


def test_kms_rekey_crash_before_kms_update_reruns(node, kms, loop_disks, tmp_path):
    source = key_source.build({"key_source": "kms", "challenger_server": kms.url, "tpm_device": node.tcti,
                               "kms_attempts": 2, "kms_retry_delay": 0.05})
    devices, (label,), dummy = encrypted_partitions(loop_disks, source)
    old = served_key(kms, node, devices[0], label)
    common = dict(partitions=[{"label": label}], key_source="kms", challenger_server=kms.url, tpm_device=node.tcti,
                  kms_attempts=2, kms_retry_delay=0.05, rekey_id="r1")
    lost = secrets.token_urlsafe(32).encode()
    run_module(tmp_path, step="add", new_passphrase=lost.decode(), **common)  # ... then the run died
    assert opens_with(devices[0], lost)

    new = secrets.token_urlsafe(32).encode()
    result, output = run_module(tmp_path, step="add", new_passphrase=new.decode(), **common)
    assert result["partitions"][0]["added"] and result["partitions"][0]["removed_slots"], result
    assert not opens_with(devices[0], lost) and opens_with(devices[0], new) and opens_with(devices[0], old)
    kms_update(kms, node.tpm_hash, label, new)
    result, output = run_module(tmp_path, step="finish", **common)
    assert result.get("changed"), result
    assert opens_with(devices[0], new) and not opens_with(devices[0], old) and len(key_slots(devices[0])) == 1


def test_bad_requests_are_refused_before_anything(swtpm, tmp_path):
    result, output = run_module(tmp_path, partitions=[{"label": "X"}], key_source="tpm", tpm_device=swtpm.tcti)
    assert result.get("failed") and "rekey_id" in result["msg"]
    result, output = run_module(tmp_path, partitions=[{"label": "X"}], key_source="kms", challenger_server="http://127.0.0.1:1",
                                rekey_id="r1", new_passphrase="x")
    assert result.get("failed") and "step=add" in result["msg"]
