# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""protocol.py: message shapes (golden vectors), CheckAKParameters, MakeCredential, quote checks, nonce modes."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest
import tpm2_pytss as tss
from cryptography.hazmat.primitives import serialization

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity, messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation
from support import soft_tpm
from support.soft_tpm import SoftTPM


@pytest.fixture(scope="module")
def keys():
    return soft_tpm.key_pool(4)


@pytest.fixture
def node(keys):
    return SoftTPM(keys[0], keys[1])


def test_go_json_escapes_like_encoding_json():
    assert protocol.go_json({"error": "a<b>&c"}) == '{"error":"a\\u003cb\\u003e\\u0026c"}'
    assert protocol.write_json({"b": 1, "a": [True, None]}) == '{"b":1,"a":[true,null]}\n'
    assert protocol.go_json({"x": "é"}) == '{"x":"é"}'  # Go keeps UTF-8


def test_init_message_shape_is_go_compatible(node):
    text = protocol.write_json(node.init_message())
    assert text.endswith("}\n")
    obj = json.loads(text)
    assert list(obj) == ["ek_public", "ak_params"]  # defer_pcr_enrollment is omitempty
    assert base64.b64decode(obj["ek_public"], validate=True) == node.ek_spki_der
    assert isinstance(obj["ak_params"], dict)  # embedded object, not a string
    assert list(obj["ak_params"]) == ["Public", "UseTCSDActivationFormat", "CreateData", "CreateAttestation", "CreateSignature"]
    assert obj["ak_params"]["UseTCSDActivationFormat"] is False
    params = node.attestation_parameters()
    assert obj["ak_params"]["Public"] == base64.b64encode(params.public).decode()
    assert json.loads(protocol.go_json(node.init_message(defer_pcr_enrollment=True)))["defer_pcr_enrollment"] is True


def test_base64_is_standard_and_padded():
    assert protocol.b64encode(b"\xfb\xff") == "+/8="
    assert protocol.b64decode("+/8=", "x") == b"\xfb\xff"
    assert protocol.b64decode(None, "x") == b""  # JSON null is an empty []byte in Go
    with pytest.raises(protocol.ProtocolError, match="illegal base64"):
        protocol.b64decode("-_8", "x")  # URL alphabet, no padding: Go's StdEncoding refuses it
    with pytest.raises(protocol.ProtocolError, match="cannot unmarshal number"):
        protocol.b64decode(12, "Go struct field AttestationInit.ek_public")


def test_pcr_map_keys_are_decimal_strings_in_go_order():
    quote = protocol.PCRQuote("2", b"q", b"s", {0: b"\x00" * 32, 7: b"\x07" * 32, 11: b"\x0b" * 32})
    text = protocol.go_json(protocol.proof_message(b"\x01" * 32, quote))
    assert '"pcrs":{"0":' in text
    assert list(json.loads(text)["pcr_quote"]["pcrs"]) == ["0", "11", "7"]  # Go sorts map keys as strings
    assert json.loads(text)["pcr_quote"]["quote"] == {"version": "2", "quote": "cQ==", "signature": "cw=="}
    parsed = protocol.PCRQuote.from_json(json.loads(text)["pcr_quote"])
    assert parsed.pcrs == quote.pcrs


@pytest.mark.parametrize("key", ["-1", "24", "+7", "x", "", " 7", "7 ", "\u00b2", "\u0661", "\uff17", "1" * 5000])
def test_pcr_map_rejects_bad_indices(key):
    """ASCII decimal 0-23 only (common/pcrs.py): int() would raise on '\u00b2' and read '\u0661' (Arabic-Indic one) as 1."""
    with pytest.raises(protocol.ProtocolError, match="invalid PCR index"):
        protocol.PCRQuote.from_json({"quote": {}, "pcrs": {key: "AA=="}})


def test_pcr_map_reads_keys_as_go_does_and_refuses_a_pcr_given_twice():
    assert list(protocol.PCRQuote.from_json({"quote": {}, "pcrs": {"07": "AA=="}}).pcrs) == [7]  # strconv.ParseInt("07") = 7
    with pytest.raises(protocol.ProtocolError, match="PCR 7 is given twice"):
        protocol.PCRQuote.from_json({"quote": {}, "pcrs": {"7": "AA==", "07": "AQ=="}})


@pytest.mark.parametrize("nested", ["[" * 60000 + "]" * 60000, '{"a":' * 60000 + "1" + "}" * 60000, "[" * 65 + "]" * 65])
def test_deeply_nested_json_is_refused_before_parsing(nested):
    """Python's json raises RecursionError on deep nesting; a message holds a handful of objects, so more is refused."""
    for frame in ('{"ek_public": %s}' % nested, nested):
        with pytest.raises(protocol.ProtocolError, match="too many nested JSON objects or arrays"):
            protocol.load_json_object(frame, "attestation.AttestationInit")
    token = protocol.BEARER_PREFIX + base64.b64encode(('{"EK": %s}' % nested).encode()).decode()
    with pytest.raises(protocol.ProtocolError, match="too many nested JSON objects or arrays"):
        protocol.parse_legacy_token(token)


def test_challenge_and_response_shapes():
    ec = protocol.EncryptedCredential(b"\x00\x02ab", b"\x00\x01c")
    assert protocol.go_json(protocol.challenge_message(ec)) == '{"challenge":{"Credential":"AAJhYg==","Secret":"AAFj"}}'
    assert protocol.go_json(protocol.response_message(passphrase=b"pw")) == '{"passphrase":"cHc="}'
    assert protocol.go_json(protocol.response_message(error="TPM is quarantined")) == '{"error":"TPM is quarantined"}'
    assert protocol.parse_response({"passphrase": "cHc="}) == (b"pw", "")
    with pytest.raises(protocol.ProtocolError, match="refused the attestation request: boom"):
        protocol.parse_challenge({"error": "boom"})


def test_go_decoder_matches_field_names_case_insensitively():
    assert protocol.parse_legacy_answer(b'{"secret":"AQI="}') == b"\x01\x02"  # legacy struct has no json tags
    assert protocol.parse_legacy_answer(b'{"Secret":"AQI="}\n') == b"\x01\x02"


def test_legacy_token_and_frames(node):
    token = node.legacy_token()
    assert token.startswith("Bearer TPM")
    body = json.loads(base64.b64decode(token[len("Bearer TPM"):]))
    assert list(body) == ["EK", "AK"]
    assert base64.b64decode(body["EK"]).decode() == node.ek_pem
    ek_pem, params = protocol.parse_legacy_token(token)
    assert params == node.attestation_parameters() and ek_pem.decode() == node.ek_pem
    ec = protocol.EncryptedCredential(b"\x00\x01a", b"\x00\x01b")
    assert protocol.legacy_challenge(ec) == b'{"EC":{"Credential":"AAFh","Secret":"AAFi"}}'  # json.Marshal: no newline
    assert protocol.legacy_answer(b"\x01") == b'{"Secret":"AQ=="}\n'  # json.Encoder: newline
    assert protocol.legacy_payload(error="x") == b'{"passphrase":"","error":"x","generated_by":""}\n'
    assert protocol.parse_legacy_payload(b'{"passphrase":"p"}') == {"passphrase": "p", "error": "", "generated_by": ""}
    with pytest.raises(protocol.ProtocolError, match="Bearer TPM"):
        protocol.parse_legacy_token("Bearer xyz")


def test_legacy_base64url_passphrases():
    blob = bytes(range(256))
    text = protocol.b64url_encode(blob)
    assert "=" not in text and "+" not in text and "/" not in text
    assert protocol.b64url_decode(text) == blob


def test_ek_pem_is_go_pem_encoding(node):
    pem = node.ek_pem
    lines = pem.splitlines()
    assert lines[0] == "-----BEGIN PUBLIC KEY-----" and lines[-1] == "-----END PUBLIC KEY-----"
    assert pem.endswith("-----\n") and all(len(line) == 64 for line in lines[1:-2])
    assert attestation.load_ek_pem(pem).public_numbers() == node.ek_public.public_numbers()


def test_ek_must_be_rsa_2048(keys):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    small = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(protocol.ProtocolError, match="RSA-1024"):
        attestation.load_ek_spki(identity.spki_der(small))
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(protocol.ProtocolError, match="only RSA EKs"):
        attestation.load_ek_spki(identity.spki_der(p256))
    with pytest.raises(protocol.ProtocolError, match="parse EK SPKI"):
        attestation.load_ek_spki(b"\x30\x03garbage")


def _rsa_public(bits, exponent=65537):
    """An RSA public key with a modulus of exactly ``bits`` bits (not a real key: no primes needed to test parameter checks)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPublicNumbers(exponent, (1 << (bits - 1)) | (1 << (bits // 2)) | 1).public_key()


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_ek_sizes_of_the_tcg_templates_are_accepted(bits):
    assert attestation.load_ek_spki(identity.spki_der(_rsa_public(bits))).public_key.key_size == bits


@pytest.mark.parametrize(
    "bits, exponent, message",
    [
        (2048, 3, "exponent 3; TPMs use 65537"),
        (2048, (1 << 2046) | 1, "exponent of 2047 bits; TPMs use 65537"),  # 4-10x the CPU of an init (issue 14.4)
        (16384, 65537, "RSA-16384; TPM EKs are RSA-2048, 3072 or 4096|2086 bytes, more than any TPM EK"),
        (2560, 65537, "RSA-2560; TPM EKs are RSA-2048, 3072 or 4096"),
    ],
    ids=["e=3", "e-of-2047-bits", "rsa-16384", "rsa-2560"],
)
def test_ek_parameters_no_tpm_produces_are_refused_before_any_rsa_operation(bits, exponent, message, node, monkeypatch):
    der = identity.spki_der(_rsa_public(bits, exponent))
    with pytest.raises(protocol.ProtocolError, match=message):
        attestation.load_ek_spki(der)
    monkeypatch.setattr(attestation, "make_credential", lambda *a, **k: pytest.fail("MakeCredential ran for a refused EK"))
    init = protocol.go_json({"ek_public": protocol.b64encode(der), "ak_params": node.attestation_parameters().to_json()})
    with pytest.raises(attestation.StageError, match="Challenge generation: generating challenge: .*(%s)" % message):
        attestation.AttestationSession().challenge(init)
    pem = _rsa_public(bits, exponent).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(protocol.ProtocolError, match=message):
        attestation.LegacyAuth(protocol.legacy_token(pem, node.attestation_parameters()))


def test_ek_with_an_unknown_key_algorithm_is_a_parse_error():
    """cryptography raises UnsupportedAlgorithm (not ValueError) for an OID it does not know."""
    oid = b"\x06\x03\x2a\x03\x04"  # 1.2.3.4
    algorithm = b"\x30" + bytes([len(oid)]) + oid
    body = algorithm + b"\x03\x03\x00\x01\x02"
    der = b"\x30" + bytes([len(body)]) + body
    with pytest.raises(protocol.ProtocolError, match="parse EK SPKI"):
        attestation.load_ek_spki(der)
    pem = b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der) + b"-----END PUBLIC KEY-----\n"
    with pytest.raises(protocol.ProtocolError, match="error parsing the EK PEM"):
        attestation.load_ek_pem(pem)


def _ak_public(node, exponent=0, modulus=None, key_bits=2048):
    """The go-attestation AK's TPMT_PUBLIC with one parameter changed."""
    public, dummy = tss.TPMT_PUBLIC.unmarshal(node.ak_public_area(key_bits=key_bits))
    public.parameters.rsaDetail.exponent = exponent
    if modulus is not None:
        public.unique.rsa = modulus
    return public.marshal()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"exponent": 1}, "AK exponent 1; TPMs use 65537"),
        ({"exponent": 2}, "AK exponent 2; TPMs use 65537"),
        ({"exponent": 3}, "AK exponent 3; TPMs use 65537"),
        ({"exponent": 0xFFFFFFFF}, "AK exponent 4294967295; TPMs use 65537"),
        ({"modulus": b"\x07"}, "the AK modulus is 1 bytes; an RSA-2048 key has 256"),
        ({"modulus": b"\xff" * 255}, "the AK modulus is 255 bytes; an RSA-2048 key has 256"),
        ({"modulus": b"\x00" + b"\xff" * 255}, "the AK modulus of RSA-2048 has 2040 significant bits"),
        ({"modulus": b"\xff" * 255 + b"\xfe"}, "the AK modulus is even"),
        ({"key_bits": 2560}, "AK is RSA-2560; TPMs make RSA-2048, 3072 or 4096 AKs"),
        ({"key_bits": 16384}, "AK is RSA-16384; TPMs make RSA-2048, 3072 or 4096 AKs"),
    ],
)
def test_ak_parameters_no_tpm_produces_are_refused_before_any_rsa_operation(node, change, message, monkeypatch):
    params = node.attestation_parameters(public=_ak_public(node, **change))
    monkeypatch.setattr(attestation.padding, "PKCS1v15", lambda: pytest.fail("an RSA verification ran for a refused AK"))
    with pytest.raises(protocol.ProtocolError, match=message):
        attestation.check_ak_parameters(params)


def test_ak_exponent_65537_written_out_is_the_default_exponent(node):
    """TPM 2.0 Part 2: exponent 0 means 2^16+1; a TPM may also report 65537 itself."""
    public = _ak_public(node, exponent=65537)
    params = node.attestation_parameters(public=public)
    assert attestation.check_ak_parameters(params).public_key.public_numbers().e == 65537


def test_check_ak_parameters_accepts_a_go_attestation_ak(node):
    checked = attestation.check_ak_parameters(node.attestation_parameters())
    assert checked.name == struct.pack(">H", 0x000B) + hashlib.sha256(node.attestation_parameters().public).digest()


def _without(attribute):
    return soft_tpm.AK_ATTRIBUTES & ~attribute


@pytest.mark.parametrize(
    "attributes, message",
    [
        (_without(tss.TPMA_OBJECT.FIXEDTPM), "provided key is exportable"),
        (_without(tss.TPMA_OBJECT.RESTRICTED), "provided key is not limited to attestation"),
        (_without(tss.TPMA_OBJECT.FIXEDPARENT), "provided key can be duplicated to a different parent"),
        (_without(tss.TPMA_OBJECT.SENSITIVEDATAORIGIN), "provided key is not created by TPM"),
        (_without(tss.TPMA_OBJECT.SIGN_ENCRYPT) | tss.TPMA_OBJECT.DECRYPT, "provided key is not limited to attestation"),
    ],
)
def test_check_ak_parameters_rejects_wrong_attributes(node, attributes, message):
    params = node.attestation_parameters(public=node.ak_public_area(attributes=attributes))
    with pytest.raises(protocol.ProtocolError, match=message):
        attestation.check_ak_parameters(params)


def test_check_ak_parameters_rejects_forgeries(node, keys):
    good = node.attestation_parameters()
    with pytest.raises(protocol.ProtocolError, match="attestation key too small"):
        attestation.check_ak_parameters(node.attestation_parameters(public=node.ak_public_area(key_bits=1024)))
    with pytest.raises(protocol.ProtocolError, match="not produced by a TPM"):
        attestation.check_ak_parameters(node.attestation_parameters(magic=0x12345678))
    with pytest.raises(protocol.ProtocolError, match="could not verify attestation"):
        attestation.check_ak_parameters(node.attestation_parameters(sign_key=keys[2]))
    other = SoftTPM(keys[2], keys[3]).attestation_parameters()
    with pytest.raises(protocol.ProtocolError, match="refers to a different key"):
        attestation.check_ak_parameters(protocol.AttestationParameters(other.public, good.create_data, good.create_attestation, good.create_signature))
    tampered = good.create_data[:10] + bytes([good.create_data[10] ^ 1]) + good.create_data[11:]  # inside pcrDigest
    with pytest.raises(protocol.ProtocolError, match="attestation refers to different public key"):
        attestation.check_ak_parameters(protocol.AttestationParameters(good.public, tampered, good.create_attestation, good.create_signature))
    with pytest.raises(protocol.ProtocolError, match="trailing bytes"):
        attestation.check_ak_parameters(protocol.AttestationParameters(good.public + b"\x00", good.create_data, good.create_attestation, good.create_signature))
    with pytest.raises(protocol.ProtocolError, match="DecodePublic"):
        attestation.check_ak_parameters(protocol.AttestationParameters(b"\x00\x01\x02", good.create_data, good.create_attestation, good.create_signature))
    with pytest.raises(protocol.ProtocolError, match="signature is too short"):
        attestation.check_ak_parameters(protocol.AttestationParameters(good.public, good.create_data, good.create_attestation, b"\x00"))
    quote, _signature = node.quote()
    with pytest.raises(protocol.ProtocolError, match="does not apply to creation data"):
        attestation.check_ak_parameters(protocol.AttestationParameters(good.public, good.create_data, quote, good.create_signature))


def test_kdfa_matches_tpm2_pytss():
    from tpm2_pytss.internal.crypto import _kdfa

    for bits in (128, 256, 520):
        ours = attestation.kdfa("sha256", b"seed" * 4, b"STORAGE", b"\x00\x0bname", b"v", bits)
        assert ours == _kdfa(tss.TPM2_ALG.SHA256, b"seed" * 4, b"STORAGE", b"\x00\x0bname", b"v", bits)


def test_make_credential_matches_tpm2_pytss_byte_for_byte(node, monkeypatch):
    """Same seed in → same TPM2B_ID_OBJECT out as tpm2_pytss.utils.make_credential (MakeCredential reference)."""
    from tpm2_pytss import utils

    seed = bytes(range(16))
    secret = bytes(range(32))
    _secret, ours = attestation.make_credential(node.ek_public, node.ak_name, secret=secret, seed=seed)
    encrypted_seed = ours.secret[2:]
    monkeypatch.setattr(utils, "_generate_seed", lambda public, label: (seed, encrypted_seed))
    numbers = node.ek_public.public_numbers()
    ek_public = tss.TPMT_PUBLIC(
        type=tss.TPM2_ALG.RSA, nameAlg=tss.TPM2_ALG.SHA256,
        parameters=tss.TPMU_PUBLIC_PARMS(rsaDetail=tss.TPMS_RSA_PARMS(
            symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.AES, keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
                                              mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB)),
            scheme=tss.TPMT_RSA_SCHEME(scheme=tss.TPM2_ALG.NULL), keyBits=2048, exponent=0)),
        unique=tss.TPMU_PUBLIC_ID(rsa=numbers.n.to_bytes(256, "big")),
    )
    id_object, enc_secret = utils.make_credential(ek_public, secret, node.ak_name)
    assert ours.credential == id_object.marshal()
    assert ours.secret == enc_secret.marshal()
    assert node.activate_credential(ours.credential, ours.secret) == secret


def _session_with_proof(node, nonce=True, mode=attestation.NONCE_WHEN_SUPPORTED):
    session = attestation.AttestationSession(mode)
    challenge = session.challenge(protocol.go_json(node.init_message()))
    return session, node.proof_message(challenge, nonce=nonce)


def test_full_exchange_verifies_and_reports_policy_inputs(node):
    node.pcr_extend(7, b"secure boot")
    session, proof = _session_with_proof(node)
    verified = session.verify(protocol.go_json(proof))
    assert verified.tpm_hash == node.tpm_hash == identity.tpm_hash(node.ek_public)
    assert verified.ek_pem == node.ek_pem
    assert verified.pcrs == {"0": "00" * 32, "7": node.pcrs[7].hex(), "11": "00" * 32}
    assert verified.nonce_bound and not verified.defer_pcr_enrollment


def test_only_an_attested_ek_is_cached(node, keys):
    """A request that fails authentication leaves nothing behind, not even in the EK cache (issue 14)."""
    stranger = SoftTPM(keys[2], keys[3])
    attestation._EK_CACHE.pop(stranger.ek_spki_der, None)
    session = attestation.AttestationSession()
    session.challenge(protocol.go_json(stranger.init_message()))
    with pytest.raises(attestation.StageError, match="invalid secret"):
        session.verify(protocol.go_json({"secret": protocol.b64encode(b"\x00" * 32), "pcr_quote": {}}))
    assert stranger.ek_spki_der not in attestation._EK_CACHE
    session, proof = _session_with_proof(stranger)
    session.verify(protocol.go_json(proof))
    assert attestation._EK_CACHE[stranger.ek_spki_der].tpm_hash == stranger.tpm_hash


def test_a_proof_from_another_exchange_is_an_invalid_secret(node):
    _other, replayed = _session_with_proof(node)
    session, _own_proof = _session_with_proof(node)
    with pytest.raises(attestation.StageError, match="^Attestation verification failed: invalid secret$") as info:
        session.verify(protocol.go_json(replayed))
    assert info.value.rejection


def test_quote_must_be_signed_by_the_ak(node, keys):
    session = attestation.AttestationSession()
    challenge = session.challenge(protocol.go_json(node.init_message()))
    ec = protocol.parse_challenge(challenge)
    secret = node.activate_credential(ec.credential, ec.secret)
    quote, signature = node.quote(qualifying_data=secret, sign_key=keys[3])
    proof = protocol.proof_message(secret, protocol.PCRQuote("2", quote, signature, node.pcr_values()))
    with pytest.raises(attestation.StageError, match="PCR quote verification failed: quote signature verification failed"):
        session.verify(protocol.go_json(proof))


def _verify_quote(node, pcrs, attest, nonce=b"n" * 32, mode=attestation.NONCE_WHEN_SUPPORTED, sign=True):
    signature = soft_tpm._rsassa(node.ak_key, attest)
    ak = attestation.check_ak_parameters(node.attestation_parameters())
    return attestation.verify_quote(ak, protocol.PCRQuote("2", attest, signature, pcrs), nonce, mode)


def test_quote_selection_and_digest_must_match_the_values(node):
    values = node.pcr_values()
    attest = soft_tpm.quote_attest(node.ak_name, b"n" * 32, values)
    assert _verify_quote(node, values, attest) == (values, True)
    with pytest.raises(attestation.Rejection, match="PCR 7 was selected in the quote but not provided"):
        _verify_quote(node, {0: values[0], 11: values[11]}, attest)
    with pytest.raises(attestation.Rejection, match="PCR 8 was provided but not selected"):
        _verify_quote(node, {**values, 8: b"\x00" * 32}, attest)
    with pytest.raises(attestation.Rejection, match="PCR digest verification failed"):
        _verify_quote(node, {**values, 7: b"\x01" * 32}, attest)
    with pytest.raises(attestation.Rejection, match="is 31 bytes"):
        _verify_quote(node, {**values, 7: b"\x01" * 31}, attest)
    sha1_bank = attest.replace(struct.pack(">IHB", 1, attestation.ALG_SHA256, 3), struct.pack(">IHB", 1, attestation.ALG_SHA1, 3))
    with pytest.raises(attestation.Rejection, match="only the SHA-256 bank"):
        _verify_quote(node, values, sha1_bank)
    creation = node.attestation_parameters().create_attestation
    with pytest.raises(attestation.Rejection, match="not a quote attestation"):
        _verify_quote(node, values, creation)


@pytest.mark.parametrize(
    "mode, extra, accepted",
    [
        (attestation.NONCE_OFF, b"", True),
        (attestation.NONCE_OFF, b"stale" * 6, True),  # upstream HEAD ignores extraData
        (attestation.NONCE_WHEN_SUPPORTED, b"", True),  # HEAD clients keep working
        (attestation.NONCE_WHEN_SUPPORTED, b"n" * 32, True),
        (attestation.NONCE_WHEN_SUPPORTED, b"stale" * 6, False),  # a recorded nonce-bound quote
        (attestation.NONCE_REQUIRED, b"n" * 32, True),
        (attestation.NONCE_REQUIRED, b"", False),
        (attestation.NONCE_REQUIRED, b"stale" * 6, False),
    ],
)
def test_nonce_modes(node, mode, extra, accepted):
    values = node.pcr_values()
    attest = soft_tpm.quote_attest(node.ak_name, extra, values)
    if accepted:
        assert _verify_quote(node, values, attest, mode=mode)[0] == values
    else:
        with pytest.raises(attestation.Rejection, match="quote was not produced for this attestation"):
            _verify_quote(node, values, attest, mode=mode)


@pytest.mark.parametrize(
    "frame, message",
    [
        ("not json", "WebSocket read: reading attestation init: invalid JSON"),
        ("", "WebSocket read: reading attestation init: unexpected end of JSON input"),
        ("[1,2]", "WebSocket read: reading attestation init: json: cannot unmarshal array"),
        ('{"ek_public": 5}', "WebSocket read: reading attestation init: json: cannot unmarshal number into Go struct field AttestationInit.ek_public"),
        ('{"ek_public": "AAAA", "defer_pcr_enrollment": "yes"}', "cannot unmarshal string into Go struct field AttestationInit.defer_pcr_enrollment"),
        ('{"ek_public": "AAAA"}', "Challenge generation: generating challenge: parse EK SPKI"),
    ],
)
def test_malformed_init_messages(frame, message):
    with pytest.raises(attestation.StageError, match=message.replace("(", r"\(")) as info:
        attestation.AttestationSession().challenge(frame)
    assert not info.value.rejection


def test_missing_or_malformed_ak_params(node):
    init = node.init_message()
    for ak_params, message in ((None, "unexpected end of JSON input"), ("x", "cannot unmarshal string"),
                               ({"Public": 1}, "cannot unmarshal number")):
        frame = protocol.go_json(dict(init, ak_params=ak_params))
        with pytest.raises(attestation.StageError, match="Challenge generation: generating challenge: .*(%s)" % message):
            attestation.AttestationSession().challenge(frame)


def test_malformed_proofs(node):
    session, proof = _session_with_proof(node)
    with pytest.raises(attestation.StageError, match="Proof read: reading proof: invalid JSON"):
        session.verify("{")
    with pytest.raises(attestation.StageError, match="Attestation verification failed: unmarshaling PCR quote"):
        session.verify(protocol.go_json(dict(proof, pcr_quote="x")))
    with pytest.raises(attestation.StageError,
                       match="Attestation verification failed: PCR quote verification failed: quote signature verification failed: empty"):
        session.verify(protocol.go_json(dict(proof, pcr_quote={"quote": {}, "pcrs": {}})))


def test_legacy_auth_round_trip_and_wrong_answer(node):
    auth = attestation.LegacyAuth(node.legacy_token())
    assert auth.tpm_hash == node.tpm_hash
    frame = auth.challenge_frame()
    auth.check_answer(node.legacy_answer(frame))
    with pytest.raises(attestation.Rejection, match="invalid challenge response"):
        auth.check_answer(protocol.legacy_answer(b"\x00" * 32))
    with pytest.raises(attestation.Rejection, match="unmarshalling challenge response"):
        auth.check_answer(b"nope")


def test_legacy_token_with_ek_certificate_hashes_the_certificate_key(node):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EK")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(node.ek_public)
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(node.ak_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    auth = attestation.LegacyAuth(protocol.legacy_token(pem, node.attestation_parameters()))
    assert auth.tpm_hash == node.tpm_hash  # checklist 4: both protocols give the same hash
