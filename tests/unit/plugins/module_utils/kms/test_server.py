# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""server.py against a recording fake policy: upstream error texts, bad input, timeouts, sizes, metrics.

The same behaviour with the real policy and SQLite store is covered by
tests/integration/test_challenger_*.py; here the policy is a stub so each test
can assert it was (or was not) consulted.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
import websocket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import metrics, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import PolicyRejection
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import StoreUnavailable
from support import soft_tpm
from support.challenger import ChallengerThread, connect, soft_attest
from support.soft_tpm import SoftTPM

PASSPHRASE = b"correct horse battery staple"


class FakePolicy:
    """Records calls; answers with PASSPHRASE, or raises what the test put in ``fail``."""

    def __init__(self):
        self.calls = []
        self.fail = None
        self.legacy_answer = {"passphrase": "static", "error": "", "generated_by": ""}

    def issue_passphrase(self, tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment=False):
        self.calls.append(("issue", tpm_hash, pcrs, partition, defer_pcr_enrollment))
        if self.fail:
            raise self.fail  # pylint: disable=raising-bad-type
        return PASSPHRASE

    def legacy_get_pass(self, tpm_hash, partition):
        self.calls.append(("get", tpm_hash, partition))
        if self.fail:
            raise self.fail  # pylint: disable=raising-bad-type
        return dict(self.legacy_answer)

    def legacy_post_pass(self, tpm_hash, partition, payload):
        self.calls.append(("post", tpm_hash, partition, payload))
        if self.fail:
            raise self.fail  # pylint: disable=raising-bad-type
        return True

    def escrow_recovery_key(self, tpm_hash, ek_pem, pcrs, partition, recovery_key):
        self.calls.append(("escrow", tpm_hash, partition, recovery_key))
        if self.fail:
            raise self.fail  # pylint: disable=raising-bad-type
        return "node-data-recovery"


@pytest.fixture(scope="module")
def keys():
    return soft_tpm.key_pool(4)


@pytest.fixture
def node(keys):
    return SoftTPM(keys[0], keys[1])


@pytest.fixture
def policy():
    return FakePolicy()


@pytest.fixture
def kms(policy):
    with ChallengerThread(server.Challenger(policy, read_timeout=0.5, max_message_size=8192)) as running:
        yield running


def _closed(ws):
    """True when the server closed the connection after its last message."""
    try:
        opcode, _data = ws.recv_data(control_frame=True)
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        return True
    return opcode == websocket.ABNF.OPCODE_CLOSE


def _exchange(kms, frames, headers=None):
    """Send ``frames`` one by one, reading one answer after each; returns the answers and whether the server closed."""
    ws = connect(kms.ws_url, headers=headers)
    answers = []
    try:
        for frame in frames:
            ws.send(frame)
            answers.append(json.loads(ws.recv()))
        return answers, _closed(ws)
    finally:
        ws.close()


def test_round_trip_passes_partition_pcrs_and_deferral(kms, policy, node):
    node.pcr_extend(11, b"uki")
    response = soft_attest(kms.ws_url, node, headers={"label": "COS_OEM", "name": "vda2", "uuid": "unknown"}, defer=True)
    assert protocol.parse_response(response) == (PASSPHRASE, "")
    (call,) = policy.calls
    assert call[1] == node.tpm_hash
    assert call[2] == {"0": "00" * 32, "7": "00" * 32, "11": node.pcrs[11].hex()}
    assert (call[3].label, call[3].device_name, call[3].uuid) == ("COS_OEM", "vda2", "unknown")
    assert call[4] is True


def test_newest_protocol_frames_are_text_with_a_newline(kms, policy, node):
    """gorilla's WriteJSON: every server message is a text frame holding compact JSON and one newline (checklist 7)."""
    ws = connect(kms.ws_url)
    try:
        ws.send(protocol.write_json(node.init_message()))
        opcode, challenge = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_TEXT and re.match(
            rb'^\{"challenge":\{"Credential":"[A-Za-z0-9+/]+=*","Secret":"[A-Za-z0-9+/]+=*"\}\}\n$', challenge)
        ws.send(protocol.write_json(node.proof_message(json.loads(challenge))))
        opcode, response = ws.recv_data()
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_TEXT and response == b'{"passphrase":"%s"}\n' % protocol.b64encode(PASSPHRASE).encode()
    policy.fail = PolicyRejection("TPM is quarantined")
    ws = connect(kms.ws_url)
    try:
        ws.send(protocol.write_json(node.init_message()))
        ws.send(protocol.write_json(node.proof_message(json.loads(ws.recv()))))
        opcode, error = ws.recv_data()
        assert (opcode, error) == (websocket.ABNF.OPCODE_TEXT, b'{"error":"Attestation verification failed: TPM is quarantined"}\n')
        assert _closed(ws)  # checklist 15: the error, then the connection ends
    finally:
        ws.close()


def test_policy_rejection_uses_upstream_wording(kms, policy, node):
    policy.fail = PolicyRejection("TPM is quarantined")
    assert soft_attest(kms.ws_url, node) == {"error": "Attestation verification failed: TPM is quarantined"}


def test_store_failure_closes_with_1011_so_nodes_retry(kms, policy, node):
    policy.fail = StoreUnavailable("database is locked")
    ws = connect(kms.ws_url)
    try:
        ws.send(protocol.write_json(node.init_message()))
        ws.send(protocol.write_json(node.proof_message(json.loads(ws.recv()))))
        opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 1011
    assert b"KMS temporarily unavailable" in data and b"database is locked" in data


@pytest.mark.parametrize(
    "frame, expected",
    [
        ("{not json", "WebSocket read: reading attestation init: invalid JSON"),
        ('{"ek_public": []}', "WebSocket read: reading attestation init: json: cannot unmarshal array"),
        ('{"ek_public": "AAAA", "ak_params": {}}', "Challenge generation: generating challenge: parse EK SPKI"),
    ],
)
def test_malformed_init_gets_an_error_and_is_closed(kms, policy, frame, expected):
    answers, closed = _exchange(kms, [frame])
    assert answers[0]["error"].startswith(expected)
    assert closed and policy.calls == []


def test_wrong_ak_attributes_are_refused(kms, policy, node):
    params = node.attestation_parameters(public=node.ak_public_area(attributes=soft_tpm.AK_ATTRIBUTES & ~0x00010000))
    init = protocol.init_message(node.ek_spki_der, params)
    answers, closed = _exchange(kms, [protocol.write_json(init)])
    assert answers == [{"error": "Challenge generation: generating challenge: provided key is not limited to attestation"}]
    assert closed and policy.calls == []


def test_forged_and_replayed_credential_answers(kms, policy, node):
    ws = connect(kms.ws_url)
    try:
        ws.send(protocol.write_json(node.init_message()))
        recorded = node.proof_message(json.loads(ws.recv()))
    finally:
        ws.close()
    forged = dict(recorded, secret=protocol.b64encode(b"\x00" * 32))
    for proof in (recorded, forged):  # recorded = a replay into a new exchange
        ws = connect(kms.ws_url)
        try:
            ws.send(protocol.write_json(node.init_message()))
            ws.recv()
            ws.send(protocol.write_json(proof))
            assert json.loads(ws.recv()) == {"error": "Attestation verification failed: invalid secret"}
            assert _closed(ws)
        finally:
            ws.close()
    assert policy.calls == []


def test_forged_quote_is_refused(kms, policy, node, keys):
    ws = connect(kms.ws_url)
    try:
        ws.send(protocol.write_json(node.init_message()))
        ec = protocol.parse_challenge(json.loads(ws.recv()))
        secret = node.activate_credential(ec.credential, ec.secret)
        node.pcr_extend(0, b"tampered firmware")
        values = {0: b"\x00" * 32, 7: node.pcrs[7], 11: node.pcrs[11]}  # claims the old PCR0
        attest = soft_tpm.quote_attest(node.ak_name, secret, values)
        forged = protocol.PCRQuote("2", attest, soft_tpm._rsassa(keys[3], attest), values)  # not signed by the AK
        ws.send(protocol.write_json(protocol.proof_message(secret, forged)))
        error = json.loads(ws.recv())["error"]
    finally:
        ws.close()
    assert error.startswith("Attestation verification failed: PCR quote verification failed: quote signature verification failed")
    assert policy.calls == []


def test_required_nonce_rejects_head_clients_and_when_supported_accepts_them(policy, node):
    with ChallengerThread(server.Challenger(policy, nonce_mode="required")) as kms:
        response = soft_attest(kms.ws_url, node, nonce=False)
        assert "quote was not produced for this attestation" in response["error"]
        assert protocol.parse_response(soft_attest(kms.ws_url, node, nonce=True))[0] == PASSPHRASE
    with ChallengerThread(server.Challenger(policy)) as kms:
        assert protocol.parse_response(soft_attest(kms.ws_url, node, nonce=False))[0] == PASSPHRASE


def test_silent_client_gets_an_error_and_is_closed(kms, policy, node):
    ws = connect(kms.ws_url)
    try:
        started = time.monotonic()
        assert json.loads(ws.recv()) == {"error": "WebSocket read: reading attestation init: no attestation init within 0.5s"}
        assert time.monotonic() - started < 3
        assert _closed(ws)
    finally:
        ws.close()
    ws = connect(kms.ws_url)  # silent after the challenge
    try:
        ws.send(protocol.write_json(node.init_message()))
        ws.recv()
        assert json.loads(ws.recv()) == {"error": "Proof read: reading proof: no proof within 0.5s"}
    finally:
        ws.close()
    assert policy.calls == []


def test_oversized_frame_closes_with_1009(kms, policy):
    ws = connect(kms.ws_url)
    try:
        ws.send("x" * 9000)
        opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1009
    assert policy.calls == []


def test_idle_tcp_connection_is_dropped(kms):
    with socket.create_connection(("127.0.0.1", kms.port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # server closed the connection that never sent a request
        assert time.monotonic() - started < 4


def test_plain_http_on_websocket_endpoints_is_a_400(kms):
    for path in (protocol.ATTESTATION_PATH, protocol.GET_PASS_PATH):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(kms.url + path, timeout=5)
        assert info.value.code == 400 and b"expects a WebSocket upgrade" in info.value.read()


def test_only_root_paths_are_served(kms, node):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(kms.ws_url, path="/challenge/tpm-attestation")
    assert info.value.status_code == 404


def test_server_keeps_serving_after_bad_input(kms, policy, node):
    _exchange(kms, ["garbage"])
    ws = connect(kms.ws_url)
    ws.send("x" * 9000)
    ws.close()
    assert protocol.parse_response(soft_attest(kms.ws_url, node))[0] == PASSPHRASE


def test_legacy_get_pass(kms, policy, node):
    ws = connect(kms.ws_url, path=protocol.GET_PASS_PATH,
                 headers={"Authorization": node.legacy_token(), "label": "COS_PERSISTENT", "name": "", "uuid": ""})
    try:
        opcode, frame = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY and frame.startswith(b'{"EC":{"Credential":')
        ws.send_binary(node.legacy_answer(frame))
        opcode, payload = ws.recv_data()
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_BINARY
    assert payload == b'{"passphrase":"static","error":"","generated_by":""}\n'
    assert policy.calls[0][:2] == ("get", node.tpm_hash)


def test_legacy_path_with_a_doubled_slash_is_served(kms, policy, node):
    """A legacy node configured with a trailing slash asks for //getPass (upstream fails it, kairos#1248)."""
    ws = connect(kms.ws_url, path="/" + protocol.GET_PASS_PATH, headers={"Authorization": node.legacy_token(), "label": "COS_OEM"})
    try:
        ws.send_binary(node.legacy_answer(ws.recv()))
        assert protocol.parse_legacy_payload(ws.recv())["passphrase"] == "static"
    finally:
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(kms.ws_url, path="//elsewhere")


def test_legacy_bad_token_and_wrong_answer(kms, policy, node):
    ws = connect(kms.ws_url, path=protocol.GET_PASS_PATH, headers={"Authorization": "Bearer TPMnot-base64!"})
    try:
        assert protocol.parse_legacy_payload(ws.recv())["error"].startswith("the TPM token is not base64")
    finally:
        ws.close()
    ws = connect(kms.ws_url, path=protocol.GET_PASS_PATH, headers={"Authorization": node.legacy_token()})
    try:
        ws.recv()
        ws.send_binary(protocol.legacy_answer(b"\x00" * 32))
        assert protocol.parse_legacy_payload(ws.recv())["error"] == "TPM authentication failed: invalid challenge response"
    finally:
        ws.close()
    assert policy.calls == []


def test_legacy_post_pass(kms, policy, node):
    ws = connect(kms.ws_url, path=protocol.POST_PASS_PATH, headers={"Authorization": node.legacy_token(), "label": "COS_OEM"})
    try:
        ws.send_binary(node.legacy_answer(ws.recv()))
        ws.send(protocol.write_json({"passphrase": "blob", "error": "", "generated_by": "tpm"}))
        assert _closed(ws)  # upstream answers nothing on success
    finally:
        ws.close()
    assert policy.calls == [("post", node.tpm_hash, policy.calls[0][2], {"passphrase": "blob", "error": "", "generated_by": "tpm"})]
    policy.fail = PolicyRejection("no TPM Hash found for %s" % node.tpm_hash)
    ws = connect(kms.ws_url, path=protocol.POST_PASS_PATH, headers={"Authorization": node.legacy_token()})
    try:
        ws.send_binary(node.legacy_answer(ws.recv()))
        ws.send(protocol.write_json({"passphrase": "blob", "error": "", "generated_by": "tpm"}))
        assert protocol.parse_legacy_payload(ws.recv())["error"] == "no TPM Hash found for %s" % node.tpm_hash
    finally:
        ws.close()


def test_health_ready_and_metrics(policy, node):
    state = {"ready": True}

    def ready():
        if not state["ready"]:
            raise StoreUnavailable("cannot open /nonexistent/kms.db")

    with ChallengerThread(server.Challenger(policy, ready_check=ready)) as kms:
        assert urllib.request.urlopen(kms.url + "/healthz").read() == b"ok\n"
        assert urllib.request.urlopen(kms.url + "/readyz").read() == b"ok\n"
        state["ready"] = False
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(kms.url + "/readyz")
        assert info.value.code == 503 and b"cannot open /nonexistent/kms.db" in info.value.read()
        soft_attest(kms.ws_url, node)
        policy.fail = PolicyRejection("TPM is quarantined")
        soft_attest(kms.ws_url, node)
        _exchange(kms, ["{"])
        response = urllib.request.urlopen(kms.url + "/metrics")
        text = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'kcrypt_attestations_total{protocol="attestation",outcome="success"} 1' in text
    assert 'kcrypt_attestations_total{protocol="attestation",outcome="rejected"} 1' in text
    assert 'kcrypt_attestations_total{protocol="attestation",outcome="bad_request"} 1' in text
    assert 'kcrypt_attestation_duration_seconds_count{protocol="attestation"} 3' in text
    assert 'kcrypt_attestations_in_flight 0' in text


def test_audit_line_per_attestation_without_the_passphrase(kms, policy, node, caplog):
    with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        soft_attest(kms.ws_url, node, headers={"label": "COS_PERSISTENT", "name": "vda5", "uuid": ""})
        time.sleep(0.1)  # the audit line is written after the reply
    lines = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert len(lines) == 1
    line = lines[0]
    assert "protocol=attestation" in line and "outcome=success" in line and node.tpm_hash in line
    assert "label=COS_PERSISTENT, name=vda5" in line and "duration_ms=" in line and "nonce=bound" in line
    assert PASSPHRASE.decode() not in line and protocol.b64encode(PASSPHRASE) not in line


def test_thread_store_calls_give_the_same_answers(policy, node):
    with ChallengerThread(server.Challenger(policy, store_calls="thread")) as kms:
        assert protocol.parse_response(soft_attest(kms.ws_url, node))[0] == PASSPHRASE
        policy.fail = PolicyRejection("TPM is quarantined")
        assert soft_attest(kms.ws_url, node)["error"] == "Attestation verification failed: TPM is quarantined"


def test_metrics_of_worker_slots_render_as_one_sum():
    shared = metrics.Metrics.shared_array(2)
    first, second = metrics.Metrics(shared, 0), metrics.Metrics(shared, 1)
    first.observe(metrics.PROTOCOL_ATTESTATION, metrics.OUTCOME_SUCCESS, 0.004)
    second.observe(metrics.PROTOCOL_ATTESTATION, metrics.OUTCOME_SUCCESS, 0.3)
    second.observe(metrics.PROTOCOL_LEGACY_GET, metrics.OUTCOME_REJECTED, 20.0)  # beyond the last bucket: +Inf only
    second.in_flight += 1
    for text in (first.render(), second.render()):  # whichever worker answers /metrics
        assert 'kcrypt_attestations_total{protocol="attestation",outcome="success"} 2' in text
        assert 'kcrypt_attestations_total{protocol="legacy-get",outcome="rejected"} 1' in text
        assert 'kcrypt_attestation_duration_seconds_bucket{protocol="attestation",le="0.0025"} 0' in text
        assert 'kcrypt_attestation_duration_seconds_bucket{protocol="attestation",le="0.005"} 1' in text  # cumulative
        assert 'kcrypt_attestation_duration_seconds_bucket{protocol="attestation",le="0.5"} 2' in text
        assert 'kcrypt_attestation_duration_seconds_bucket{protocol="legacy-get",le="10.0"} 0' in text
        assert 'kcrypt_attestation_duration_seconds_bucket{protocol="legacy-get",le="+Inf"} 1' in text
        assert 'kcrypt_attestation_duration_seconds_sum{protocol="attestation"} 0.304000' in text
        assert 'kcrypt_attestation_duration_seconds_count{protocol="attestation"} 2' in text
        assert "kcrypt_attestations_in_flight 1" in text
    assert first.in_flight == 0 and second.in_flight == 1
    with pytest.raises(ValueError):
        metrics.Metrics(shared, 2)


# -- recovery-key escrow ------------------------------------------------------------------------


def _escrow(kms, node, recovery_key, nonce=True, headers=None):
    """One /recovery-escrow exchange; returns (the answer dict or the close frame's data, whether it closed)."""
    ws = connect(kms.ws_url, path=protocol.RECOVERY_ESCROW_PATH, headers=headers)
    try:
        ws.send(protocol.write_json(node.init_message()))
        proof = node.proof_message(json.loads(ws.recv()), nonce=nonce)
        if recovery_key is not None:
            proof["recovery_key"] = protocol.b64encode(recovery_key)
        ws.send(protocol.write_json(proof))
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return data, True
        return json.loads(data), _closed(ws)
    finally:
        ws.close()


def test_recovery_escrow_stores_the_key_and_audits_without_it(kms, policy, node, caplog):
    key = b"cbdefghi-" * 7 + b"cbdefghi"
    with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        answer, closed = _escrow(kms, node, key, headers={"label": "DATA", "name": "vdb1", "uuid": ""})
        time.sleep(0.1)  # the audit line is written after the reply
    assert answer == {"escrowed": True} and closed
    assert policy.calls == [("escrow", node.tpm_hash, PartitionRef(label="DATA", device_name="vdb1"), key)]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert "protocol=recovery-escrow" in line and "outcome=success" in line and "secret=node-data-recovery" in line
    assert "nonce=bound" in line and key.decode() not in line and protocol.b64encode(key) not in line


@pytest.mark.parametrize("recovery_key, nonce, expected", [
    (None, True, "recovery_key must be 16 to 256 bytes, got 0"),
    (b"k" * 15, True, "recovery_key must be 16 to 256 bytes, got 15"),
    (b"k" * 257, True, "recovery_key must be 16 to 256 bytes, got 257"),
    (b"k" * 32, False, "qualifying data does not match the nonce"),  # /tpm-attestation takes it (when-supported)
])
def test_recovery_escrow_refusals_never_reach_the_policy(kms, policy, node, recovery_key, nonce, expected):
    answer, closed = _escrow(kms, node, recovery_key, nonce=nonce)
    assert expected in answer["error"] and closed
    assert policy.calls == []


def test_recovery_escrow_policy_rejection_and_store_failure(kms, policy, node):
    policy.fail = PolicyRejection("partition label=X is not registered for this TPM")
    answer, closed = _escrow(kms, node, b"k" * 32, headers={"label": "X", "name": "", "uuid": ""})
    assert answer == {"error": "Attestation verification failed: partition label=X is not registered for this TPM"}
    policy.fail = StoreUnavailable("database is locked")
    data, closed = _escrow(kms, node, b"k" * 32)
    assert closed and int.from_bytes(data[:2], "big") == 1011 and b"database is locked" in data
