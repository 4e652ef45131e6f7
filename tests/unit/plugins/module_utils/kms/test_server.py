# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""server.py against a recording fake policy: upstream error texts, bad input, timeouts, sizes, metrics.

The same behaviour with the real policy and SQLite store is covered by
tests/integration/test_challenger_*.py; here the policy is a stub so each test
can assert it was (or was not) consulted.
"""

from __future__ import annotations

import base64
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
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import listener, metrics, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import PolicyRejection
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import StoreUnavailable
from support import go_legacy_client as go_client, raw_ws, soft_tpm
from support.challenger import ChallengerThread, connect, soft_attest
from support.soft_tpm import SoftTPM

PASSPHRASE = b"correct horse battery staple"


class FakePolicy:
    """Records calls; answers with PASSPHRASE, or raises what the test put in ``fail``."""

    def __init__(self):
        self.calls = []
        self.fail = None
        self.legacy_answer = {"passphrase": "static", "error": "", "generated_by": ""}

    def issue_passphrase(self, tpm_hash, ek_pem, pcrs, partition, defer_pcr_enrollment=False, ek_certificate=b"", ek_chain=()):
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
    with ChallengerThread(server.Challenger(policy, read_timeout=0.5, first_message_timeout=0.5, request_timeout=0.5, max_message_size=8192)) as running:
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


def _bad_tokens(node):
    ek_pem, params = node.ek_pem, node.attestation_parameters()
    nested = base64.b64encode(('{"EK": ' + "[" * 5000 + "]" * 5000 + "}").encode()).decode()
    small_ek = "-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMvYQ6zXmYC6ySh3bHr9tQ9J7BswnmWNg9c1j0HJcU3sf7w9" \
               "YfGjVXAW2QIb9Ckfi93yRVC6nw0kXSAyH3NMR+cCAwEAAQ==\n-----END PUBLIC KEY-----\n"
    return {
        "no token": ("", "missing 'Authorization: Bearer TPM...' header"),
        "not base64": ("Bearer TPMnot-base64!", "the TPM token is not base64"),
        "not an object": (protocol.BEARER_PREFIX + base64.b64encode(b"[1]").decode(), "cannot unmarshal array"),
        "deeply nested": (protocol.BEARER_PREFIX + nested, "too many nested JSON objects or arrays"),
        "RSA-512 EK": (protocol.legacy_token(small_ek, params), "the EK is RSA-512"),
        "no AK": (protocol.BEARER_PREFIX + base64.b64encode(protocol.go_json({"EK": protocol.b64encode(ek_pem.encode())}).encode()).decode(),
                  "unexpected end of JSON input"),
    }


@pytest.mark.parametrize("path", [protocol.GET_PASS_PATH, protocol.POST_PASS_PATH])
@pytest.mark.parametrize("case", ["no token", "not base64", "not an object", "deeply nested", "RSA-512 EK", "no AK"])
def test_legacy_token_refusals_close_without_a_payload_so_go_clients_retry(kms, policy, node, path, case, caplog):
    """Checklist 18, issue 13.5: tpm-helpers' Connection decodes the first frame as a Challenge and dereferences
    its EC; an {"error": ...} payload there crashes a legacy Go client. Like upstream's /getPass, the server closes
    (1008, the reason in the close frame) and writes the reason to its log and audit line."""
    token, reason = _bad_tokens(node)[case]
    with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        with pytest.raises(go_client.GoError, match=r"^reading challenge: websocket: close 1008 \(policy violation\): .*") as info:
            go_client.get(kms.ws_url + path, token, {"label": "COS_PERSISTENT"}, go_client.soft_tpm_activation(node))
        time.sleep(0.1)
    assert reason[:40] in str(info.value) or len(reason) > 100
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert "outcome=bad_request" in line and reason in line
    assert policy.calls == []


def test_legacy_wrong_answer_closes_without_a_payload_as_upstream(kms, policy, node, caplog):
    with caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        with pytest.raises(go_client.GoError) as info:
            go_client.get(kms.ws_url + protocol.GET_PASS_PATH, node.legacy_token(), {"label": "COS_PERSISTENT"},
                          lambda ec: protocol.legacy_answer(b"\x00" * 32))
        time.sleep(0.1)
    assert str(info.value) == ("reading payload from tpm get: websocket: close 1008 (policy violation): "
                               "TPM authentication failed: invalid challenge response")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert "outcome=rejected" in line and "invalid challenge response" in line and node.tpm_hash in line
    assert policy.calls == []


def test_legacy_go_client_gets_its_payload(kms, policy, node):
    payload = go_client.get(kms.ws_url + protocol.GET_PASS_PATH, node.legacy_token(), {"label": "COS_PERSISTENT"},
                            go_client.soft_tpm_activation(node))
    assert protocol.parse_legacy_payload(payload) == {"passphrase": "static", "error": "", "generated_by": ""}
    policy.legacy_answer = {"passphrase": "", "error": "No secret found for %s and COS_PERSISTENT" % node.tpm_hash, "generated_by": ""}
    payload = go_client.get(kms.ws_url + protocol.GET_PASS_PATH, node.legacy_token(), {"label": "COS_PERSISTENT"},
                            go_client.soft_tpm_activation(node))
    assert protocol.parse_legacy_payload(payload)["error"].startswith("No secret found for")  # after auth: upstream's payload


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


# -- the connection budget (issue 14.7, 13.4, 15) ---------------------------------------------------------


def _budget_kms(policy, **settings):
    settings.setdefault("max_message_size", 8192)
    return ChallengerThread(server.Challenger(policy, **settings))


def test_pings_do_not_extend_the_wait_for_the_first_message(policy):
    """aiohttp's receive(timeout) restarts on every control frame: a client pinging every 0.2 s was never closed."""
    with _budget_kms(policy, first_message_timeout=1.0, read_timeout=1.0) as kms, raw_ws.RawSocket(kms.port) as sock:
        assert sock.upgrade()[0] == 101
        started = time.monotonic()
        frames = []
        sock.sock.settimeout(0.25)
        while time.monotonic() - started < 6 and not any(op == raw_ws.OP_CLOSE for op, dummy in frames):
            sock.send(raw_ws.frame(raw_ws.OP_PING, b"keepalive"))  # every 0.25 s, as a keep-alive would
            try:
                while True:
                    frames.append(sock.read_frame())
            except socket.timeout:
                pass
        elapsed = time.monotonic() - started
    texts = [json.loads(payload)["error"] for op, payload in frames if op == raw_ws.OP_TEXT]
    assert texts == ["WebSocket read: reading attestation init: no attestation init within 1s"]
    assert 0.9 < elapsed < 3.0  # the deadline held, with margin for a loaded machine
    assert policy.calls == []


def test_the_whole_exchange_has_a_deadline(policy, node):
    with _budget_kms(policy, first_message_timeout=1.0, read_timeout=5.0, exchange_timeout=1.5) as kms:
        ws = connect(kms.ws_url)
        try:
            time.sleep(0.8)  # within the first message's deadline
            ws.send(protocol.write_json(node.init_message()))
            ws.recv()  # the challenge
            started = time.monotonic()
            error = json.loads(ws.recv())["error"]  # never answered: the exchange's deadline, not read_timeout's 5 s
            waited = time.monotonic() - started
        finally:
            ws.close()
    assert error == "Proof read: reading proof: no proof before the end of the exchange (1.5s after the upgrade)"
    assert waited < 2.5
    assert policy.calls == []


def test_a_flood_of_control_frames_is_refused(policy, caplog):
    with _budget_kms(policy) as kms, raw_ws.RawSocket(kms.port) as sock, caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        assert sock.upgrade()[0] == 101
        sock.send(b"".join(raw_ws.frame(raw_ws.OP_PING, b"x") for dummy in range(server.MAX_CONTROL_FRAMES + 1)))
        frames = sock.read_until_close()
        time.sleep(0.1)
    pongs = [f for f in frames if f[0] == raw_ws.OP_PONG]
    assert len(pongs) == server.MAX_CONTROL_FRAMES
    assert frames[-1][0] == raw_ws.OP_CLOSE and raw_ws.close_code(frames[-1][1]) == 1008
    assert any("outcome=bad_request" in r.getMessage() and "more than 16 control frames" in r.getMessage()
               for r in caplog.records if r.name == "kcrypt.audit")


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize("replace, by", [
    (_KEY.encode(), "\u00e9".encode() * 12),  # non-ASCII key: aiohttp raised ValueError, HTTP 500 (issue 14.5)
    (_KEY.encode(), b"not base64 at all!!!!!!!"),
    (_KEY.encode(), base64.b64encode(b"x" * 15) + b"="),
    (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: \xff"),  # echoed in aiohttp's 400 text: HTTP 500 (fuzzing)
    (b"Upgrade: websocket", b"Upgrade: \xffwebsocket"),
    (b"Connection: Upgrade", b"Connection: \xffUpgrade"),
])
def test_a_malformed_handshake_is_a_400_without_a_traceback(policy, replace, by, caplog):
    with _budget_kms(policy) as kms, caplog.at_level(logging.INFO):
        with raw_ws.RawSocket(kms.port) as sock:
            sock.send(raw_ws.upgrade_request(key=_KEY).replace(replace, by))
            status, _headers, body = sock.read_http()
        time.sleep(0.1)
    assert status == 400 and (b"Sec-WebSocket" in body or b"expects a WebSocket upgrade" in body)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    audit = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert len(audit) == 1 and "outcome=bad_request" in audit[0] and "WebSocket handshake refused" in audit[0]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello on the plain port
    b"GET /tpm-attestation HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n",
])
def test_malformed_http_is_one_log_line_not_a_traceback(policy, request_bytes, caplog):
    """aiohttp logged every malformed request it answered with 400 as an ERROR with a traceback (3,024 in the attack run)."""
    with _budget_kms(policy) as kms, caplog.at_level(logging.DEBUG):
        with raw_ws.RawSocket(kms.port) as sock:
            sock.send(request_bytes)
            status, _headers, _body = sock.read_http()
        time.sleep(0.1)
    assert status == 400
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_busy_kms_answers_503_with_retry_after_and_keeps_answering_operations(policy, node):
    """Issue 15: beyond max_connections an upgrade gets a retryable 503 before any work; probes and /metrics still answer."""
    limits = listener.ConnectionLimits(max_connections=2, worker_exchanges=2, worker_connections=64, per_client=0)
    with _budget_kms(policy, limits=limits, first_message_timeout=10.0) as kms:
        held = [connect(kms.ws_url), connect(kms.ws_url)]  # upgraded, no init yet: two exchanges in flight
        try:
            with raw_ws.RawSocket(kms.port) as sock:
                status, headers, body = sock.upgrade()
                assert sock.closed_by_server(5)  # Connection: close, so the slot is free at once
            for path in ("/healthz", "/readyz", "/metrics"):
                assert urllib.request.urlopen(kms.url + path, timeout=5).status == 200
            text = urllib.request.urlopen(kms.url + "/metrics", timeout=5).read().decode()
            with pytest.raises(websocket.WebSocketBadStatusException) as info:  # what a websocket library reports
                connect(kms.ws_url, path=protocol.GET_PASS_PATH)
            assert info.value.status_code == 503
        finally:
            for ws in held:
                ws.close()
        assert protocol.parse_response(soft_attest(kms.ws_url, node))[0] == PASSPHRASE  # capacity is back
    assert status == 503 and headers["retry-after"] == "1" and headers.get("connection", "").lower() == "close"
    assert body.startswith(b"KMS busy")
    assert 'kcrypt_connections_refused_total{reason="max_connections"} 1' in text
    assert "kcrypt_attestations_in_flight 2" in text
    assert [c[0] for c in policy.calls] == ["issue"]


def test_max_connections_counts_every_worker(policy):
    """Workers share one metrics block; the cap is the sum of their exchanges in flight."""
    shared = metrics.Metrics.shared_array(2)
    other_worker = metrics.Metrics(shared, 1)
    other_worker.in_flight = 3
    limits = listener.ConnectionLimits(max_connections=3, worker_exchanges=3, worker_connections=64, per_client=0)
    with _budget_kms(policy, limits=limits, metrics=metrics.Metrics(shared, 0)) as kms:
        with raw_ws.RawSocket(kms.port) as sock:
            assert sock.upgrade()[0] == 503
        other_worker.in_flight = 2
        with raw_ws.RawSocket(kms.port) as sock:
            assert sock.upgrade()[0] == 101


def test_recovery_escrow_shares_the_admission_and_the_connection_budget(policy, node):
    """/recovery-escrow counts against max_connections like /tpm-attestation (503 + Retry-After beyond, before any
    work), and its first message has the same deadline."""
    limits = listener.ConnectionLimits(max_connections=1, worker_exchanges=1, worker_connections=64, per_client=0)
    with _budget_kms(policy, limits=limits, first_message_timeout=1.0, read_timeout=1.0) as kms:
        held = connect(kms.ws_url, path=protocol.RECOVERY_ESCROW_PATH)  # an escrow in flight, silent
        try:
            with raw_ws.RawSocket(kms.port) as sock:
                status, headers, dummy = sock.upgrade()  # /tpm-attestation while the escrow holds the only place
            with pytest.raises(websocket.WebSocketBadStatusException) as info:
                connect(kms.ws_url, path=protocol.RECOVERY_ESCROW_PATH)
            started = time.monotonic()
            error = json.loads(held.recv())["error"]  # the held escrow is closed at the first message's deadline
            waited = time.monotonic() - started
        finally:
            held.close()
        assert status == 503 and headers["retry-after"] == "1"
        assert info.value.status_code == 503 and info.value.resp_headers["retry-after"] == "1"
        assert error == "WebSocket read: reading attestation init: no attestation init within 1s" and waited < 3.0
        time.sleep(0.2)  # the audit and in-flight count are updated after the close
        answer, closed = _escrow(kms, node, b"k" * 32)  # capacity is back
        assert answer == {"escrowed": True} and closed
    assert [call[0] for call in policy.calls] == ["escrow"]
