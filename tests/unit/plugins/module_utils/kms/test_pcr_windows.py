# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PCR upgrade windows (issue 16 part 2): verify/relearn rules, registration of windows, the policy on SQLite.

The same with swtpm PCR extends, through the server, on both stores: tests/integration/test_pcr_window_swtpm.py.
"""

from __future__ import annotations

import datetime
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import registration as reg
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import volume_attestation as va
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import InvalidDocument, new_volume, normalize_volume
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore

NOW = datetime.datetime(2026, 12, 6, 12, 0, 0, tzinfo=datetime.timezone.utc)
OLD, NEW, OTHER = "a" * 64, "b" * 64, "c" * 64
HOUR = datetime.timedelta(hours=1)


def _values(until="2026-12-06T13:00:00Z", to=None, pcr7=OLD):
    values = {"pcrs": {"0": OLD, "7": pcr7}, "relearnUntil": {"7": until}}
    if to:
        values["relearnTo"] = {"7": to}
    return values


def test_inside_the_window_a_change_is_learned_once_and_enforced_right_after():
    attestation = {"pcrValues": _values()}
    va.verify_pcrs(attestation["pcrValues"], {"0": OLD, "7": OLD}, NOW)  # not upgraded yet: still served
    assert va.relearn_pcrs(attestation, {"0": OLD, "7": OLD}, NOW) == []  # and the window stays open
    assert attestation["pcrValues"]["relearnUntil"] == {"7": "2026-12-06T13:00:00Z"}
    va.verify_pcrs(attestation["pcrValues"], {"0": OLD, "7": NEW}, NOW)
    assert va.relearn_pcrs(attestation, {"0": OLD, "7": NEW}, NOW) == [("7", OLD, NEW, "2026-12-06T13:00:00Z")]
    assert attestation == {"pcrValues": {"pcrs": {"0": OLD, "7": NEW}}, "lastVerifiedAt": "2026-12-06T12:00:00Z"}
    with pytest.raises(va.PolicyRejection, match="PCR7 changed - boot state verification failed: expected %s, got %s$" % (NEW, OTHER)):
        va.verify_pcrs(attestation["pcrValues"], {"0": OLD, "7": OTHER}, NOW)


def test_a_window_only_opens_enforced_pcrs_and_never_pcr0():
    with pytest.raises(va.PolicyRejection, match="PCR0 changed"):
        va.verify_pcrs(_values(), {"0": NEW, "7": OLD}, NOW)


def test_outside_the_window_the_old_value_is_enforced():
    for values, when in ((_values(), NOW + 2 * HOUR), (_values(until="not a time"), NOW), ({"pcrs": {"7": OLD}}, NOW)):
        with pytest.raises(va.PolicyRejection, match="PCR7 changed - boot state verification failed: expected %s" % OLD):
            va.verify_pcrs(values, {"0": OLD, "7": NEW}, when)
        attestation = {"pcrValues": values}
        assert va.relearn_pcrs(attestation, {"0": OLD, "7": NEW}, when) == [] and values["pcrs"]["7"] == OLD
    assert va.open_windows(_values(), NOW + 2 * HOUR) == {}


def test_a_known_good_value_window_accepts_only_that_value():
    values = _values(to=NEW)
    with pytest.raises(va.PolicyRejection, match="its upgrade window until 2026-12-06T13:00:00Z accepts only %s" % NEW):
        va.verify_pcrs(values, {"0": OLD, "7": OTHER}, NOW)
    attestation = {"pcrValues": values}
    assert va.relearn_pcrs(attestation, {"0": OLD, "7": OTHER}, NOW) == []
    va.verify_pcrs(values, {"0": OLD, "7": NEW}, NOW)
    assert va.relearn_pcrs(attestation, {"0": OLD, "7": NEW}, NOW) == [("7", OLD, NEW, "2026-12-06T13:00:00Z")]
    assert attestation["pcrValues"] == {"pcrs": {"0": OLD, "7": NEW}}


def test_a_pcr_still_to_learn_ignores_its_window():
    values = _values(pcr7="")
    va.verify_pcrs(values, {"0": OLD, "7": NEW}, NOW)
    assert va.open_windows(values, NOW) == {}


def test_registration_opens_moves_and_closes_windows():
    stored = {"ekPublicKey": "", "pcrValues": {"pcrs": {"0": OLD, "7": OLD, "11": ""}}, "enrolledAt": "2026-12-01T00:00:00Z"}
    wish = {"pcrs": {"0": "learn", "7": "relearn", "11": "relearn"}, "relearn_until": "2h"}
    opened = reg.attestation_after(stored, wish, "f" * 64, NOW)
    assert opened["pcrValues"] == {"pcrs": {"0": OLD, "7": OLD, "11": ""}, "relearnUntil": {"7": "2026-12-06T14:00:00Z"}}
    assert opened["enrolledAt"] == "2026-12-01T00:00:00Z"
    # a second run with the same duration keeps the deadline (idempotent); a time moves it
    assert reg.attestation_after(opened, wish, "f" * 64, NOW + HOUR) == opened
    moved = reg.attestation_after(opened, dict(wish, relearn_until="2026-12-07T00:00:00+01:00"), "f" * 64, NOW)
    assert moved["pcrValues"]["relearnUntil"] == {"7": "2026-12-06T23:00:00Z"}
    # an expired window is re-opened by a duration
    assert reg.attestation_after(opened, wish, "f" * 64, NOW + 3 * HOUR)["pcrValues"]["relearnUntil"] == {"7": "2026-12-06T17:00:00Z"}
    # learn closes it and keeps the value; relearn without a deadline forgets the value (upstream's relearn)
    closed = reg.attestation_after(opened, {"pcrs": {"0": "learn", "7": "learn"}}, "f" * 64, NOW)
    assert closed["pcrValues"] == {"pcrs": {"0": OLD, "7": OLD}}
    assert reg.attestation_after(opened, {"pcrs": {"7": "relearn"}}, "f" * 64, NOW)["pcrValues"] == {"pcrs": {"7": ""}}


def test_registration_of_known_good_values():
    stored = {"pcrValues": {"pcrs": {"7": OLD, "11": ""}}}
    wish = {"pcrs": {"7": "relearn", "11": "relearn"}, "relearn_until": "1d12h", "relearn_to": {"7": NEW.upper(), 11: OTHER}}
    result = reg.attestation_after(stored, wish, "f" * 64, NOW)
    assert result["pcrValues"] == {"pcrs": {"7": OLD, "11": OTHER},  # nothing to restore for 11: the value at once
                                   "relearnUntil": {"7": "2026-12-08T00:00:00Z"}, "relearnTo": {"7": NEW}}
    normalize_volume(new_volume("v", "f" * 64, attestation=result))  # the store's schema holds it


@pytest.mark.parametrize("wish, message", [
    ({"pcrs": {"7": "relearn"}, "relearn_until": "yesterday"}, "must be a duration such as 2h"),
    ({"pcrs": {"7": "relearn"}, "relearn_until": "2026-12-06T11:59:59Z"}, "is in the past"),
    ({"pcrs": {"7": "relearn"}, "relearn_until": "0h"}, "is no time at all"),
    ({"pcrs": {"7": "relearn"}, "relearn_until": "2026-12-07"}, "must be a duration"),
    ({"pcrs": {"7": "learn"}, "relearn_until": "2h", "relearn_to": {"7": NEW}}, "PCR 7 is not in relearn mode"),
    ({"pcrs": {"7": "relearn"}, "relearn_to": {"7": NEW}}, "needs attestation.relearn_until"),
    ({"pcrs": {"7": "relearn"}, "relearn_until": "2h", "relearn_to": {"7": "xyz"}}, "must be a SHA-256 value"),
    ({"pcrs": {"7": "relearn"}, "relearn_until": "2h", "relearn_to": {"24": NEW}}, "is not a PCR index"),
])
def test_bad_windows_are_refused(wish, message):
    with pytest.raises(reg.RegistrationError, match=message):
        reg.attestation_after({"pcrValues": {"pcrs": {"7": OLD}}}, wish, "f" * 64, NOW)


def test_the_store_refuses_malformed_window_maps():
    with pytest.raises(InvalidDocument, match="PCR index 'x' must be a decimal number"):
        normalize_volume(new_volume("v", "f" * 64, attestation={"pcrValues": {"pcrs": {}, "relearnUntil": {"x": "t"}}}))


def test_the_window_report():
    volume = {"spec": {"attestation": {"pcrValues": {"pcrs": {"0": OLD, "7": OLD},
                                                     "relearnUntil": {"0": "2026-12-06T11:00:00Z", "7": "2026-12-06T13:00:00Z"},
                                                     "relearnTo": {"7": NEW}}}}}
    assert reg.pcr_window_report(volume, NOW) == {
        "0": {"state": "expired", "until": "2026-12-06T11:00:00Z", "value": OLD},
        "7": {"state": "open", "until": "2026-12-06T13:00:00Z", "value": OLD, "relearn_to": NEW},
    }
    assert reg.pcr_window_report({}, NOW) == {}


def test_the_policy_relearns_inside_a_window_writes_once_and_audits(tmp_path, caplog):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    tpm_hash, pem = identity.tpm_hash(key), identity.public_key_pem(key)
    partition = PartitionRef(label="COS_PERSISTENT")
    store = SQLiteStore(str(tmp_path / "kms.db"))
    try:
        policy = Policy(store)
        first = policy.issue_passphrase(tpm_hash, pem, {"0": OLD, "7": OLD, "11": OLD}, partition)
        volume = store.find_volume(tpm_hash)
        plan = reg.plan_registration(store, tpm_hash, None, attestation={
            "ek": "learn", "pcrs": {"0": "learn", "7": "relearn", "11": "learn"}, "relearn_until": "1h"})
        assert [p["label"] for p in plan.after["spec"]["partitions"]] == ["COS_PERSISTENT"]  # partitions None: kept
        reg.apply_plan(store, plan)
        with pytest.raises(va.PolicyRejection, match="PCR0 changed"):
            policy.issue_passphrase(tpm_hash, pem, {"0": NEW, "7": OLD, "11": OLD}, partition)
        caplog.set_level(logging.INFO, logger="kcrypt.audit")
        assert policy.issue_passphrase(tpm_hash, pem, {"0": OLD, "7": NEW, "11": OLD}, partition) == first
        after = store.find_volume(tpm_hash)
        assert after["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": OLD, "7": NEW, "11": OLD}}
        assert after["spec"]["partitions"] == volume["spec"]["partitions"]
        (line,) = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
        assert line.startswith("pcr-relearn volume=%s tpm_hash=%s pcr=7 old=%s new=%s window_until=" % (
            volume["metadata"]["name"], tpm_hash, OLD, NEW))
        version = after["metadata"]["resourceVersion"]
        assert policy.issue_passphrase(tpm_hash, pem, {"0": OLD, "7": NEW, "11": OLD}, partition) == first
        assert store.find_volume(tpm_hash)["metadata"]["resourceVersion"] == version  # nothing more to write
        with pytest.raises(va.PolicyRejection, match="PCR7 changed - boot state verification failed: expected %s, got %s" % (NEW, OTHER)):
            policy.issue_passphrase(tpm_hash, pem, {"0": OLD, "7": OTHER, "11": OLD}, partition)
    finally:
        store.close()


def test_the_admin_window_plan_keeps_everything_else(tmp_path):
    """kcrypt-challenger pcr-window: opening PCR 7 keeps PCR 0's window and the partitions; unlearned PCRs are
    skipped with the reason; close without PCRs closes every window; bad input writes nothing."""
    store = SQLiteStore(str(tmp_path / "kms.db"))
    try:
        tpm_hash = "d" * 64
        store.create_volume(new_volume("node", tpm_hash, [{"label": "COS_PERSISTENT"}], attestation={
            "pcrValues": {"pcrs": {"0": OLD, "7": OLD, "11": ""}, "relearnUntil": {"0": "2026-12-06T20:00:00Z"}}}))
        plan, skipped = reg.plan_pcr_window(store, tpm_hash, ["7", "11", "14"], "1h", {"7": NEW}, now=NOW)
        assert skipped == {"11": "not learned yet: the next contact learns it", "14": "not checked for this TPM"}
        assert plan.after["spec"]["attestation"]["pcrValues"] == {
            "pcrs": {"0": OLD, "7": OLD, "11": ""}, "relearnTo": {"7": NEW},
            "relearnUntil": {"0": "2026-12-06T20:00:00Z", "7": "2026-12-06T13:00:00Z"}}
        reg.apply_plan(store, plan)
        assert not reg.plan_pcr_window(store, tpm_hash, ["7"], "1h", {"7": NEW}, now=NOW + HOUR / 2)[0].changed
        for args, message in (((["7"], None), "needs relearn_until"), ((["7"], "1h", {"0": NEW}), "not among the PCRs to open"),
                              ((["7"], "1h", {"7": "zz"}), "must be a SHA-256 value")):
            with pytest.raises(reg.RegistrationError, match=message):
                reg.plan_pcr_window(store, tpm_hash, *args, now=NOW)
        with pytest.raises(reg.RegistrationError, match="is not registered"):
            reg.plan_pcr_window(store, "e" * 64, ["7"], "1h", now=NOW)
        plan, dummy = reg.plan_pcr_window(store, tpm_hash, close_pcrs="all", now=NOW)
        reg.apply_plan(store, plan)
        volume = store.find_volume(tpm_hash)
        assert volume["spec"]["attestation"]["pcrValues"] == {"pcrs": {"0": OLD, "7": OLD, "11": ""}}
        assert volume["spec"]["partitions"] == [{"label": "COS_PERSISTENT"}]
    finally:
        store.close()
