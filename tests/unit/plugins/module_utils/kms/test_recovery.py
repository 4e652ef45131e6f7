# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kms/recovery.py on a real SQLite store: escrow rules, and reads that are recorded before they happen."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, recovery, store as st, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import (
    RECOVERY_SECRET_KEY,
    SECRET_TYPE_LABEL,
    TPM_HASH_LABEL,
    recovery_secret_name,
    safe_kube_name,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import PolicyRejection

HASH = "a" * 64
OTHER = "b" * 64
EK = "-----BEGIN PUBLIC KEY-----\nEK\n-----END PUBLIC KEY-----\n"
PCRS = {"0": "00" * 32, "7": "77" * 32}
KEY = b"cbdefghi-" * 7 + b"cbdefghi"


@pytest.fixture
def kms_store(tmp_path):
    opened = store_factory.open_store("sqlite://%s/kms.db" % tmp_path)
    opened.create_volume(st.new_volume("node1", HASH, partitions=[{"label": "COS_PERSISTENT"}, {"deviceName": "vdb1"}],
                                       attestation={"ekPublicKey": EK, "pcrValues": {"pcrs": {"0": PCRS["0"], "7": ""}}}))
    opened.create_volume(st.new_volume("node2", OTHER, partitions=[{"label": "DATA"}]))
    yield opened
    opened.close()


def test_escrow_stores_a_labelled_secret_for_the_matching_partition_only(kms_store):
    name = recovery.escrow(kms_store, HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT", device_name="vda5"), KEY)
    assert name == recovery_secret_name("node1", "COS_PERSISTENT") == "node1-cos-persistent-recovery"
    secret = kms_store.get_recovery_secret(name)
    assert secret["data"] == {RECOVERY_SECRET_KEY: KEY}
    labels = secret["metadata"]["labels"]
    assert labels[SECRET_TYPE_LABEL] == "recovery-key" and labels[TPM_HASH_LABEL] == safe_kube_name(HASH)
    assert labels["kcrypt.kairos.io/sealedvolume"] == "node1"
    assert secret["metadata"]["annotations"][recovery.ESCROWED_AT_ANNOTATION].endswith("Z")
    assert kms_store.get_secret(name) is None
    # a partition known by its device name: named by it, whatever label the node sends
    assert recovery.escrow(kms_store, HASH, EK, PCRS, PartitionRef(label="NEW", device_name="vdb1"), KEY) == "node1-vdb1-recovery"
    # nothing is learned: the stored attestation is unchanged
    assert kms_store.get_volume("node1")["spec"]["attestation"]["pcrValues"]["pcrs"]["7"] == ""


@pytest.mark.parametrize("tpm_hash, ek, pcrs, partition, message", [
    ("c" * 64, EK, PCRS, "COS_PERSISTENT", "TPM cccc.* is not registered"),
    (HASH, EK, PCRS, "DATA", "partition label=DATA is not registered for this TPM"),  # node2's label
    (HASH, EK.replace("EK", "XX"), PCRS, "COS_PERSISTENT", "EK public key does not match"),
    (HASH, EK, dict(PCRS, **{"0": "11" * 32}), "COS_PERSISTENT", "PCR0 changed"),
])
def test_escrow_refusals_write_nothing(kms_store, tpm_hash, ek, pcrs, partition, message):
    with pytest.raises(PolicyRejection, match=message):
        recovery.escrow(kms_store, tpm_hash, ek, pcrs, PartitionRef(label=partition), KEY)
    for name in ("node1-cos-persistent-recovery", "node1-data-recovery", "node2-data-recovery"):
        assert kms_store.get_recovery_secret(name) is None


def test_escrow_refused_for_a_quarantined_tpm(kms_store):
    volume = kms_store.get_volume("node1")
    volume["spec"]["quarantined"] = True
    kms_store.update_volume(volume)
    with pytest.raises(PolicyRejection, match="TPM is quarantined"):
        recovery.escrow(kms_store, HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT"), KEY)
    assert kms_store.get_recovery_secret("node1-cos-persistent-recovery") is None


def _in_hours(hours):
    return st.rfc3339(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours))


@pytest.mark.parametrize("window, pcr0, accepted", [
    (None, PCRS["0"], True),
    (None, "11" * 32, False),  # a changed PCR without a window
    ({"relearnUntil": {"0": 1}}, "11" * 32, True),  # inside an open window: any new value
    ({"relearnUntil": {"0": 1}, "relearnTo": {"0": "11" * 32}}, "11" * 32, True),  # the known-good value
    ({"relearnUntil": {"0": 1}, "relearnTo": {"0": "22" * 32}}, "11" * 32, False),  # another value than relearnTo
    ({"relearnUntil": {"0": -1}}, "11" * 32, False),  # an expired window: the old value is enforced
], ids=["unchanged", "changed", "window", "window-to", "window-other", "expired"])
def test_escrow_and_a_passphrase_take_the_same_pcr_policy(tmp_path, window, pcr0, accepted):
    """A weaker path enforces what the strongest does: /recovery-escrow accepts exactly the PCRs /tpm-attestation
    accepts, upgrade windows included; the escrow learns nothing (the window stays for the passphrase)."""
    pcr_values = {"pcrs": {"0": PCRS["0"], "7": PCRS["7"]}}
    for key, by_pcr in (window or {}).items():
        pcr_values[key] = {index: _in_hours(value) if key == "relearnUntil" else value for index, value in by_pcr.items()}
    outcomes = []
    with store_factory.open_store("sqlite://%s/kms.db" % tmp_path) as kms_store:
        kms_store.create_volume(st.new_volume("node1", HASH, partitions=[{"label": "COS_PERSISTENT"}],
                                              attestation={"ekPublicKey": EK, "pcrValues": pcr_values}))
        pcrs = dict(PCRS, **{"0": pcr0})
        for call in (lambda: recovery.escrow(kms_store, HASH, EK, pcrs, PartitionRef(label="COS_PERSISTENT"), KEY),
                     lambda: policy.Policy(kms_store).issue_passphrase(HASH, EK, pcrs, PartitionRef(label="COS_PERSISTENT"))):
            try:
                call()
                outcomes.append(True)
            except PolicyRejection as error:
                assert "PCR verification failed: PCR0 changed" in str(error)
                outcomes.append(False)
            if not outcomes[-1] or len(outcomes) > 1:
                continue
            # after the escrow, before the passphrase: nothing learned, the window is still open
            assert kms_store.get_volume("node1")["spec"]["attestation"]["pcrValues"] == pcr_values
        escrowed = kms_store.get_recovery_secret("node1-cos-persistent-recovery")
    assert outcomes == [accepted, accepted]
    assert (escrowed is not None) == accepted


class FailingAudit:
    """A store whose audit trail cannot be written; records whether a recovery key was read."""

    def __init__(self, store):
        self.store, self.read = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def record_audit_event(self, event):
        raise st.StoreUnavailable("the audit trail is full")

    def get_recovery_secret(self, name):
        self.read.append(name)
        return self.store.get_recovery_secret(name)


def test_reveal_records_each_read_before_it_and_reads_nothing_unrecorded(kms_store):
    recovery.escrow(kms_store, HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT"), KEY)
    failing = FailingAudit(kms_store)
    with pytest.raises(st.StoreUnavailable, match="audit trail"):
        recovery.reveal(failing, HASH, "alice")
    assert failing.read == []

    found = recovery.reveal(kms_store, "node1", "alice (uid 1000) on kms", reason="INC-7")
    assert [(f["partition"], f["escrowed"], f["recovery_key"]) for f in found] == [("COS_PERSISTENT", True, KEY), ("vdb1", False, None)]
    events = kms_store.audit_events()
    assert [(e["action"], e["partition"], e["secret"], e["actor"], e["reason"], e["tpm_hash"]) for e in events] == [
        ("recovery-key-revealed", "COS_PERSISTENT", "node1-cos-persistent-recovery", "alice (uid 1000) on kms", "INC-7", HASH),
        ("recovery-key-revealed", "vdb1", "node1-vdb1-recovery", "alice (uid 1000) on kms", "INC-7", HASH)]

    (only,) = recovery.reveal(kms_store, HASH, "bob", partition="vdb1", show_key=False)
    assert only["partition"] == "vdb1" and kms_store.audit_events()[-1]["action"] == "recovery-key-checked"
    with pytest.raises(KcryptError, match="has no partition NOPE"):
        recovery.reveal(kms_store, HASH, "bob", partition="NOPE")
    with pytest.raises(KcryptError, match="no SealedVolume for TPM"):
        recovery.reveal(kms_store, "c" * 64, "bob")
    with pytest.raises(KcryptError, match="at most 500"):
        recovery.reveal(kms_store, HASH, "bob", reason="x" * 501)
    assert len(kms_store.audit_events()) == 3


def test_local_actor_names_the_user_behind_sudo(monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setattr(recovery.getpass, "getuser", lambda: "root")
    actor = recovery.local_actor("kcrypt-challenger recovery show")
    assert actor.startswith("alice via sudo as root (uid ") and actor.endswith("with kcrypt-challenger recovery show")


def test_audit_events_take_known_fields_only():
    event = st.audit_event(action="x", actor="y")
    assert set(event) == set(st.AUDIT_FIELDS) and event["time"].endswith("Z")
    with pytest.raises(st.InvalidDocument, match="unknown audit field"):
        st.audit_event(action="x", passphrase="nope")
