# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Policy: upstream's golden vectors and unit cases (spec §3.3, §3.4, §8.1 items 1-5), on a real SQLite store."""

from __future__ import annotations

import base64
import hashlib
import threading

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_names, policy as pol, volume_attestation
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as own
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore

HASH = "5640e37f" + "1" * 56
OTHER = "5640e37f" + "2" * 56  # same 8-hex prefix: upstream's TOFU names collide
EK = "-----BEGIN PUBLIC KEY-----\nEKEKEK\n-----END PUBLIC KEY-----\n"
EK2 = "-----BEGIN PUBLIC KEY-----\nOTHER\n-----END PUBLIC KEY-----\n"
PCRS = {"0": "00" * 32, "7": "07" * 32, "11": "0b" * 32}
PERSISTENT = PartitionRef(label="COS_PERSISTENT", device_name="vda5", uuid="uuid-5")
OEM = PartitionRef(label="COS_OEM", device_name="vda2")


@pytest.fixture
def store(tmp_path):
    opened = SQLiteStore(str(tmp_path / "kms.db"))
    yield opened
    opened.close()


@pytest.fixture
def policy(store):
    return pol.Policy(store)


def register(store, name="node", tpm_hash=HASH, partitions=({"label": "COS_PERSISTENT"},), **kwargs):
    return store.create_volume(st.new_volume(name, tpm_hash, list(partitions), **kwargs))


def static_secret(store, name, value=b"static-pass", path="passphrase"):
    store.create_secret(st.new_secret(name, {path: value}))


# -- names (spec §3.3 golden vectors, checklist 24/25) ----------------------

@pytest.mark.parametrize("name, expected", [
    ("tofu-5640e37f-COS_PERSISTENT", "tofu-5640e37f-cos-persistent"),
    ("tofu-5640e37f-", "tofu-5640e37f"),
    ("my.key", "my-key"),
    ("___", "kube-bda25155"),
    ("MyVolume", "MyVolume"),
    ("passphrase", "passphrase"),
    ("", "kube-e3b0c442"),
])
def test_safe_kube_name_golden_vectors(name, expected):
    assert kube_names.safe_kube_name(name) == expected


def test_safe_kube_name_long_names_get_a_checksum():
    tpm_hash = "5640e37f" + "ab" * 28
    label = kube_names.safe_kube_name(tpm_hash)  # the tpm-hash label of TOFU Secrets
    assert len(tpm_hash) == 64 and len(label) == 63
    assert label == tpm_hash[:54] + "-" + hashlib.sha256(tpm_hash.encode()).hexdigest()[:8]
    # a '-' at the cut is dropped once before the checksum
    name = "a" * 53 + "-" + "b" * 20
    assert kube_names.safe_kube_name(name) == "a" * 53 + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    # multi-byte characters count as bytes and become one '-'
    assert kube_names.safe_kube_name("n\u00e9") == "n"
    assert kube_names.safe_kube_name("x" * 63) == "x" * 63
    assert len(kube_names.safe_kube_name("x" * 64)) == 63


def test_clean_kube_name_legacy():
    assert kube_names.clean_kube_name("Node_1-COS_PERSISTENT") == "node-1-cos-persistent"
    assert kube_names.clean_kube_name("my.key") == "my.key"  # legacy keeps dots


def test_secret_ref_defaults_and_explicit():
    assert kube_names.secret_ref("tofu-5640e37f", {"label": "COS_PERSISTENT"}) == ("tofu-5640e37f-cos-persistent", "passphrase")
    assert kube_names.secret_ref("v", {"label": "L", "secret": {"name": "mysecret", "path": "my.key"}}) == ("mysecret", "my-key")
    assert kube_names.secret_ref("V_1", {"label": "A_B", "secret": {"path": "my_key"}}, namer=kube_names.clean_kube_name) == ("v-1-a-b", "my-key")


# -- findPartitionInVolume / findVolumeFor (§8.1 item 1) --------------------

@pytest.mark.parametrize("spec_partition, request_ref, matches", [
    ({"label": "COS_PERSISTENT", "deviceName": "x", "uuid": "x"}, PartitionRef("COS_PERSISTENT", "/dev/sda1", "sda1_uuid"), True),
    ({"label": "x", "deviceName": "/dev/sda1", "uuid": "x"}, PartitionRef("COS_PERSISTENT", "/dev/sda1", "sda1_uuid"), True),
    ({"label": "x", "deviceName": "x", "uuid": "sda1_uuid"}, PartitionRef("COS_PERSISTENT", "/dev/sda1", "sda1_uuid"), True),
    ({"label": "x", "deviceName": "x", "uuid": "x"}, PartitionRef("COS_PERSISTENT", "/dev/sda1", "sda1_uuid"), False),
    ({"label": "", "deviceName": "x", "uuid": "x"}, PartitionRef("", "/dev/sda1", "sda1_uuid"), False),  # empty never matches empty
    ({}, PartitionRef(), False),
])
def test_find_partition(spec_partition, request_ref, matches):
    volume = st.new_volume("v", HASH, [{"label": "first-no-match"}, spec_partition])
    assert pol.find_partition(volume, request_ref) == (1 if matches else None)


# -- verifyPCRValuesSelective (§8.1 item 2) ----------------------------------

def test_verify_pcrs_selective():
    volume_attestation.verify_pcrs({"pcrs": {"0": "", "7": ""}}, {"0": "aa", "7": "bb"})  # all empty: accept
    volume_attestation.verify_pcrs({"pcrs": {"0": "aa", "7": "bb"}}, {"0": "aa", "7": "bb", "11": "cc"})  # set + matching
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR7 changed - boot state verification failed: expected bb, got xx"):
        volume_attestation.verify_pcrs({"pcrs": {"0": "aa", "7": "bb"}}, {"0": "aa", "7": "xx"})
    volume_attestation.verify_pcrs({"pcrs": {"0": "aa"}}, {"0": "aa", "7": "anything"})  # omitted PCR ignored
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR14 mismatch: expected ee, but not provided in current values"):
        volume_attestation.verify_pcrs({"pcrs": {"0": "", "7": "bb", "14": "ee"}}, {"0": "zz", "7": "bb"})  # mixed
    volume_attestation.verify_pcrs(None, {"0": "aa"})  # nil stored
    volume_attestation.verify_pcrs({}, {"0": "aa"})  # pcrValues without pcrs
    volume_attestation.verify_pcrs(None, None)
    with pytest.raises(volume_attestation.PolicyRejection, match="no current PCR values provided but PCR0 is required"):
        volume_attestation.verify_pcrs({"pcrs": {"0": "aa"}}, None)
    volume_attestation.verify_pcrs({"pcrs": {"0": ""}}, None)


# -- re-enrolment and updateAttestationDataSelective (§8.1 items 3, 4) -------

def test_learning_fills_only_empty_stored_values():
    attestation = {"ekPublicKey": "", "pcrValues": {"pcrs": {"0": "", "7": "77", "11": ""}}}
    assert volume_attestation.learn_attestation(attestation, EK, {"0": "a0", "7": "b7", "11": "cb", "14": "ee"}, now="T") is True
    assert attestation == {"ekPublicKey": EK, "pcrValues": {"pcrs": {"0": "a0", "7": "77", "11": "cb"}}, "lastVerifiedAt": "T"}
    # learned values are enforced from now on
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR0 changed"):
        volume_attestation.verify_pcrs(attestation["pcrValues"], {"0": "ff", "7": "77", "11": "cb"})
    # a set EK is not replaced; nothing to learn -> False, no timestamp
    again = {"ekPublicKey": EK, "pcrValues": {"pcrs": {"0": "a0"}}}
    assert volume_attestation.learn_attestation(again, EK2, {"0": "a0"}) is False
    assert again == {"ekPublicKey": EK, "pcrValues": {"pcrs": {"0": "a0"}}}
    # deferred (empty) current values are never stored
    deferred = {"ekPublicKey": EK, "pcrValues": {"pcrs": {"0": ""}}}
    assert volume_attestation.learn_attestation(deferred, EK, {"0": ""}) is False


def test_initial_tofu_attestation_stores_all_pcrs():
    attestation = volume_attestation.initial_attestation(EK, {"0": "a", "7": "b", "11": "c", "12": "d", "14": "e"}, now="T")
    assert attestation == {"ekPublicKey": EK, "enrolledAt": "T", "lastVerifiedAt": "T",
                           "pcrValues": {"pcrs": {"0": "a", "7": "b", "11": "c", "12": "d", "14": "e"}}}


# -- IssuePassphrase flows -----------------------------------------------------

def test_tofu_enrolment_names_labels_and_reuse(policy, store):
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert len(passphrase) == 44 and len(base64.b64decode(passphrase)) == 32
    volume = store.get_volume("tofu-5640e37f")
    assert volume["spec"]["TPMHash"] == HASH
    assert volume["spec"]["partitions"] == [{"label": "COS_PERSISTENT", "deviceName": "vda5", "uuid": "uuid-5",
                                             "secret": {"name": "tofu-5640e37f-cos-persistent", "path": "passphrase"}}]
    assert "quarantined" not in volume["spec"]
    attestation = volume["spec"]["attestation"]
    assert attestation["ekPublicKey"] == EK and attestation["pcrValues"] == {"pcrs": PCRS}
    assert attestation["enrolledAt"] == attestation["lastVerifiedAt"]
    secret = store.get_secret("tofu-5640e37f-cos-persistent")
    assert secret["data"] == {"passphrase": passphrase}
    assert secret["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kcrypt-challenger", "app.kubernetes.io/component": "encryption-secret",
        "kcrypt.kairos.io/tpm-hash": kube_names.safe_kube_name(HASH), "kcrypt.kairos.io/partition": "COS_PERSISTENT",
        "kcrypt.kairos.io/managed-by": "kcrypt-challenger",
        "kcrypt.kairos.io/sealedvolume": "tofu-5640e37f"}  # ours: whose Secret it is, without a scan
    # next boot: same passphrase, no write at all
    version = volume["metadata"]["resourceVersion"]
    assert policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT")) == passphrase
    assert store.get_volume("tofu-5640e37f")["metadata"]["resourceVersion"] == version


def test_tofu_reuses_an_existing_secret(policy, store):
    static_secret(store, "tofu-5640e37f-cos-persistent", b"kept-from-before")
    assert policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT) == b"kept-from-before"
    assert store.get_secret("tofu-5640e37f-cos-persistent")["data"]["passphrase"] == b"kept-from-before"


def test_tofu_reuse_requires_data(policy, store):
    static_secret(store, "tofu-5640e37f-cos-persistent", b"x", path="other")
    with pytest.raises(volume_attestation.PolicyRejection, match="initial enrollment: creating TOFU secret: existing secret does not "
                       "contain expected passphrase data at path passphrase"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert store.list_volumes() == []


def test_new_partition_is_appended_with_its_own_secret(policy, store):
    first = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    second = policy.issue_passphrase(HASH, EK, PCRS, OEM)
    assert first != second
    partitions = store.get_volume("tofu-5640e37f")["spec"]["partitions"]
    assert [p["label"] for p in partitions] == ["COS_PERSISTENT", "COS_OEM"]
    assert partitions[1]["secret"] == {"name": "tofu-5640e37f-cos-oem", "path": "passphrase"}
    assert policy.issue_passphrase(HASH, EK, PCRS, OEM) == second


def test_new_partition_still_verifies_attestation(policy, store):
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    with pytest.raises(volume_attestation.PolicyRejection, match="^attestation verification failed: PCR verification failed: PCR0 changed"):
        policy.issue_passphrase(HASH, EK, dict(PCRS, **{"0": "ff" * 32}), OEM)
    assert len(store.get_volume("tofu-5640e37f")["spec"]["partitions"]) == 1


def test_static_passphrase_with_explicit_secret(policy, store):
    register(store, partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "mysecret", "path": "pass"}}])
    static_secret(store, "mysecret", b"the static one", path="pass")
    assert policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT) == b"the static one"
    attestation = store.get_volume("node")["spec"]["attestation"]  # nil attestation: learn everything
    assert attestation["ekPublicKey"] == EK and attestation["pcrValues"] == {"pcrs": PCRS}
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR11 changed"):
        policy.issue_passphrase(HASH, EK, dict(PCRS, **{"11": "00" * 32}), PERSISTENT)


def test_explicit_secret_that_is_missing_is_not_generated(policy, store):
    register(store, partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "mysecret", "path": "pass"}}])
    with pytest.raises(volume_attestation.PolicyRejection, match='retrieving secret: secrets "mysecret" not found'):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert store.get_secret("mysecret") is None


def test_missing_key_in_secret(policy, store):
    register(store, partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "mysecret", "path": "my.key"}}])
    static_secret(store, "mysecret", b"v", path="my.key")  # SafeKubeName mangles the key to my-key (upstream)
    with pytest.raises(volume_attestation.PolicyRejection, match="passphrase not found in secret at key: my-key"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)


def test_deferred_tofu_for_pre_registered_volume(policy, store):
    register(store, name="node")
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT"))
    volume = store.get_volume("node")
    assert volume["spec"]["partitions"][0]["secret"] == {"name": "node-cos-persistent", "path": "passphrase"}
    assert store.get_secret("node-cos-persistent")["data"]["passphrase"] == passphrase
    assert volume["spec"]["attestation"]["pcrValues"] == {"pcrs": PCRS}


def test_pre_registered_with_attestation_but_no_secret_gets_one(policy, store):
    register(store, name="node", attestation={})
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    volume = store.get_volume("node")
    assert store.get_secret("node-cos-persistent")["data"]["passphrase"] == passphrase
    assert volume["spec"]["attestation"]["ekPublicKey"] == EK and "pcrValues" not in volume["spec"]["attestation"]


def test_quarantine_rejects_every_partition(policy, store):
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    volume = store.get_volume("tofu-5640e37f")
    volume["spec"]["quarantined"] = True
    store.update_volume(volume)
    for partition in (PERSISTENT, OEM):
        with pytest.raises(volume_attestation.PolicyRejection, match="^TPM is quarantined$"):
            policy.issue_passphrase(HASH, EK, PCRS, partition)
    assert len(store.get_volume("tofu-5640e37f")["spec"]["partitions"]) == 1


def test_empty_attestation_learns_ek_and_ignores_pcrs(policy, store):
    register(store, attestation={}, partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "s"}}])
    static_secret(store, "s")
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    attestation = store.get_volume("node")["spec"]["attestation"]
    assert attestation["ekPublicKey"] == EK and "pcrValues" not in attestation
    assert policy.issue_passphrase(HASH, EK, {"0": "99" * 32}, PERSISTENT) == b"static-pass"
    with pytest.raises(volume_attestation.PolicyRejection, match="^attestation verification failed: EK verification failed: EK public "
                       "key does not match enrolled key - potential TPM impersonation$"):
        policy.issue_passphrase(HASH, EK2, PCRS, PERSISTENT)


def test_selective_pcrs_learn_then_enforce(policy, store):
    register(store, attestation={"ekPublicKey": "", "pcrValues": {"pcrs": {"0": "", "7": ""}}},
             partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "s"}}])
    static_secret(store, "s")
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    attestation = store.get_volume("node")["spec"]["attestation"]
    assert attestation["pcrValues"] == {"pcrs": {"0": PCRS["0"], "7": PCRS["7"]}}  # no PCR11 added
    assert attestation["ekPublicKey"] == EK and attestation["lastVerifiedAt"]
    policy.issue_passphrase(HASH, EK, dict(PCRS, **{"11": "ff" * 32}), PERSISTENT)  # PCR11 never checked
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR7 changed - boot state verification failed: expected %s, got %s"
                       % (PCRS["7"], "ff" * 32)):
        policy.issue_passphrase(HASH, EK, dict(PCRS, **{"7": "ff" * 32}), PERSISTENT)


def test_relearning_a_cleared_pcr(policy, store):
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    volume = store.get_volume("tofu-5640e37f")
    volume["spec"]["attestation"]["pcrValues"]["pcrs"]["0"] = ""
    store.update_volume(volume)
    new_pcrs = dict(PCRS, **{"0": "aa" * 32})
    policy.issue_passphrase(HASH, EK, new_pcrs, PERSISTENT)
    assert store.get_volume("tofu-5640e37f")["spec"]["attestation"]["pcrValues"]["pcrs"]["0"] == "aa" * 32
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR0 changed"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)


def test_wrong_stored_ek_rejected_then_relearned(policy, store):
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    volume = store.get_volume("tofu-5640e37f")
    volume["spec"]["attestation"]["ekPublicKey"] = "wrong-ek-value"
    store.update_volume(volume)
    with pytest.raises(volume_attestation.PolicyRejection, match="EK verification failed"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    volume = store.get_volume("tofu-5640e37f")
    volume["spec"]["attestation"]["ekPublicKey"] = ""
    store.update_volume(volume)
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert store.get_volume("tofu-5640e37f")["spec"]["attestation"]["ekPublicKey"] == EK


def test_livecd_deferral_and_anti_downgrade(policy, store):
    first = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT, defer_pcr_enrollment=True)
    pcrs = store.get_volume("tofu-5640e37f")["spec"]["attestation"]["pcrValues"]["pcrs"]
    assert pcrs == {"0": "", "7": "", "11": ""}
    # still in the LiveCD (all stored empty): deferral is kept
    policy.issue_passphrase(HASH, EK, dict(PCRS, **{"0": "11" * 32}), PERSISTENT, defer_pcr_enrollment=True)
    assert store.get_volume("tofu-5640e37f")["spec"]["attestation"]["pcrValues"]["pcrs"]["0"] == ""
    # first real boot learns
    assert policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT) == first
    assert store.get_volume("tofu-5640e37f")["spec"]["attestation"]["pcrValues"]["pcrs"] == PCRS
    # a later "LiveCD" claim cannot downgrade enforcement
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR0 changed"):
        policy.issue_passphrase(HASH, EK, dict(PCRS, **{"0": "11" * 32}), PERSISTENT, defer_pcr_enrollment=True)


def test_livecd_deferral_on_pre_registered_volume_without_attestation(policy, store):
    register(store)  # deviation: upstream would store (and then enforce) the LiveCD's PCRs here
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT, defer_pcr_enrollment=True)
    assert store.get_volume("node")["spec"]["attestation"]["pcrValues"]["pcrs"] == {"0": "", "7": "", "11": ""}


def test_registered_only(store):
    policy = pol.Policy(store, enrollment=pol.ENROLLMENT_REGISTERED_ONLY)
    with pytest.raises(volume_attestation.PolicyRejection, match="is not registered and enrollment is registered-only"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert store.list_volumes() == [] and store.get_secret("tofu-5640e37f-cos-persistent") is None
    register(store)
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)  # registered, no Secret: generated
    assert store.get_secret("node-cos-persistent")["data"]["passphrase"] == passphrase
    with pytest.raises(volume_attestation.PolicyRejection, match="partition label=COS_OEM, name=vda2 is not registered"):
        policy.issue_passphrase(HASH, EK, PCRS, OEM)
    assert len(store.get_volume("node")["spec"]["partitions"]) == 1
    with pytest.raises(Exception, match="enrollment must be one of"):
        pol.Policy(store, enrollment="yes")


def test_tofu_name_collision_uses_a_longer_name(policy, store):
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    other = policy.issue_passphrase(OTHER, EK2, PCRS, PERSISTENT)
    volume = store.find_volume(OTHER)
    assert st.volume_name(volume) == "tofu-" + OTHER[:16]
    assert volume["spec"]["partitions"][0]["secret"]["name"] == "tofu-%s-cos-persistent" % OTHER[:16]
    assert store.get_secret("tofu-%s-cos-persistent" % OTHER[:16])["data"]["passphrase"] == other
    assert st.volume_name(store.find_volume(HASH)) == "tofu-5640e37f"
    assert policy.issue_passphrase(OTHER, EK2, PCRS, PERSISTENT) == other


def test_a_secret_of_another_tpm_is_never_reused(policy, store):
    # another TPM's orphaned TOFU Secret sits on the name this TPM would use
    store.create_secret(st.new_secret("tofu-5640e37f-cos-persistent", {"passphrase": b"not yours"},
                                      labels=kube_names.secret_labels(OTHER, "COS_PERSISTENT")))
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert passphrase != b"not yours"
    name = store.get_volume("tofu-5640e37f")["spec"]["partitions"][0]["secret"]["name"]
    assert name == "tofu-5640e37f-cos-persistent-" + HASH[:8]
    assert store.get_secret(name)["data"]["passphrase"] == passphrase


def test_upper_case_labels_give_valid_secret_names(policy, store):
    # upstream's SafeKubeName keeps "tofu-5640e37f-DATA", which Kubernetes refuses
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(label="DATA"))
    assert store.get_secret("tofu-5640e37f-data")["data"]["passphrase"] == passphrase
    assert kube_names.secret_ref("node", {"label": "DATA", "secret": {"path": "MyKey"}}) == ("node-data", "MyKey")
    assert kube_names.label_value("my label/x") == "my-label-x" and kube_names.label_value("COS_PERSISTENT") == "COS_PERSISTENT"
    assert kube_names.label_value("_x_") == "x"


def test_label_less_partitions_get_distinct_secrets(policy, store):
    first = policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(device_name="vdb1"))
    second = policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(device_name="vdb2"))
    assert first != second
    names = [p["secret"]["name"] for p in store.get_volume("tofu-5640e37f")["spec"]["partitions"]]
    assert names == ["tofu-5640e37f-vdb1", "tofu-5640e37f-vdb2"]


class RacingStore(object):
    """Wraps a store; before the first update_volume, lets a rival write the volume (stale resourceVersion)."""

    def __init__(self, inner, rival):
        self.inner, self.rival, self.raced = inner, rival, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update_volume(self, doc):
        if not self.raced:
            self.raced += 1
            self.rival()
        return self.inner.update_volume(doc)


def test_update_conflict_is_retried_on_fresh_data(store):
    policy = pol.Policy(store)
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)

    def rival():  # an administrator adds a partition meanwhile
        volume = store.get_volume("tofu-5640e37f")
        volume["spec"]["partitions"].append({"label": "ADMIN", "secret": {"name": "admin"}})
        store.update_volume(volume)

    racing = pol.Policy(RacingStore(store, rival))
    racing.issue_passphrase(HASH, EK, PCRS, OEM)
    labels = [p["label"] for p in store.get_volume("tofu-5640e37f")["spec"]["partitions"]]
    assert labels == ["COS_PERSISTENT", "ADMIN", "COS_OEM"]  # neither write was lost


def test_update_conflict_rechecks_quarantine(store):
    policy = pol.Policy(store)
    policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)

    def rival():
        volume = store.get_volume("tofu-5640e37f")
        volume["spec"]["quarantined"] = True
        store.update_volume(volume)

    with pytest.raises(volume_attestation.PolicyRejection, match="TPM is quarantined"):
        pol.Policy(RacingStore(store, rival)).issue_passphrase(HASH, EK, PCRS, OEM)


def test_concurrent_first_contacts_make_one_volume_and_one_secret(tmp_path):
    path = str(tmp_path / "kms.db")
    SQLiteStore(path).close()
    results, errors = [], []
    barrier = threading.Barrier(12)

    def contact():
        opened = SQLiteStore(path)
        try:
            barrier.wait()
            results.append(pol.Policy(opened).issue_passphrase(HASH, EK, PCRS, PERSISTENT))
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            opened.close()

    threads = [threading.Thread(target=contact) for _index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 12
    check = SQLiteStore(path)
    try:
        assert [st.volume_name(v) for v in check.list_volumes()] == ["tofu-5640e37f"]
        rows = check._read("SELECT name FROM secrets")
        assert rows == [("tofu-5640e37f-cos-persistent",)]
    finally:
        check.close()


# -- legacy protocol (spec §2.B, checklist 20/21) ----------------------------

def test_legacy_get_and_post(policy, store):
    ref = PartitionRef(label="COS_PERSISTENT")
    assert policy.legacy_get_pass(HASH, ref) == {
        "passphrase": "", "generated_by": "",
        "error": "no volume found with data from request and hash: %s" % HASH}
    with pytest.raises(volume_attestation.PolicyRejection, match="^no TPM Hash found for %s$" % HASH):
        policy.legacy_post_pass(HASH, ref, {"passphrase": "x", "error": "", "generated_by": "tpm"})
    register(store, name="node")  # legacy names go through cleanKubeName: node-cos-persistent
    assert policy.legacy_get_pass(HASH, ref)["error"] == "No secret found for %s and COS_PERSISTENT" % HASH
    with pytest.raises(volume_attestation.PolicyRejection, match="doesn't contain any passphrase"):
        policy.legacy_post_pass(HASH, ref, {"passphrase": "", "error": "", "generated_by": "tpm"})
    assert policy.legacy_post_pass(HASH, ref, {"passphrase": "Y2lwaGVy", "error": "", "generated_by": "tpm"}) is True
    assert store.get_secret("node-cos-persistent")["data"] == {"passphrase": b"Y2lwaGVy", "generated_by": b"tpm"}
    assert policy.legacy_get_pass(HASH, ref) == {"passphrase": "Y2lwaGVy", "error": "", "generated_by": "tpm"}
    # never overwritten
    assert policy.legacy_post_pass(HASH, ref, {"passphrase": "other", "error": "", "generated_by": "tpm"}) is False
    assert policy.legacy_get_pass(HASH, ref)["passphrase"] == "Y2lwaGVy"


def test_legacy_quarantine_and_static(policy, store):
    register(store, name="node", partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "My_Secret", "path": "Pass"}}],
             quarantined=True)
    static_secret(store, "my-secret", b"static", path="pass")
    ref = PartitionRef(uuid="unknown", label="COS_PERSISTENT")
    assert policy.legacy_get_pass(HASH, ref)["error"] == "quarantined: COS_PERSISTENT"
    volume = store.get_volume("node")
    volume["spec"]["quarantined"] = False
    store.update_volume(volume)
    assert policy.legacy_get_pass(HASH, ref) == {"passphrase": "static", "error": "", "generated_by": ""}


def test_legacy_names_keep_dots_where_safe_kube_name_would_not(policy, store):
    register(store, name="node", partitions=[{"label": "COS.DATA"}])
    static_secret(store, "node-cos.data", b"legacy name")  # cleanKubeName("node-COS.DATA")
    assert policy.legacy_get_pass(HASH, PartitionRef(label="COS.DATA"))["passphrase"] == "legacy name"


def test_legacy_scans_every_volume_of_the_tpm(policy, store):
    register(store, name="a-first", partitions=[{"label": "OTHER"}])
    register(store, name="b-second", partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "s"}}])
    static_secret(store, "s", b"found")
    assert policy.legacy_get_pass(HASH, PartitionRef(label="COS_PERSISTENT"))["passphrase"] == "found"


# -- issue 14: downgrade, ownership, bounds ----------------------------------

@pytest.mark.parametrize("attestation, why", [
    (None, None),
    ({"pcrValues": {"pcrs": {"7": "ab" * 32, "0": "cd" * 32, "11": ""}}}, "it enforces PCR0, PCR7"),
    ({"pcrValues": {"pcrs": {"0": ""}}}, "it learns PCR0 on its next attestation"),
    ({"ekPublicKey": EK, "enrolledAt": "2026-01-01T00:00:00Z"}, "it was enrolled through /tpm-attestation"),
    ({}, "it has an attestation policy (spec.attestation)"),
])
def test_legacy_refusal_says_why(attestation, why):
    volume = st.new_volume("node", HASH, [{"label": "COS_PERSISTENT"}], attestation=attestation)
    text = volume_attestation.legacy_refusal(volume)
    if why is None:
        assert text == ""
    else:
        assert text.startswith("SealedVolume node requires the attestation protocol (/tpm-attestation): %s," % why)


def test_legacy_refusal_covers_every_volume_of_the_tpm(policy, store):
    register(store, name="a-legacy", partitions=[{"label": "COS_PERSISTENT", "secret": {"name": "s"}}])
    register(store, name="b-attested", partitions=[{"label": "COS_OEM"}], attestation={"pcrValues": {"pcrs": {"0": ""}}})
    static_secret(store, "s")
    assert "SealedVolume b-attested requires the attestation protocol" in \
        policy.legacy_get_pass(HASH, PartitionRef(label="COS_PERSISTENT"))["error"]
    with pytest.raises(volume_attestation.PolicyRejection, match="b-attested requires the attestation protocol"):
        policy.legacy_post_pass(HASH, PartitionRef(label="COS_PERSISTENT"), {"passphrase": "x", "error": "", "generated_by": "tpm"})


def test_a_derived_name_secret_is_checked_once_then_named(policy, store):
    """A registered partition without secret.name whose Secret exists: used if it is the partition's, and the
    name is written into the partition (no scan on later boots)."""
    register(store, attestation={}, partitions=[{"label": "COS_PERSISTENT", "secret": {"path": "pass"}}])
    static_secret(store, "node-cos-persistent", b"hand made", path="pass")
    assert policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT) == b"hand made"
    volume = store.get_volume("node")
    assert volume["spec"]["partitions"][0]["secret"] == {"name": "node-cos-persistent", "path": "pass"}
    version = volume["metadata"]["resourceVersion"]
    assert policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT) == b"hand made"
    assert store.get_volume("node")["metadata"]["resourceVersion"] == version


def test_a_foreign_secret_under_a_derived_name_gives_a_generated_partition_its_own(policy, store):
    register(store)
    store.create_secret(st.new_secret("node-cos-persistent", {"passphrase": b"not yours"},
                                      labels=kube_names.secret_labels(OTHER, "COS_PERSISTENT", "elsewhere")))
    passphrase = policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert passphrase != b"not yours" and len(passphrase) == 44
    name = store.get_volume("node")["spec"]["partitions"][0]["secret"]["name"]
    assert name == "node-cos-persistent-" + HASH[:8]
    assert store.get_secret(name)["metadata"]["labels"][kube_names.VOLUME_LABEL] == "node"


def test_a_foreign_secret_under_a_derived_name_with_a_path_is_refused(policy, store):
    """With secret.path set the partition expects an existing Secret, not a generated one: refuse, write nothing."""
    register(store, partitions=[{"label": "COS_PERSISTENT", "secret": {"path": "passphrase"}}])
    store.create_secret(st.new_secret("node-cos-persistent", {"passphrase": b"not yours"},
                                      labels=kube_names.secret_labels(OTHER, "COS_PERSISTENT")))
    with pytest.raises(volume_attestation.PolicyRejection, match="secret node-cos-persistent is not this partition's: "
                                                                 "it is labelled for another TPM"):
        policy.issue_passphrase(HASH, EK, PCRS, PERSISTENT)
    assert "attestation" not in store.get_volume("node")["spec"]


def test_ownership_verdicts(store):
    volume = register(store, partitions=[{"label": "A"}, {"label": "B", "secret": {"name": "named"}}])
    register(store, name="other", tpm_hash=OTHER, partitions=[{"label": "X", "secret": {"name": "taken"}}, {"label": "Y"}])

    def verdict(secret_name, labels=None, index=0, exists=True):
        secret = st.new_secret(secret_name, {"passphrase": b"p"}, labels=labels) if exists else None
        return own.verdict(store, HASH, volume, index, secret_name, secret)

    assert verdict("node-a").kind == own.OWNED  # unlabelled, nobody else uses it
    assert verdict("node-a", kube_names.secret_labels(HASH, "A", "node")).kind == own.OWNED
    assert verdict("node-a", exists=False).kind == own.OWNED
    assert "another TPM" in verdict("node-a", kube_names.secret_labels(OTHER, "A")).reason
    assert verdict("node-a", kube_names.secret_labels(HASH, "A", "node-2")) == \
        (own.FOREIGN, "it belongs to SealedVolume node-2 (label kcrypt.kairos.io/sealedvolume)")
    assert verdict("named").kind == own.FOREIGN  # partition B of this volume names it
    assert verdict("taken").kind == own.FOREIGN  # SealedVolume other names it
    assert verdict("taken", exists=False).kind == own.FOREIGN
    assert verdict("other-y").kind == own.AMBIGUOUS  # other derives it too
    assert "ambiguous ownership: partition label=Y of SealedVolume other" in verdict("other-y").reason
    assert verdict("node-b", index=1).kind == own.OWNED  # B names "named", so it does not use node-b


def test_partition_cap_validation_and_unknown_uuid_entries(store):
    for bad in (0, -1, 1025, "many", 2.5, True):
        with pytest.raises(Exception, match="max_partitions_per_tpm must be"):
            pol.Policy(store, max_partitions_per_tpm=bad)
    policy = pol.Policy(store, max_partitions_per_tpm=1)
    policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(label="COS_OEM", uuid="unknown"))
    assert store.get_volume("tofu-5640e37f")["spec"]["partitions"][0].keys() == {"label", "secret"}
    with pytest.raises(volume_attestation.PolicyRejection, match="has 1 partitions"):
        policy.issue_passphrase(HASH, EK, PCRS, PartitionRef(label="COS_PERSISTENT", uuid="unknown"))


def test_requests_naming_no_partition_write_nothing(policy, store):
    for ref in (PartitionRef(), PartitionRef(uuid="unknown"), PartitionRef(label="x" * 256)):
        with pytest.raises(volume_attestation.PolicyRejection, match="^invalid partition: "):
            policy.issue_passphrase(HASH, EK, PCRS, ref)
        assert policy.legacy_get_pass(HASH, ref)["error"].startswith("invalid partition: ")
        with pytest.raises(volume_attestation.PolicyRejection, match="^invalid partition: "):
            policy.legacy_post_pass(HASH, ref, {"passphrase": "x", "error": "", "generated_by": "tpm"})
    assert store.list_volumes() == [] and store._read("SELECT count(*) FROM secrets") == [(0,)]
