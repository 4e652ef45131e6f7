# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Attacks on the KMS's policy and store (issue 14 items 1-3), replayed against the real server and policy
on every store backend (SQLite, the emulated Kubernetes API; a real cluster when KUBECONFIG is set).

The nodes are software TPM identities (tests/support/soft_tpm.py: real EK/AK keys, real credential
activation and quotes) speaking raw frames over websocket-client, so each test sends exactly the
request an attacker would:

* downgrade: a TPM whose boot state changed is refused on /tpm-attestation, then asks /getPass
  (legacy, no quote) for the same passphrase, or attaches a legacy key with /postPass;
* name collision: a TPM adds a partition whose Secret name is another volume's Secret;
* unbounded growth: huge, empty, or endless partition identifiers from an enrolled TPM.

Each refusal must reach the node with a reason, be audited, and write nothing.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

import pytest
import websocket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_names, policy as pol, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from support import soft_tpm
from support.challenger import ChallengerThread, connect, soft_attest
from support.soft_tpm import SoftTPM

STATIC = b"static passphrase of node-db"


@pytest.fixture(scope="module")
def keys():
    return soft_tpm.key_pool(6)


@pytest.fixture
def node_a(keys):
    return SoftTPM(keys[0], keys[1])


@pytest.fixture
def node_b(keys):
    return SoftTPM(keys[2], keys[3])


def _kms(store, enrollment="tofu", nonce="when-supported", protocols=None, **policy_options):
    store_calls = "inline" if store.url.startswith("sqlite:") else "thread"
    options = {} if protocols is None else {"protocols": protocols}
    return ChallengerThread(server.Challenger(pol.Policy(store, enrollment=enrollment, **policy_options), nonce_mode=nonce,
                                              store_calls=store_calls, **options))


def _headers(label="", name="", uuid=""):
    return {"label": label, "name": name, "uuid": uuid}


def _passphrase(response):
    assert "passphrase" in response, response
    return protocol.parse_response(response)[0]


def legacy_get(kms, node, headers):
    """One legacy /getPass exchange; returns the payload dict."""
    ws = connect(kms.ws_url, path=protocol.GET_PASS_PATH, headers=dict(headers, Authorization=node.legacy_token()))
    try:
        ws.send_binary(node.legacy_answer(ws.recv()))
        return protocol.parse_legacy_payload(ws.recv())
    finally:
        ws.close()


def legacy_post(kms, node, headers, passphrase="VGhpcyBpcyBhIGNpcGhlcnRleHQ"):
    """One legacy /postPass exchange; returns the error payload, or None when the server just closed (success)."""
    ws = connect(kms.ws_url, path=protocol.POST_PASS_PATH, headers=dict(headers, Authorization=node.legacy_token()))
    try:
        ws.send_binary(node.legacy_answer(ws.recv()))
        ws.send(protocol.write_json({"passphrase": passphrase, "error": "", "generated_by": "tpm"}))
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None
        return None if opcode == websocket.ABNF.OPCODE_CLOSE else protocol.parse_legacy_payload(data)
    finally:
        ws.close()


def _audit_lines(caplog):
    time.sleep(0.2)  # the audit line is written after the reply
    return [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]


def _snapshot(store, secret_names=()):
    """What a refused request must not change: every volume (with its resourceVersion) and the named Secrets."""
    volumes = {st.volume_name(v): (v["metadata"]["resourceVersion"], v["spec"]) for v in store.list_volumes()}
    return volumes, {name: store.get_secret(name) is not None for name in secret_names}


# ---------------------------------------------------------------------------
# 1. Protocol downgrade


def test_legacy_get_pass_cannot_undo_an_enforced_pcr_policy(store, node_a, caplog):
    """registered-only, nonce required, PCR0/PCR7 enforced: a changed PCR0 is refused on /tpm-attestation,
    and /getPass (which carries no quote) must not hand out the same passphrase."""
    pcrs = {str(i): v.hex() for i, v in node_a.pcr_values().items()}
    store.create_secret(st.new_secret("node-a-static", {"passphrase": STATIC}))
    store.create_volume(st.new_volume("node-a", node_a.tpm_hash, [
        {"label": "COS_PERSISTENT", "secret": {"name": "node-a-static", "path": "passphrase"}}],
        attestation={"ekPublicKey": node_a.ek_pem, "pcrValues": {"pcrs": {"0": pcrs["0"], "7": pcrs["7"]}}}))
    headers = _headers("COS_PERSISTENT", "vda5")
    with _kms(store, enrollment="registered-only", nonce="required") as kms:
        assert _passphrase(soft_attest(kms.ws_url, node_a, headers=headers)) == STATIC
        node_a.pcr_extend(0, b"a modified firmware")
        refused = soft_attest(kms.ws_url, node_a, headers=headers)
        assert "PCR0 changed - boot state verification failed" in refused["error"]
        before = _snapshot(store)
        with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
            payload = legacy_get(kms, node_a, headers)
            lines = _audit_lines(caplog)
    assert payload["passphrase"] == "" and STATIC.decode() not in str(payload)
    assert "attestation protocol" in payload["error"] and "node-a" in payload["error"]
    assert "PCR" in payload["error"]
    assert _snapshot(store) == before
    (line,) = [line for line in lines if "protocol=legacy-get" in line]
    assert "outcome=rejected" in line and "attestation protocol" in line


def test_legacy_get_pass_refused_for_a_volume_enrolled_through_tpm_attestation(store, node_a):
    """TOFU on /tpm-attestation writes `attestation`: from then on the TPM is an attestation-protocol TPM."""
    headers = _headers("COS_PERSISTENT")
    with _kms(store) as kms:
        first = _passphrase(soft_attest(kms.ws_url, node_a, headers=headers))
        payload = legacy_get(kms, node_a, headers)
        assert payload["passphrase"] == "" and first.decode() not in str(payload)
        assert "attestation protocol" in payload["error"]
        assert _passphrase(soft_attest(kms.ws_url, node_a, headers=headers)) == first  # the strong path still works


def test_legacy_post_pass_cannot_attach_a_key_to_an_attestation_volume(store, node_a):
    """A registered partition without a Secret on a volume with a PCR policy: a legacy node must not create
    its Secret (the newest protocol would then hand the legacy ciphertext out as the passphrase)."""
    store.create_volume(st.new_volume("node-a", node_a.tpm_hash, [{"label": "COS_PERSISTENT"}],
                                      attestation={"pcrValues": {"pcrs": {"0": ""}}}))
    headers = _headers("COS_PERSISTENT")
    with _kms(store, enrollment="registered-only") as kms:
        before = _snapshot(store, ["node-a-cos-persistent"])
        reply = legacy_post(kms, node_a, headers)
        assert reply is not None and "attestation protocol" in reply["error"]
        assert _snapshot(store, ["node-a-cos-persistent"]) == before
        generated = _passphrase(soft_attest(kms.ws_url, node_a, headers=headers))
    assert len(generated) == 44  # a TOFU passphrase, not the posted ciphertext


def test_legacy_is_still_served_for_a_legacy_registration(store, node_a):
    """Mixed fleets: a SealedVolume without `attestation` (how legacy nodes are registered) works as before."""
    store.create_volume(st.new_volume("legacy-node", node_a.tpm_hash, [{"label": "COS_PERSISTENT"}]))
    headers = _headers("COS_PERSISTENT")
    with _kms(store) as kms:
        assert legacy_get(kms, node_a, headers)["error"].startswith("No secret found for")
        assert legacy_post(kms, node_a, headers, passphrase="Y2lwaGVy") is None
        assert legacy_get(kms, node_a, headers) == {"passphrase": "Y2lwaGVy", "error": "", "generated_by": "tpm"}


@pytest.mark.parametrize("protocols, disabled, enabled", [
    (("attestation",), [protocol.GET_PASS_PATH, protocol.POST_PASS_PATH, "/" + protocol.GET_PASS_PATH], protocol.ATTESTATION_PATH),
    (("legacy",), [protocol.ATTESTATION_PATH, "/" + protocol.ATTESTATION_PATH, protocol.RECOVERY_ESCROW_PATH], protocol.GET_PASS_PATH),
])
def test_a_disabled_protocol_answers_a_clear_http_error(store, node_a, protocols, disabled, enabled):
    store.create_volume(st.new_volume("node-a", node_a.tpm_hash, [{"label": "COS_PERSISTENT"}]))
    with _kms(store, protocols=protocols) as kms:
        for path in disabled:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(kms.url + path, timeout=10)
            body = info.value.read().decode()
            assert info.value.code == 404, path
            assert "disabled" in body and "--protocols" in body and ",".join(protocols) in body
            with pytest.raises(websocket.WebSocketBadStatusException) as ws_info:
                connect(kms.ws_url, path=path)
            assert ws_info.value.status_code == 404
        if enabled == protocol.ATTESTATION_PATH:
            assert len(_passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("COS_PERSISTENT")))) == 44
        else:
            assert legacy_get(kms, node_a, _headers("COS_PERSISTENT"))["error"].startswith("No secret found for")


# ---------------------------------------------------------------------------
# 2. A Secret claimed through a name collision


def _node_db(store, node_b, explicit):
    """Volume node-db (TPM B) whose partition COS-PERSISTENT uses the hand-made Secret node-db-cos-persistent."""
    store.create_secret(st.new_secret("node-db-cos-persistent", {"passphrase": STATIC}))  # kubectl-made: no labels
    partition = {"label": "COS-PERSISTENT"}
    if explicit:
        partition["secret"] = {"name": "node-db-cos-persistent", "path": "passphrase"}
    store.create_volume(st.new_volume("node-db", node_b.tpm_hash, [partition]))


@pytest.mark.parametrize("explicit", [False, True], ids=["default-name", "explicit-name"])
def test_a_new_partition_cannot_claim_another_volumes_secret(store, node_a, node_b, explicit):
    """Volume `node` + label DB-COS-PERSISTENT names the Secret node-db-cos-persistent, which is node-db's."""
    _node_db(store, node_b, explicit)
    store.create_volume(st.new_volume("node", node_a.tpm_hash, [{"label": "COS_PERSISTENT"}]))
    with _kms(store) as kms:
        own = _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("COS_PERSISTENT")))
        claimed = _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("DB-COS-PERSISTENT")))
        assert claimed != STATIC and claimed != own and len(claimed) == 44
        partitions = store.get_volume("node")["spec"]["partitions"]
        assert [p["label"] for p in partitions] == ["COS_PERSISTENT", "DB-COS-PERSISTENT"]
        name = partitions[1]["secret"]["name"]
        assert name != "node-db-cos-persistent"
        assert store.get_secret(name)["data"]["passphrase"] == claimed
        assert store.get_secret("node-db-cos-persistent")["data"] == {"passphrase": STATIC}  # untouched
        # the owner is still served its own static passphrase
        assert _passphrase(soft_attest(kms.ws_url, node_b, headers=_headers("COS-PERSISTENT"))) == STATIC
        assert _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("DB-COS-PERSISTENT"))) == claimed


def test_first_contact_does_not_adopt_a_secret_another_volume_references(store, node_a, node_b):
    """A TOFU enrolment whose Secret name is referenced by another volume gets a name of its own."""
    store.create_secret(st.new_secret("tofu-%s-cos-persistent" % node_a.tpm_hash[:8], {"passphrase": STATIC}))
    store.create_volume(st.new_volume("other", node_b.tpm_hash, [
        {"label": "X", "secret": {"name": "tofu-%s-cos-persistent" % node_a.tpm_hash[:8]}}]))
    with _kms(store) as kms:
        passphrase = _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("COS_PERSISTENT")))
    assert passphrase != STATIC
    volume = store.find_volume(node_a.tpm_hash)
    assert volume["spec"]["partitions"][0]["secret"]["name"] != "tofu-%s-cos-persistent" % node_a.tpm_hash[:8]


def test_ambiguous_default_names_are_refused_on_both_protocols(store, node_a, node_b):
    """Two registrations whose default Secret names coincide, and a hand-made Secret of that name: nobody can
    tell whose it is, so neither TPM gets it (until an administrator names the Secret explicitly)."""
    _node_db(store, node_b, explicit=False)
    store.create_volume(st.new_volume("node", node_a.tpm_hash, [{"label": "DB-COS-PERSISTENT"}]))
    with _kms(store) as kms:
        before = _snapshot(store)
        for node, label in ((node_a, "DB-COS-PERSISTENT"), (node_b, "COS-PERSISTENT")):
            payload = legacy_get(kms, node, _headers(label))
            assert payload["passphrase"] == "" and "node-db-cos-persistent" in payload["error"]
            assert "ambiguous" in payload["error"]
            response = soft_attest(kms.ws_url, node, headers=_headers(label))
            assert "passphrase" not in response and "ambiguous" in response["error"]
        assert _snapshot(store) == before
        # an administrator resolves it: node-db names its Secret, node gets its own
        volume = store.get_volume("node-db")
        volume["spec"]["partitions"][0]["secret"] = {"name": "node-db-cos-persistent"}
        store.update_volume(volume)
        assert _passphrase(soft_attest(kms.ws_url, node_b, headers=_headers("COS-PERSISTENT"))) == STATIC
        payload = legacy_get(kms, node_a, _headers("DB-COS-PERSISTENT"))
        assert payload["passphrase"] == "" and "SealedVolume node-db names it" in payload["error"]
        own = _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("DB-COS-PERSISTENT")))
        assert own != STATIC and len(own) == 44  # a Secret of its own, under another name
        assert store.get_volume("node")["spec"]["partitions"][0]["secret"]["name"] != "node-db-cos-persistent"


def test_both_default_names_make_legacy_post_pass_refuse(store, node_a, node_b):
    store.create_volume(st.new_volume("node-db", node_b.tpm_hash, [{"label": "COS-PERSISTENT"}]))
    store.create_volume(st.new_volume("node", node_a.tpm_hash, [{"label": "DB-COS-PERSISTENT"}]))
    with _kms(store) as kms:
        for node, label in ((node_a, "DB-COS-PERSISTENT"), (node_b, "COS-PERSISTENT")):
            reply = legacy_post(kms, node, _headers(label))
            assert reply is not None and "ambiguous ownership" in reply["error"]
    assert store.get_secret("node-db-cos-persistent") is None


def test_legacy_post_pass_does_not_create_another_volumes_secret(store, node_a, node_b):
    """/postPass for `node` + DB-COS-PERSISTENT would create node-db-cos-persistent, which node-db names."""
    store.create_volume(st.new_volume("node-db", node_b.tpm_hash, [
        {"label": "COS-PERSISTENT", "secret": {"name": "node-db-cos-persistent"}}]))
    store.create_volume(st.new_volume("node", node_a.tpm_hash, [{"label": "DB-COS-PERSISTENT"}]))
    with _kms(store) as kms:
        reply = legacy_post(kms, node_a, _headers("DB-COS-PERSISTENT"))
        assert reply is not None and "SealedVolume node-db names it" in reply["error"]
        assert store.get_secret("node-db-cos-persistent") is None
        assert legacy_post(kms, node_b, _headers("COS-PERSISTENT"), passphrase="b3duZXI") is None
        secret = store.get_secret("node-db-cos-persistent")
        assert secret["data"]["passphrase"] == b"b3duZXI"
        assert secret["metadata"]["labels"][kube_names.VOLUME_LABEL] == "node-db"
        # and node's /getPass does not return it
        payload = legacy_get(kms, node_a, _headers("DB-COS-PERSISTENT"))
        assert payload["passphrase"] == "" and "node-db" in payload["error"]
        assert legacy_get(kms, node_b, _headers("COS-PERSISTENT"))["passphrase"] == "b3duZXI"


# ---------------------------------------------------------------------------
# 3. Unbounded growth from an enrolled TPM


@pytest.mark.parametrize("headers, reason", [
    (_headers("L" * 30000), "label is longer than 255 bytes"),
    (_headers(), "names no partition"),
    (_headers(uuid="unknown"), "names no partition"),
    (_headers("COS\tPERSISTENT"), "label holds control characters"),
    (_headers("COS_PERSISTENT", name="vda5; rm -rf"), "name holds characters"),
    (_headers("COS_PERSISTENT", name="v" * 65), "name is longer than 64 bytes"),
    (_headers("COS_PERSISTENT", uuid="u" * 65), "uuid is longer than 64 bytes"),
    (_headers("COS_PERSISTENT", uuid="{not-a-uuid}"), "uuid holds characters"),
], ids=["30k-label", "empty", "unknown-uuid-only", "control-char", "name-chars", "long-name", "long-uuid", "uuid-chars"])
def test_bad_partition_identifiers_are_refused_audited_and_write_nothing(store, node_a, caplog, headers, reason):
    with _kms(store) as kms:
        _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("COS_PERSISTENT", "vda5")))
        before = _snapshot(store)
        with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
            response = soft_attest(kms.ws_url, node_a, headers=headers)
            payload = legacy_get(kms, node_a, headers)
            post = legacy_post(kms, node_a, headers)
            lines = _audit_lines(caplog)
        assert response["error"].startswith("Attestation verification failed: invalid partition: ")
        assert reason in response["error"]
        assert payload["passphrase"] == "" and reason in payload["error"]
        assert post is not None and reason in post["error"]
        assert _snapshot(store) == before
    lines = [line for line in lines if reason in line]  # the enrolment's own line may land here too
    assert len(lines) == 3 and all("outcome=rejected" in line for line in lines)
    assert {line.split()[1] for line in lines} == {"protocol=attestation", "protocol=legacy-get", "protocol=legacy-post"}
    assert all(len(line) < 2000 for line in lines)  # a 30,000-character label does not reach the log whole


def test_thirty_huge_labels_do_not_grow_the_volume(store, node_a):
    """The attack run's figure: 30 labels of 30,000 characters grew one SealedVolume to 911 KB."""
    with _kms(store) as kms:
        _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("COS_PERSISTENT")))
        before = _snapshot(store)
        for index in range(30):
            response = soft_attest(kms.ws_url, node_a, headers=_headers("%02d" % index + "x" * 30000))
            assert "label is longer than 255 bytes" in response["error"]
        assert _snapshot(store) == before


def test_partitions_per_tpm_are_capped(store, node_a, caplog):
    with _kms(store, max_partitions_per_tpm=3) as kms:
        for label in ("P1", "P2", "P3"):
            _passphrase(soft_attest(kms.ws_url, node_a, headers=_headers(label)))
        before = _snapshot(store, ["tofu-%s-p4" % node_a.tpm_hash[:8]])
        with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
            response = soft_attest(kms.ws_url, node_a, headers=_headers("P4"))
            lines = _audit_lines(caplog)
        assert "has 3 partitions" in response["error"] and "max_partitions_per_tpm" in response["error"]
        assert _snapshot(store, ["tofu-%s-p4" % node_a.tpm_hash[:8]]) == before
        assert any("outcome=rejected" in line and "max_partitions_per_tpm" in line for line in lines)
        # the partitions it has keep working
        assert len(_passphrase(soft_attest(kms.ws_url, node_a, headers=_headers("P2")))) == 44
