# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What our node client puts on the wire, byte for byte, as a real Kairos KMS receives it.

A recording peer plays upstream's Go server (spec §2.A/§2.B: HEAD semantics, nonce off)
and keeps every handshake header and every frame with its opcode; the client runs on
swtpm. The assertions are on the recorded bytes: key names and order, base64 flavours,
the newline ``WriteJSON`` adds, text vs binary frames, the PCR map order, the Bearer
token's EK PEM type, one transient AK across retries, the mDNS ``Host`` header, and the
404 a peer of the other protocol generation answers (checklist 1, 4-9, 12, 16, 18-20, 47, 50).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid

import pytest
import tpm2_pytss as tss

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns, messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob as tpm_blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerThread
from support.tls import make_pki

from aiohttp import WSMsgType, web

PASSPHRASE = b"static passphrase from the peer"
STD_B64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


class RecordingPeer:
    """An upstream-like KMS on 127.0.0.1 that records what the node sends.

    ``paths``: the endpoints it serves (a newest server has only /tpm-attestation, a
    legacy one only /getPass and /postPass). ``drop_first``: hang up after the first
    init message, so the client has to retry. ``bad_challenge``: the frame to send
    instead of a challenge.
    """

    read_timeout = 10.0

    def __init__(self, paths=(protocol.ATTESTATION_PATH, protocol.GET_PASS_PATH, protocol.POST_PASS_PATH),
                 drop_first=False, bad_challenge=None):
        self.paths = paths
        self.drop_first = drop_first
        self.bad_challenge = bad_challenge
        self.connections = []  # {"path", "headers", "frames": [(opcode, data)], "tpm_hash"}
        self.stored = {}  # legacy: label -> the posted payload

    def application(self):
        app = web.Application()
        handlers = {protocol.ATTESTATION_PATH: self.attestation, protocol.GET_PASS_PATH: self.get_pass,
                    protocol.POST_PASS_PATH: self.post_pass}
        for path in self.paths:
            app.router.add_get(path, handlers[path])
        return app

    async def _open(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        record = {"path": request.path, "headers": dict(request.headers), "frames": [], "tpm_hash": ""}
        self.connections.append(record)
        return ws, record

    @staticmethod
    async def _read(ws, record):
        msg = await ws.receive(timeout=10)
        assert msg.type in (WSMsgType.TEXT, WSMsgType.BINARY), msg
        record["frames"].append((msg.type, msg.data))
        return msg.data

    async def attestation(self, request):
        ws, record = await self._open(request)
        session = attestation.AttestationSession(attestation.NONCE_OFF)  # upstream HEAD ignores extraData
        init = await self._read(ws, record)
        if self.drop_first and len(self.connections) == 1:
            await ws.close()
            return ws
        if self.bad_challenge is not None:
            await ws.send_str(self.bad_challenge)
            await ws.close()
            return ws
        await ws.send_str(protocol.write_json(session.challenge(init)))
        record["tpm_hash"] = session.tpm_hash
        session.verify(await self._read(ws, record))
        await ws.send_str(protocol.write_json(protocol.response_message(passphrase=PASSPHRASE)))
        await ws.close()
        return ws

    async def _legacy_auth(self, request, ws, record):
        auth = attestation.LegacyAuth(request.headers["Authorization"])
        record["tpm_hash"] = auth.tpm_hash
        await ws.send_bytes(auth.challenge_frame())
        auth.check_answer(await self._read(ws, record))
        return auth

    async def get_pass(self, request):
        ws, record = await self._open(request)
        auth = await self._legacy_auth(request, ws, record)
        label = request.headers.get("label", "")
        posted = self.stored.get(label)
        if posted is None:
            payload = protocol.legacy_payload(error="No secret found for %s and %s" % (auth.tpm_hash, label))
        else:
            payload = protocol.legacy_payload(passphrase=posted["passphrase"], generated_by=posted["generated_by"])
        await ws.send_bytes(payload)
        await ws.close()
        return ws

    async def post_pass(self, request):
        ws, record = await self._open(request)
        await self._legacy_auth(request, ws, record)
        posted = protocol.parse_legacy_payload(await self._read(ws, record))
        self.stored.setdefault(request.headers.get("label", ""), posted)
        await ws.close()  # upstream answers nothing on success
        return ws


@pytest.fixture(scope="module")
def node(swtpm_factory):
    """A swtpm with an EK certificate (a vendor TPM), and its identity."""
    started = swtpm_factory(ek_cert=True)
    with TPM(started.tcti) as tpm:
        started.ek = tpm.endorsement_key()
    yield started
    started.stop()


def _config(url, node, **kwargs):
    kwargs.setdefault("attempts", 2)
    kwargs.setdefault("retry_delay", 0.05)
    return client.ClientConfig(url, tpm_device=node.tcti, **kwargs)


def _json_frame(opcode, data, expected_opcode):
    """The JSON object in a frame that must be ``expected_opcode`` and hold compact JSON plus one newline."""
    assert opcode == expected_opcode
    text = data if isinstance(data, str) else data.decode("utf-8")
    assert text.endswith("}\n") and not text.endswith("\n\n") and text.count("\n") == 1  # Go's WriteJSON/Encode
    assert ": " not in text and ", " not in text  # compact, as encoding/json writes it
    return json.loads(text)


def _std_b64(value):
    assert isinstance(value, str) and STD_B64.match(value), value  # Go []byte: standard alphabet, padded
    return base64.b64decode(value, validate=True)


def test_newest_protocol_bytes_and_one_ak_across_retries(node):
    peer = RecordingPeer(drop_first=True)
    with ChallengerThread(peer) as kms:
        passphrase = client.get_passphrase(_config(kms.url + "/", node), PartitionRef(label="COS_PERSISTENT", device_name="vda5"))
    assert passphrase == PASSPHRASE
    first, second = peer.connections
    assert first["path"] == second["path"] == "/tpm-attestation"  # trailing slash stripped (checklist 5)
    for connection in (first, second):  # checklist 6: always sent, empty when unknown
        headers = connection["headers"]
        assert (headers["label"], headers["name"], headers["uuid"]) == ("COS_PERSISTENT", "vda5", "")
        assert "Authorization" not in headers
    assert first["frames"][0] == second["frames"][0]  # checklist 16: the same transient AK on every attempt

    # Message 1 (checklist 7-9): text frame, keys in Go's struct order, defer_pcr_enrollment omitted; then our
    # optional ek_certificate (a Go server's encoding/json skips a key its struct does not have).
    init = _json_frame(*second["frames"][0], WSMsgType.TEXT)
    assert list(init) == ["ek_public", "ak_params", "ek_certificate"]
    assert _std_b64(init["ek_certificate"]) == node.ek.certificate_der  # the EK certificate from NV 0x01c00002
    spki = _std_b64(init["ek_public"])
    assert spki == node.ek.spki_der and hashlib.sha256(spki).hexdigest() == node.ek.tpm_hash == second["tpm_hash"]
    params = init["ak_params"]
    assert list(params) == ["Public", "UseTCSDActivationFormat", "CreateData", "CreateAttestation", "CreateSignature"]
    assert params["UseTCSDActivationFormat"] is False
    raw = {key: _std_b64(params[key]) for key in ("Public", "CreateData", "CreateAttestation", "CreateSignature")}
    # No TPM2B size prefixes: each field unmarshals exactly as its TPMT/TPMS type.
    assert tss.TPMT_PUBLIC.unmarshal(raw["Public"])[1] == len(raw["Public"])
    assert tss.TPMS_CREATION_DATA.unmarshal(raw["CreateData"])[1] == len(raw["CreateData"])
    assert tss.TPMS_ATTEST.unmarshal(raw["CreateAttestation"])[1] == len(raw["CreateAttestation"])
    assert tss.TPMT_SIGNATURE.unmarshal(raw["CreateSignature"])[1] == len(raw["CreateSignature"])

    # Message 3 (checklist 12): secret + pcr_quote, PCR keys as Go orders map[int] keys.
    proof = _json_frame(*second["frames"][1], WSMsgType.TEXT)
    assert list(proof) == ["secret", "pcr_quote"] and len(_std_b64(proof["secret"])) == 32
    quote = proof["pcr_quote"]
    assert list(quote) == ["quote", "pcrs"] and list(quote["quote"]) == ["version", "quote", "signature"]
    assert quote["quote"]["version"] == "2"
    assert list(quote["pcrs"]) == ["0", "11", "7"]
    with TPM(node.tcti) as tpm:
        values = tpm.pcr_read([0, 7, 11])
    assert {int(k): _std_b64(v) for k, v in quote["pcrs"].items()} == values
    attest = tss.TPMS_ATTEST.unmarshal(_std_b64(quote["quote"]["quote"]))[0]
    assert attest.type == tss.TPM2_ST.ATTEST_QUOTE and attest.magic == tss.TPM2_GENERATED.VALUE
    (selection,) = attest.attested.quote.pcrSelect
    assert selection.hash == tss.TPM2_ALG.SHA256 and bytes(selection.pcrSelect)[: selection.sizeofSelect] == b"\x81\x08\x00"
    # Our documented deviation from HEAD: the quote carries the activation secret (upstream's pending fix).
    assert bytes(attest.extraData) == _std_b64(proof["secret"])
    signature = tss.TPMT_SIGNATURE.unmarshal(_std_b64(quote["quote"]["signature"]))[0]
    assert signature.sigAlg == tss.TPM2_ALG.RSASSA and signature.signature.rsassa.hash == tss.TPM2_ALG.SHA256


@pytest.mark.parametrize("ek_cert", [True, False], ids=["ek-certificate", "template-ek"])
def test_legacy_protocol_bytes_and_the_same_tpm_hash_as_the_newest(swtpm_factory, node, ek_cert):
    tpm_node = node if ek_cert else swtpm_factory(ek_cert=False)
    try:
        _check_legacy_exchange(tpm_node, ek_cert)
    finally:
        if tpm_node is not node:
            tpm_node.stop()


def _check_legacy_exchange(tpm_node, ek_cert):
    with TPM(tpm_node.tcti) as tpm:
        ek = tpm.endorsement_key()
    assert (ek.certificate is not None) is ek_cert
    peer = RecordingPeer()
    with ChallengerThread(peer) as kms:
        assert client.get_passphrase(_config(kms.url, tpm_node), PartitionRef(label="COS_OEM")) == PASSPHRASE
        legacy = client.get_passphrase(_config(kms.url, tpm_node, protocol="legacy"), PartitionRef(label="COS_PERSISTENT"))
    newest, get_missing, post, get_stored = peer.connections
    assert [c["path"] for c in peer.connections] == ["/tpm-attestation", "/getPass", "/postPass", "/getPass"]
    # Checklist 4: the server gets one TPM hash from ek_public and from the Bearer token's PEM.
    assert newest["tpm_hash"] == get_missing["tpm_hash"] == post["tpm_hash"] == ek.tpm_hash

    # Checklist 18: Bearer TPM + base64-std(JSON {"EK": b64(PEM), "AK": {...}}); PEM type by EK kind.
    token = get_missing["headers"]["Authorization"]
    assert token.startswith("Bearer TPM")
    body = _std_b64(token[len("Bearer TPM"):]).decode()
    assert ": " not in body and not body.endswith("\n")  # json.Marshal
    token_json = json.loads(body)
    assert list(token_json) == ["EK", "AK"]
    pem = _std_b64(token_json["EK"]).decode()
    if ek_cert:
        assert pem == ek.certificate_pem and pem.startswith("-----BEGIN CERTIFICATE-----\n")
    else:
        assert pem == ek.public_pem and pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert list(token_json["AK"]) == ["Public", "UseTCSDActivationFormat", "CreateData", "CreateAttestation", "CreateSignature"]
    for connection in (get_missing, post, get_stored):
        assert connection["headers"]["Authorization"] == token  # one AK for the whole call
        headers = connection["headers"]
        assert (headers["label"], headers["name"], headers["uuid"]) == ("COS_PERSISTENT", "", "")
        # The answer to the credential challenge: a binary frame, json.Encoder's newline.
        opcode, answer = connection["frames"][0]
        assert opcode == WSMsgType.BINARY and re.match(rb'^\{"Secret":"[A-Za-z0-9+/]+=*"\}\n$', answer)
        assert len(_std_b64(json.loads(answer)["Secret"])) == 32

    # Checklist 19-20: "No secret found for" -> generate, encrypt to c_index, post as a text frame.
    payload = _json_frame(*post["frames"][1], WSMsgType.TEXT)
    assert list(payload) == ["passphrase", "error", "generated_by"]
    assert payload["error"] == "" and payload["generated_by"] == "tpm"
    assert re.match(r"^[A-Za-z0-9_-]{342}$", payload["passphrase"])  # base64url, no padding, of 256 bytes
    assert re.match(rb"^[0-9a-z]{32}$", legacy)
    with TPM(tpm_node.tcti) as tpm:  # the KMS holds only a ciphertext of the key at c_index
        assert tpm_blob.decrypt_blob(tpm, protocol.b64url_decode(payload["passphrase"])) == legacy


def test_mdns_resolved_peer_gets_the_original_host_header(node):
    """Checklist 47: dial the SRV target's ip:port with ``Host: <original host[:port]>``."""
    peer = RecordingPeer()
    host = "kcrypt-audit-%s.local" % uuid.uuid4().hex[:8]
    with ChallengerThread(peer) as kms:
        with mdns.Announcer(host, kms.port, interfaces=["127.0.0.1"], instance="audit-" + host[13:21]):
            config = _config("http://%s:8082" % host, node, mdns=True, mdns_interfaces=["127.0.0.1"], mdns_timeout=10)
            assert client.get_passphrase(config, PartitionRef(label="COS_PERSISTENT")) == PASSPHRASE
    (connection,) = peer.connections
    assert connection["headers"]["Host"] == "%s:8082" % host


@pytest.mark.parametrize("protocol_name, served", [
    ("attestation", (protocol.GET_PASS_PATH, protocol.POST_PASS_PATH)),  # our newest client, a Helm v0.6.0 KMS
    ("legacy", (protocol.ATTESTATION_PATH,)),  # our legacy client, a v0.12+ KMS
])
def test_the_other_protocol_generation_is_a_clear_404(node, protocol_name, served):
    """Checklist 50: no negotiation exists; a KMS of the other generation answers 404 and the node says so."""
    peer = RecordingPeer(paths=served)
    with ChallengerThread(peer) as kms:
        with pytest.raises(KcryptError, match="after 1 attempts; last error: bad handshake with .*: HTTP 404 ") as info:
            client.get_passphrase(_config(kms.url, node, protocol=protocol_name, attempts=1), PartitionRef(label="COS_OEM"))
    other = "legacy" if protocol_name == "attestation" else "attestation"
    assert str(info.value).endswith("the other protocol generation answers 404 too: set protocol to %s %s)" % (
        other, "for Kairos <= v0.11 KMS" if other == "legacy" else "for a v0.12+ KMS"))
    assert not isinstance(info.value, client.AttestationRejected)
    assert peer.connections == []


@pytest.mark.parametrize("frame", ["not json\n", '{"error":"Challenge generation: generating challenge: boom"}\n'])
def test_a_bad_challenge_is_retried_not_a_rejection(node, frame):
    """An error sent where the challenge belongs is no 'attestation failed': upstream's client retries it (§2.A)."""
    peer = RecordingPeer(bad_challenge=frame)
    with ChallengerThread(peer) as kms:
        with pytest.raises(KcryptError, match="after 2 attempts; last error: .*(malformed|handling challenge)") as info:
            client.get_passphrase(_config(kms.url, node), PartitionRef(label="COS_OEM"))
    assert not isinstance(info.value, client.AttestationRejected)
    assert len(peer.connections) == 2


def test_certificate_is_added_to_the_system_roots(node, tmp_path, monkeypatch):
    """Checklist 38: ``certificate`` joins the system trust store instead of replacing it.

    The "system" store is pointed at a bundle with the KMS's CA (SSL_CERT_FILE, which OpenSSL's
    default paths honour); the node's ``certificate`` names an unrelated CA: the KMS stays trusted.
    """
    (tmp_path / "kms").mkdir()
    (tmp_path / "other").mkdir()
    pki = make_pki(str(tmp_path / "kms"))
    other_ca = open(make_pki(str(tmp_path / "other"))["ca.pem"]).read()
    context = server.tls_context(pki["server.pem"], pki["server.key"])
    peer = RecordingPeer()
    with ChallengerThread(peer, ssl_context=context) as kms:
        monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
        assert client.get_passphrase(_config(kms.url, node, certificate=other_ca), PartitionRef(label="COS_OEM")) == PASSPHRASE
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "other" / "ca.pem"))
        with pytest.raises(KcryptError, match="x509: certificate signed by unknown authority"):
            client.get_passphrase(_config(kms.url, node, certificate=other_ca, attempts=1), PartitionRef(label="COS_OEM"))
    assert len(peer.connections) == 1
