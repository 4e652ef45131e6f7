# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Online mode on a real kernel against the challenger on the host (reached at 10.0.2.2).

One node lives through: TOFU enrolment + format + write; unlock through the KMS + read;
quarantined → no unlock, and the node says why; PCR 11 extended (TOFU enrolled the
PCRs, so they are enforced) → refused with the PCR named.
"""

from __future__ import annotations

import json
import os

import pytest

from support.challenger import ChallengerProcess
from support.swtpm import free_port_pair

VM_BOOTS = 4  # for the order of the VM suite (tests/vm/conftest.py)

FAST_PBKDF = "--pbkdf-algorithm pbkdf2 --pbkdf-iteration-count 1000"


@pytest.fixture
def challenger(tmp_path):
    """``kcrypt-challenger serve`` on 127.0.0.1 with a SQLite store in tmp_path (the real entry point)."""
    port = free_port_pair()
    store = "sqlite:///%s" % (tmp_path / "kms" / "kms.db")
    os.makedirs(tmp_path / "kms")
    process = ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", store], port,
                                log_path=str(tmp_path / "kms" / "challenger.log"))
    with process:
        process.store = store
        yield process


def test_online_enrol_unlock_quarantine_and_pcr_change(vm_node, persistent_disk, challenger, host_cli):
    node = vm_node(disks=[persistent_disk], forwards=[challenger.port])
    kms = "--key-source kms --challenger-server http://10.0.2.2:%d --kms-attempts 3" % challenger.port

    def admin(*args):
        return host_cli("kcrypt-challenger", *args, "--store", challenger.store)

    def granted():
        """Passphrases the KMS handed out so far (its audit log)."""
        with open(challenger.log_path) as log:
            return sum(1 for line in log if "kcrypt.audit" in line and "outcome=success" in line)

    # 1. First contact: the KMS enrols the TPM (TOFU) and hands out a new passphrase.
    first = node.boot("""set -e
result tpm_hash "$(kcrypt-discovery-challenger)"
kcrypt --json encrypt --mode format --label COS_PERSISTENT --wipe %(pbkdf)s %(kms)s > /tmp/encrypt.json
result encrypt "$(cat /tmp/encrypt.json)"
kcrypt --json unlock --label COS_PERSISTENT %(kms)s > /dev/null
mount /dev/mapper/vda1 /mnt
echo "written after TOFU enrolment" > /mnt/proof.txt
umount /mnt
kcrypt --json close --label COS_PERSISTENT > /dev/null
""" % {"pbkdf": FAST_PBKDF, "kms": kms})
    assert first.ok, first.output
    tpm_hash = first.results["tpm_hash"]
    encrypted = json.loads(first.results["encrypt"])["partitions"]
    assert [(p["device"], p["action"], p["key_source"]) for p in encrypted] == [("/dev/vda1", "format", "kms")]
    volume = json.loads(admin("show", tpm_hash, "-o", "json").stdout)
    assert volume["spec"]["TPMHash"] == tpm_hash
    assert [(p["label"], p["deviceName"]) for p in volume["spec"]["partitions"]] == [("COS_PERSISTENT", "vda1")]
    enrolled_pcrs = volume["spec"]["attestation"]["pcrValues"]["pcrs"]
    assert sorted(enrolled_pcrs, key=int) == ["0", "7", "11"] and all(enrolled_pcrs.values())  # enforced from now on
    granted_after_first = granted()

    # 2. Next boot, configured like a Kairos node (cloud-config in /oem): unlock through the KMS
    #    with kcrypt unlock-all, and with the drop-in discovery client's `get`.
    cloud_config = "#cloud-config\nkcrypt:\n  challenger:\n    challenger_server: http://10.0.2.2:%d\n" % challenger.port
    second = node.boot("""set -e
mkdir -p /oem && cp /job/90_kcrypt.yaml /oem/
kcrypt --json unlock-all --key-source auto --kms-attempts 3 > /tmp/unlock.json
result unlock "$(cat /tmp/unlock.json)"
mount -o ro /dev/mapper/vda1 /mnt
result content "$(cat /mnt/proof.txt)"
umount /mnt
kcrypt --json close --label COS_PERSISTENT > /dev/null
# the passphrase goes straight from the discovery client into cryptsetup, never to the console
kcrypt-discovery-challenger get --partition-label COS_PERSISTENT --partition-name vda1 --attempts 3 \\
  | cryptsetup open --test-passphrase --key-file - /dev/vda1
result discovery_get_opens 0
""", files={"90_kcrypt.yaml": cloud_config})
    assert second.ok, second.output
    opened = json.loads(second.results["unlock"])["partitions"]
    assert [(p["device"], p["action"]) for p in opened] == [("/dev/vda1", "open")]
    assert second.results["content"] == "written after TOFU enrolment"
    assert second.results["discovery_get_opens"] == "0"
    assert granted() == granted_after_first + 2  # both keys came from the KMS (auto chose it from /oem)

    # 3. Quarantined on the KMS: the node does not unlock, and says why.
    admin("quarantine", tpm_hash)
    refused = """
kcrypt --json unlock --label COS_PERSISTENT %(kms)s > /tmp/unlock.out 2> /tmp/unlock.err
result unlock_rc $?
result error "$(tr '\\n' ' ' < /tmp/unlock.err)"
result mapped "$(ls /dev/mapper | grep -v control || true)"
"""
    third = node.boot(refused % {"kms": kms})
    assert third.ok, third.output
    assert third.results["unlock_rc"] == "1"
    assert "TPM is quarantined" in third.results["error"]
    assert third.results["mapped"] == ""

    # 4. Back in service, but PCR 11 changes during boot: refused, naming the PCR.
    admin("unquarantine", tpm_hash)
    fourth = node.boot("""
kcrypt --json unlock --label COS_PERSISTENT --check %(kms)s > /dev/null
result granted_before_extend $?
cd /kcrypt/bin && python3 -c '
import _checkout; _checkout.setup()
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
with TPM("/dev/tpmrm0") as tpm:
    tpm.pcr_extend(11, b"kcrypt-vm-test: a changed boot")
'
""" % {"kms": kms} + refused % {"kms": kms})
    assert fourth.ok, fourth.output
    assert fourth.results["granted_before_extend"] == "0"
    assert fourth.results["unlock_rc"] == "1"
    assert "PCR11 changed" in fourth.results["error"]
    assert "expected %s" % enrolled_pcrs["11"] in fourth.results["error"]
    assert fourth.results["mapped"] == ""
