# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Registration planning shared by kairos_sealedvolume and the admin CLI (on a real SQLite store)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import registration as reg
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as ownership
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import secret_labels
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
HASH = identity.tpm_hash(KEY)
PEM = identity.public_key_pem(KEY)


@pytest.fixture
def store(tmp_path):
    opened = SQLiteStore(str(tmp_path / "kms.db"))
    yield opened
    opened.close()


def P(**kwargs):
    return reg.PartitionWish(**kwargs)


def register(store, partitions, **kwargs):
    plan = reg.plan_registration(store, HASH, partitions, **kwargs)
    return plan, reg.apply_plan(store, plan)


@pytest.mark.parametrize("value", ["", "abc", "g" * 64, "a" * 63, "a" * 65, None])
def test_invalid_tpm_hash(store, value):
    with pytest.raises(reg.RegistrationError, match="tpm_hash must be 64 hexadecimal"):
        reg.plan_registration(store, value, [P(label="L")])


def test_tpm_hash_is_normalised():
    assert reg.validate_tpm_hash("  " + HASH.upper() + "\n") == HASH


@pytest.mark.parametrize("passphrase, message", [
    (b"secret\n", "contains a newline"), ("secret\r\n", "contains a newline"), (b"se\ncret", "contains a newline"),
    (b"", "is empty"), (b"a\x00b", "NUL"),
])
def test_bad_static_passphrases_write_nothing(store, passphrase, message):
    with pytest.raises(reg.RegistrationError, match=message):
        register(store, [P(label="COS_PERSISTENT", passphrase=passphrase)])
    assert store.list_volumes() == [] and store.get_secret("tpm-%s-cos-persistent" % HASH[:16]) is None


def test_partition_without_identifier(store):
    with pytest.raises(reg.RegistrationError, match=r"partitions\[1\] has no identifier"):
        register(store, [P(label="A"), P(secret_name="x")])
    assert store.list_volumes() == []


def test_static_passphrase_needs_a_secret_name_source(store):
    with pytest.raises(reg.RegistrationError, match="neither label nor secret_name"):
        register(store, [P(uuid="u-1", passphrase=b"pw")])


def test_create_is_idempotent_and_served(store):
    plan, stored = register(store, [P(label="COS_PERSISTENT", passphrase="static pw")])
    assert plan.changed and plan.before is None
    name = "tpm-" + HASH[:16]
    assert st.volume_name(stored) == name
    assert stored["spec"] == {"TPMHash": HASH, "partitions": [{"label": "COS_PERSISTENT"}]}
    expected = {"name": name + "-cos-persistent", "key": "passphrase", "action": "create", "partition": "label=COS_PERSISTENT"}
    assert [a.summary() for a in plan.secrets] == [expected]
    assert "static pw" not in repr(plan.diff()) and "static pw" not in repr([a.summary() for a in plan.secrets])
    again = reg.plan_registration(store, HASH, [P(label="COS_PERSISTENT", passphrase="static pw")])
    assert not again.changed and again.secrets[0].action == "unchanged"
    # the server hands out exactly that passphrase
    assert Policy(store).issue_passphrase(HASH, PEM, {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) == b"static pw"
    # after the server learned the attestation, re-running the registration changes nothing
    assert not reg.plan_registration(store, HASH, [P(label="COS_PERSISTENT", passphrase="static pw")]).changed


def test_existing_passphrase_kept_unless_update_always(store):
    register(store, [P(label="L", passphrase=b"one")])
    plan = reg.plan_registration(store, HASH, [P(label="L", passphrase=b"two")])
    assert not plan.changed and plan.secrets[0].action.startswith("kept")
    reg.apply_plan(store, plan)
    name = "tpm-%s-l" % HASH[:16]
    assert store.get_secret(name)["data"]["passphrase"] == b"one"
    plan = reg.plan_registration(store, HASH, [P(label="L", passphrase=b"two")], update_passphrase="always")
    assert plan.changed and plan.secrets[0].action == "update"
    reg.apply_plan(store, plan)
    assert store.get_secret(name)["data"]["passphrase"] == b"two"


def test_secret_of_another_tpm_is_refused(store):
    store.create_secret(st.new_secret("shared", {"passphrase": b"x"}, labels=secret_labels("e" * 64, "L")))
    with pytest.raises(reg.RegistrationError, match="belongs to another TPM"):
        register(store, [P(label="L", secret_name="shared", passphrase=b"mine")])
    assert store.list_volumes() == []


def test_name_conflicts(store):
    register(store, [P(label="L")], name="node-a")
    with pytest.raises(reg.RegistrationError, match="already registered as SealedVolume node-a"):
        reg.plan_registration(store, HASH, [P(label="L")], name="node-b")
    store.create_volume(st.new_volume("other", "f" * 64, [{"label": "L"}]))
    with pytest.raises(reg.RegistrationError, match="belongs to TPM f{64}"):
        reg.plan_registration(store, HASH, [P(label="L")], name="other")
    with pytest.raises(reg.RegistrationError, match="not a valid Kubernetes object name"):
        reg.plan_registration(store, "1" * 64, [P(label="L")], name="Bad_Name")
    # without a name the TPM's registration is found by hash
    assert st.volume_name(reg.plan_registration(store, HASH, [P(label="L")]).after) == "node-a"


def test_server_written_secret_reference_survives(store):
    register(store, [P(label="COS_PERSISTENT")], name="node")
    Policy(store).issue_passphrase(HASH, PEM, {"0": "aa"}, PartitionRef(label="COS_PERSISTENT"))  # deferred TOFU writes the ref
    assert store.get_volume("node")["spec"]["partitions"][0]["secret"]["name"] == "node-cos-persistent"
    plan = reg.plan_registration(store, HASH, [P(label="COS_PERSISTENT")], name="node")
    assert not plan.changed  # neither the ref nor the learned attestation is dropped


def test_partitions_exact_vs_merge(store):
    register(store, [P(label="A"), P(label="B")], name="node")
    plan = reg.plan_registration(store, HASH, [P(label="B")], name="node")
    assert [p["label"] for p in plan.after["spec"]["partitions"]] == ["B"]
    plan = reg.plan_registration(store, HASH, [P(label="C")], name="node", merge_partitions=True)
    assert [p["label"] for p in plan.after["spec"]["partitions"]] == ["A", "B", "C"]
    with pytest.raises(reg.RegistrationError, match="listed twice"):
        reg.plan_registration(store, HASH, [P(label="X"), P(label="X", uuid="u")], name="node")


def test_quarantine_flag(store):
    register(store, [P(label="L")], quarantined=True)
    assert store.find_volume(HASH)["spec"]["quarantined"] is True
    assert not reg.plan_registration(store, HASH, [P(label="L")]).changed  # None leaves it alone
    plan, stored = register(store, [P(label="L")], quarantined=False)
    assert plan.changed and "quarantined" not in stored["spec"]


def test_attestation_modes(store):
    wish = {"ek": "learn", "pcrs": {"0": "learn", "7": "ab" * 32, "11": "ignore"}}
    stored = register(store, [P(label="L", passphrase=b"pw")], attestation=wish)[1]
    assert stored["spec"]["attestation"] == {"ekPublicKey": "", "pcrValues": {"pcrs": {"0": "", "7": "ab" * 32}}}
    pcrs = {"0": "01" * 32, "7": "ab" * 32, "11": "0b" * 32}
    Policy(store).issue_passphrase(HASH, PEM, pcrs, PartitionRef(label="L"))
    learned = store.find_volume(HASH)["spec"]["attestation"]
    assert learned["ekPublicKey"] == PEM and learned["pcrValues"]["pcrs"] == {"0": "01" * 32, "7": "ab" * 32}
    # "learn" keeps what was learned: idempotent
    assert not reg.plan_registration(store, HASH, [P(label="L")], attestation=wish).changed
    # relearn forgets; ignore drops; enforce sets
    plan = reg.plan_registration(store, HASH, [P(label="L")],
                                 attestation={"ek": "relearn", "pcrs": {"0": "relearn", "7": "ignore"}})
    assert plan.after["spec"]["attestation"]["ekPublicKey"] == ""
    assert plan.after["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": ""}}
    assert plan.after["spec"]["attestation"]["lastVerifiedAt"] == learned["lastVerifiedAt"]  # server timestamps kept
    plan = reg.plan_registration(store, HASH, [P(label="L")], attestation={"pcrs": {}})
    assert "pcrValues" not in plan.after["spec"]["attestation"]  # = upstream `attestation: {}`: PCRs never checked


def test_ek_public_key_is_normalised_and_must_match(store):
    trimmed = PEM.strip().replace("\n", "\r\n")
    plan = reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek": "enforce", "ek_public_key": trimmed})
    assert plan.after["spec"]["attestation"]["ekPublicKey"] == PEM  # exactly what the server compares against
    other = identity.public_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    with pytest.raises(reg.RegistrationError, match="does not belong to TPM"):
        reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek": "enforce", "ek_public_key": other})
    with pytest.raises(reg.RegistrationError, match="needs attestation.ek_public_key"):
        reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek": "enforce"})
    with pytest.raises(reg.RegistrationError, match="contradicts"):
        reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek": "relearn", "ek_public_key": PEM})
    implied = reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek": "learn", "ek_public_key": PEM})
    assert implied.after["spec"]["attestation"]["ekPublicKey"] == PEM
    with pytest.raises(reg.RegistrationError, match="not a PEM"):
        reg.plan_registration(store, HASH, [P(label="L")], attestation={"ek_public_key": "garbage"})


@pytest.mark.parametrize("pcrs, message", [({"24": "learn"}, "not a PCR index"), ({"x": "learn"}, "not a PCR index"),
                                           ({"0": "AB"}, "64 hex"), ({"0": "maybe"}, "64 hex")])
def test_bad_pcr_wishes(store, pcrs, message):
    with pytest.raises(reg.RegistrationError, match=message):
        reg.plan_registration(store, HASH, [P(label="L")], attestation={"pcrs": pcrs})


def test_diff_shows_spec_and_secret_names_only(store):
    plan = reg.plan_registration(store, HASH, [P(label="L", passphrase=b"hunter2hunter2")], name="node")
    diff = plan.diff()
    assert diff["before"] == "" and diff["after_header"] == "SealedVolume node"
    assert "TPMHash: %s" % HASH in diff["after"] and "# Secret node-l (key passphrase): create" in diff["after"]
    assert "hunter2" not in repr(diff)


def test_removal(store):
    register(store, [P(label="L", passphrase=b"pw")], name="node")
    plan = reg.plan_removal(store, HASH)
    assert plan.changed
    reg.apply_plan(store, plan)
    assert store.list_volumes() == []
    assert store.get_secret("node-l") is not None  # passphrases are kept
    assert not reg.plan_removal(store, HASH).changed
    store.create_volume(st.new_volume("other", "f" * 64, [{"label": "L"}]))
    with pytest.raises(reg.RegistrationError, match="nothing removed"):
        reg.plan_removal(store, HASH, name="other")


def test_parse_partition_spec():
    wish = reg.parse_partition_spec("label=COS_PERSISTENT,name=vda5,uuid=U-1,secret=s1,path=key")
    assert (wish.label, wish.device_name, wish.uuid, wish.secret_name, wish.secret_path) == ("COS_PERSISTENT", "vda5", "U-1", "s1", "key")
    assert reg.parse_partition_spec("COS_OEM").label == "COS_OEM"
    with pytest.raises(reg.RegistrationError, match="unknown key"):
        reg.parse_partition_spec("label=x,colour=blue")


class CountingStore(object):
    """Counts the full scans (list_volumes) a registration costs."""

    def __init__(self, inner):
        self.inner, self.scans = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def list_volumes(self):
        self.scans += 1
        return self.inner.list_volumes()


def test_rerunning_a_registration_costs_no_scan(store):
    """What the server settled (a named Secret) is kept on re-runs, and checked only when it is new."""
    register(store, [P(label="COS_PERSISTENT"), P(label="COS_OEM")])
    Policy(store).issue_passphrase(HASH, PEM, {}, PartitionRef(label="COS_PERSISTENT"))  # names its Secret
    counting = CountingStore(store)
    plan = reg.plan_registration(counting, HASH, [P(label="COS_PERSISTENT"), P(label="COS_OEM")])
    assert not plan.changed and counting.scans == 0
    plan = reg.plan_registration(counting, HASH, [P(label="COS_PERSISTENT"), P(label="DATA", secret_name="data-key")])
    assert plan.changed and counting.scans == 1  # a new explicit name is checked against every other partition


def test_partition_identifiers_keep_the_bounds_a_node_request_keeps(store):
    with pytest.raises(reg.RegistrationError, match=r"partitions\[0\]: label is longer than 255 bytes"):
        register(store, [P(label="L" * 256)])
    with pytest.raises(reg.RegistrationError, match=r"partitions\[0\] has no identifier"):
        register(store, [P(uuid="unknown")])
    assert store.list_volumes() == []


def test_one_secret_with_a_key_per_partition_is_not_sharing(store):
    """Upstream's secret.path picks a key: one Secret per node with a key per partition is a fine pattern."""
    register(store, [P(label="A", secret_name="node-keys", secret_path="a"), P(label="B", secret_name="node-keys", secret_path="b"),
                     P(label="E")])
    assert ownership.problems(store.list_volumes(), store.get_secret) == []
    with pytest.raises(reg.RegistrationError, match="would use the same Secret node-keys"):
        reg.plan_registration(store, HASH, [P(label="C", secret_name="node-keys", secret_path="a")], merge_partitions=True)
    derived = "tpm-%s-e" % HASH[:16]  # what partition E derives: never shared, whatever the key
    with pytest.raises(reg.RegistrationError, match="would use the same Secret %s" % derived):
        reg.plan_registration(store, HASH, [P(label="D", secret_name=derived, secret_path="other")], merge_partitions=True)
