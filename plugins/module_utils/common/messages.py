# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The wire messages of both Kairos protocols, shaped exactly as upstream's Go code marshals them.

Private to the collection. Used by the node client (client/kms_client.py) and the
challenger (kms/attestation.py, kms/server.py), so both ends speak one encoding.
Nothing here checks a TPM structure: that is the server's job (kms/attestation.py).

* Newest protocol (spec §2.A): four JSON messages over the ``/tpm-attestation``
  WebSocket: ``[]byte`` as standard padded base64, ``ak_params``/``challenge``/
  ``pcr_quote`` as embedded JSON objects, PCR map keys as decimal strings in Go's
  (string) order.
* Legacy protocol (spec §2.B): the ``Authorization: Bearer TPM<base64 JSON>``
  token, ``{"EC": ...}`` challenge frames, ``{"Secret": ...}`` answers and the
  ``{passphrase, error, generated_by}`` payload of ``/getPass`` and ``/postPass``.
* Recovery-key escrow (ours; upstream has no such call): ``/recovery-escrow`` runs
  the newest protocol's messages 1 and 2 unchanged; message 3 is the proof plus
  ``recovery_key``; message 4 is ``{"escrowed": true}`` or ``{"error": text}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import pcrs as pcr_indexes
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

QUOTE_PCRS = (0, 7, 11)  # hard-coded by upstream clients
QUOTE_VERSION = "2"

# Endpoints (the server serves exactly these paths at the root, spec §2.A transport)
ATTESTATION_PATH = "/tpm-attestation"
GET_PASS_PATH = "/getPass"
POST_PASS_PATH = "/postPass"
RECOVERY_ESCROW_PATH = "/recovery-escrow"

# Recovery-key escrow: bounds both ends check (our keys are 71 ASCII bytes, see node/recovery.py)
MIN_RECOVERY_KEY_SIZE = 16
MAX_RECOVERY_KEY_SIZE = 256

# A message of either protocol holds at most 5 JSON objects, nested 3 deep. Python's json module recurses
# per level (60,000 "[" raise RecursionError), so a frame with more objects or arrays than this is refused
# before it is parsed: counting "{" and "[" is one pass in C and bounds the depth as well.
MAX_JSON_CONTAINERS = 64

# Our addition to the newest protocol's init (docs/challenger.md, "EK certificates"): the EK certificate and the
# CA certificates the TPM keeps in NV. Upstream's servers decode the init with Go's encoding/json, which ignores
# fields it does not know, so a node may always send them.
MAX_EK_CHAIN = 8

# Legacy protocol
BEARER_PREFIX = "Bearer TPM"
GENERATED_BY_TPM = "tpm"
NO_SECRET_FOUND = "No secret found for"  # the legacy /getPass error that makes a client generate a key


class ProtocolError(KcryptError):
    """A message that cannot be parsed or a TPM structure that fails a check.

    The message is fit to send to the peer: it names what was wrong and carries
    no secret.
    """


# -- Go-compatible JSON and base64 -----------------------------------------


def b64encode(data):
    """Go's encoding of ``[]byte`` in JSON: standard alphabet, padded."""
    return base64.b64encode(data).decode("ascii")


def b64decode(value, where):
    """Decode a JSON ``[]byte`` field; ``null`` is empty as in Go. Raises ProtocolError."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ProtocolError("json: cannot unmarshal %s into %s of type []byte" % (_json_type(value), where))
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError("%s: illegal base64 data (%s)" % (where, error)) from None


def b64url_encode(data):
    """Go's base64.RawURLEncoding (legacy TPM-encrypted passphrases)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """Inverse of b64url_encode; accepts padding too. Raises ProtocolError."""
    if not isinstance(text, str):
        raise ProtocolError("a TPM-encrypted passphrase must be a string")
    text = text.strip().rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as error:
        raise ProtocolError("the TPM-encrypted passphrase is not base64url: %s" % error) from None


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def go_json(obj):
    """Compact JSON as Go's encoding/json writes it (HTML characters escaped, UTF-8 kept)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (
            text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        )
    return text


def write_json(obj):
    """What gorilla's ``WriteJSON`` / ``json.NewEncoder(w).Encode`` puts in a frame: JSON plus a newline."""
    return go_json(obj) + "\n"


def load_json_object(data, what):
    """Parse one JSON object from a frame (text or bytes). Raises ProtocolError naming ``what``.

    A frame with more than MAX_JSON_CONTAINERS objects and arrays is refused unparsed.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("%s is not UTF-8 JSON" % what) from None
    if data.count("{") + data.count("[") > MAX_JSON_CONTAINERS:
        raise ProtocolError("%s has too many nested JSON objects or arrays (a message has at most %d)" % (what, MAX_JSON_CONTAINERS))
    try:
        obj = json.loads(data)
    except RecursionError:  # unreachable after the count above; kept so no input can escape as a traceback
        raise ProtocolError("%s has too many nested JSON objects or arrays" % what) from None
    except ValueError as error:
        if not data.strip():
            raise ProtocolError("unexpected end of JSON input") from None
        raise ProtocolError("invalid JSON in %s: %s" % (what, error)) from None
    if not isinstance(obj, dict):
        raise ProtocolError("json: cannot unmarshal %s into Go value of type %s" % (_json_type(obj), what))
    return obj


def _field(obj, name):
    """A struct field the way Go's decoder finds it: exact key first, then case-insensitively."""
    if name in obj:
        return obj[name]
    lowered = name.lower()
    for key, value in obj.items():
        if key.lower() == lowered:
            return value
    return None


def _bool_field(obj, name, where):
    value = _field(obj, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError("json: cannot unmarshal %s into Go struct field %s of type bool" % (_json_type(value), where))
    return value


def _raw_json_field(obj, name):
    """A ``json.RawMessage`` field: any JSON value, kept as parsed (None when absent)."""
    return _field(obj, name)


# -- go-attestation structures ---------------------------------------------


@dataclass(frozen=True)
class AttestationParameters:
    """go-attestation ``AttestationParameters`` (TPM 2.0): all without TPM2B size prefixes."""

    public: bytes  # TPMT_PUBLIC of the AK
    create_data: bytes  # TPMS_CREATION_DATA
    create_attestation: bytes  # TPMS_ATTEST (type ATTEST_CREATION), signed by the AK itself
    create_signature: bytes  # TPMT_SIGNATURE
    use_tcsd_activation_format: bool = False

    @classmethod
    def from_attestation_key(cls, ak):
        """From tpm.AttestationKey (the node's transient AK)."""
        return cls(ak.public, ak.create_data, ak.create_attestation, ak.create_signature)

    def to_json(self):
        return {
            "Public": b64encode(self.public),
            "UseTCSDActivationFormat": self.use_tcsd_activation_format,
            "CreateData": b64encode(self.create_data),
            "CreateAttestation": b64encode(self.create_attestation),
            "CreateSignature": b64encode(self.create_signature),
        }

    @classmethod
    def from_json(cls, obj):
        if obj is None:
            raise ProtocolError("unexpected end of JSON input")
        if not isinstance(obj, dict):
            raise ProtocolError("json: cannot unmarshal %s into Go value of type attest.AttestationParameters" % _json_type(obj))
        where = "Go struct field AttestationParameters.%s"
        return cls(
            public=b64decode(_field(obj, "Public"), where % "Public"),
            create_data=b64decode(_field(obj, "CreateData"), where % "CreateData"),
            create_attestation=b64decode(_field(obj, "CreateAttestation"), where % "CreateAttestation"),
            create_signature=b64decode(_field(obj, "CreateSignature"), where % "CreateSignature"),
            use_tcsd_activation_format=_bool_field(obj, "UseTCSDActivationFormat", "AttestationParameters.UseTCSDActivationFormat"),
        )


@dataclass(frozen=True)
class EncryptedCredential:
    """go-attestation ``EncryptedCredential``: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET, with size prefixes."""

    credential: bytes
    secret: bytes

    def to_json(self):
        return {"Credential": b64encode(self.credential), "Secret": b64encode(self.secret)}

    @classmethod
    def from_json(cls, obj, where="attest.EncryptedCredential"):
        if not isinstance(obj, dict):
            raise ProtocolError("json: cannot unmarshal %s into Go value of type %s" % (_json_type(obj), where))
        credential = b64decode(_field(obj, "Credential"), "Go struct field EncryptedCredential.Credential")
        secret = b64decode(_field(obj, "Secret"), "Go struct field EncryptedCredential.Secret")
        if len(credential) < 2 or len(secret) < 2:
            raise ProtocolError("the challenge carries no credential")
        return cls(credential, secret)


# -- newest protocol messages (spec §2.A) ----------------------------------


@dataclass(frozen=True)
class AttestationInit:
    ek_public: bytes  # DER SubjectPublicKeyInfo of the EK
    ak_params: object  # the embedded JSON value (AttestationParameters.from_json decodes it)
    defer_pcr_enrollment: bool = False
    ek_certificate: bytes = b""  # ours: DER EK certificate from NV 0x01c00002, b"" when the TPM has none
    ek_chain: tuple = ()  # ours: DER CA certificates from the TPM's EK chain NV indices


def init_message(ek_spki_der, ak_params, defer_pcr_enrollment=False, ek_certificate=b"", ek_chain=()):
    """Client → server message 1 (``omitempty`` on the deferral flag, as upstream, and on our two fields)."""
    message = {"ek_public": b64encode(ek_spki_der), "ak_params": ak_params.to_json()}
    if defer_pcr_enrollment:
        message["defer_pcr_enrollment"] = True
    if ek_certificate:
        message["ek_certificate"] = b64encode(ek_certificate)
    if ek_chain:
        message["ek_chain"] = [b64encode(certificate) for certificate in ek_chain[:MAX_EK_CHAIN]]
    return message


def parse_init(obj):
    """Server side of message 1. Field types are checked here; ak_params is decoded by the challenge step."""
    return AttestationInit(
        ek_public=b64decode(_field(obj, "ek_public"), "Go struct field AttestationInit.ek_public"),
        ak_params=_raw_json_field(obj, "ak_params"),
        defer_pcr_enrollment=_bool_field(obj, "defer_pcr_enrollment", "AttestationInit.defer_pcr_enrollment"),
        ek_certificate=b64decode(_field(obj, "ek_certificate"), "Go struct field AttestationInit.ek_certificate"),
        ek_chain=_certificate_list(_field(obj, "ek_chain"), "Go struct field AttestationInit.ek_chain"),
    )


def _certificate_list(value, where):
    """A ``[][]byte`` of at most MAX_EK_CHAIN certificates (None is empty, as in Go)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ProtocolError("json: cannot unmarshal %s into %s of type [][]uint8" % (_json_type(value), where))
    if len(value) > MAX_EK_CHAIN:
        raise ProtocolError("%s holds %d certificates; at most %d are accepted" % (where, len(value), MAX_EK_CHAIN))
    return tuple(b64decode(item, where) for item in value)


def challenge_message(encrypted_credential):
    """Server → client message 2."""
    return {"challenge": encrypted_credential.to_json()}


def parse_challenge(obj):
    """Client side of message 2. A server error here arrives as {"error": ...}: raise it as ProtocolError."""
    challenge = _raw_json_field(obj, "challenge")
    if challenge is None:
        error = _field(obj, "error")
        if isinstance(error, str) and error:
            raise ProtocolError("the KMS refused the attestation request: %s" % error)
        raise ProtocolError("handling challenge: unexpected end of JSON input")
    return EncryptedCredential.from_json(challenge)


@dataclass(frozen=True)
class PCRQuote:
    version: str
    quote: bytes  # TPMS_ATTEST (type ATTEST_QUOTE)
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict = field(default_factory=dict)  # {index: digest bytes}

    def to_json(self):
        return {
            "quote": {"version": self.version, "quote": b64encode(self.quote), "signature": b64encode(self.signature)},
            # Go's map[int][]byte: keys are decimal strings, emitted in string order ("0", "11", "7").
            "pcrs": {str(i): b64encode(self.pcrs[i]) for i in sorted(self.pcrs, key=str)},
        }

    @classmethod
    def from_json(cls, obj):
        if obj is None:
            raise ProtocolError("unexpected end of JSON input")
        if not isinstance(obj, dict):
            raise ProtocolError("json: cannot unmarshal %s into Go value of type struct" % _json_type(obj))
        quote = _field(obj, "quote")
        if quote is None:
            quote = {}
        if not isinstance(quote, dict):
            raise ProtocolError("json: cannot unmarshal %s into Go struct field .quote of type struct" % _json_type(quote))
        version = _field(quote, "version")
        if version is None:
            version = ""
        if not isinstance(version, str):
            raise ProtocolError("json: cannot unmarshal %s into Go struct field .quote.version of type string" % _json_type(version))
        raw_pcrs = _field(obj, "pcrs")
        if raw_pcrs is None:
            raw_pcrs = {}
        if not isinstance(raw_pcrs, dict):
            raise ProtocolError("json: cannot unmarshal %s into Go struct field .pcrs of type map[int][]uint8" % _json_type(raw_pcrs))
        pcrs = {}
        for key, value in raw_pcrs.items():
            index = pcr_indexes.pcr_index(key)  # ASCII decimal 0-23, read as Go's strconv does ("07" is 7)
            if index is None:
                raise ProtocolError("invalid PCR index %r in quote (valid range: 0-23)" % key[:16])
            if index in pcrs:
                raise ProtocolError("PCR %d is given twice in the quote's PCR map" % index)
            pcrs[index] = b64decode(value, "PCR %d" % index)
        return cls(
            version=version,
            quote=b64decode(_field(quote, "quote"), "Go struct field .quote.quote"),
            signature=b64decode(_field(quote, "signature"), "Go struct field .quote.signature"),
            pcrs=pcrs,
        )


@dataclass(frozen=True)
class AttestationProof:
    secret: bytes
    pcr_quote: object  # the embedded JSON value (PCRQuote.from_json decodes it)


def proof_message(secret, pcr_quote):
    """Client → server message 3."""
    return {"secret": b64encode(secret), "pcr_quote": pcr_quote.to_json()}


def parse_proof(obj):
    return AttestationProof(
        secret=b64decode(_field(obj, "secret"), "Go struct field AttestationProof.secret"),
        pcr_quote=_raw_json_field(obj, "pcr_quote"),
    )


def response_message(passphrase=None, error=None):
    """Server → client message 4: ``{"passphrase": b64}`` or ``{"error": text}`` (both omitempty)."""
    message = {}
    if passphrase:
        message["passphrase"] = b64encode(passphrase)
    if error:
        message["error"] = error
    return message


def parse_response(obj):
    """Client side of message 4: (passphrase bytes, error text)."""
    error = _field(obj, "error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("json: cannot unmarshal %s into Go struct field AttestationResponse.error of type string" % _json_type(error))
    return b64decode(_field(obj, "passphrase"), "Go struct field AttestationResponse.passphrase"), error or ""


# -- recovery-key escrow (ours) ---------------------------------------------


def escrow_message(secret, pcr_quote, recovery_key):
    """Client → server message 3 of ``/recovery-escrow``: the proof of message 3 plus the recovery key."""
    message = proof_message(secret, pcr_quote)
    message["recovery_key"] = b64encode(recovery_key)
    return message


def parse_escrow_key(obj):
    """The recovery key of an escrow message 3 (bounded). Raises ProtocolError."""
    key = b64decode(_field(obj, "recovery_key"), "recovery_key")
    if not MIN_RECOVERY_KEY_SIZE <= len(key) <= MAX_RECOVERY_KEY_SIZE:
        raise ProtocolError("recovery_key must be %d to %d bytes, got %d"
                            % (MIN_RECOVERY_KEY_SIZE, MAX_RECOVERY_KEY_SIZE, len(key)))
    return key


def escrow_response(error=""):
    """Server → client message 4 of ``/recovery-escrow``."""
    return {"error": error} if error else {"escrowed": True}


def parse_escrow_response(obj):
    """Client side of escrow message 4: the error text ("" when the key was escrowed). Raises ProtocolError."""
    error = _field(obj, "error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("the escrow answer's error must be a string, not %s" % _json_type(error))
    if error:
        return error
    if _field(obj, "escrowed") is not True:
        raise ProtocolError("the escrow answer says neither escrowed nor error")
    return ""


# -- legacy protocol messages (spec §2.B) ----------------------------------


def legacy_token(ek_pem, ak_params):
    """The ``Authorization`` header value: ``Bearer TPM`` + base64(JSON {"EK": b64(PEM), "AK": {...}})."""
    if isinstance(ek_pem, str):
        ek_pem = ek_pem.encode("ascii")
    body = go_json({"EK": b64encode(ek_pem), "AK": ak_params.to_json()})
    return BEARER_PREFIX + b64encode(body.encode("utf-8"))


def parse_legacy_token(header):
    """(EK PEM bytes, AttestationParameters) from an Authorization header. Raises ProtocolError."""
    if not header or not header.startswith(BEARER_PREFIX):
        raise ProtocolError("missing 'Authorization: Bearer TPM...' header: this endpoint needs a TPM token")
    try:
        raw = base64.b64decode(header[len(BEARER_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError("the TPM token is not base64: %s" % error) from None
    obj = load_json_object(raw, "tpm.AttestationData")
    ek_pem = b64decode(_field(obj, "EK"), "Go struct field AttestationData.EK")
    return ek_pem, AttestationParameters.from_json(_field(obj, "AK"))


def legacy_challenge(encrypted_credential):
    """Server → client binary frame: ``json.Marshal(Challenge{EC})``, no trailing newline."""
    return go_json({"EC": encrypted_credential.to_json()}).encode("utf-8")


def parse_legacy_challenge(data):
    obj = load_json_object(data, "tpm.Challenge")
    challenge = _field(obj, "EC")
    if challenge is None:
        error = _field(obj, "error")
        if isinstance(error, str) and error:
            raise ProtocolError("the KMS refused the TPM token: %s" % error)
        raise ProtocolError("unmarshalling Challenge: no EC field")
    return EncryptedCredential.from_json(challenge)


def legacy_answer(secret):
    """Client → server binary frame: ``json.NewEncoder(w).Encode(ChallengeResponse{Secret})``."""
    return write_json({"Secret": b64encode(secret)}).encode("utf-8")


def parse_legacy_answer(data):
    obj = load_json_object(data, "tpm.ChallengeResponse")
    return b64decode(_field(obj, "Secret"), "Go struct field ChallengeResponse.Secret")


def legacy_payload(passphrase="", error="", generated_by=""):
    """The legacy ``payload.Data`` frame: all three keys always present, JSON plus newline."""
    return write_json({"passphrase": passphrase, "error": error, "generated_by": generated_by}).encode("utf-8")


def parse_legacy_payload(data):
    """{"passphrase", "error", "generated_by"} with string values (missing keys are empty)."""
    obj = load_json_object(data, "payload.Data")
    result = {}
    for key in ("passphrase", "error", "generated_by"):
        value = _field(obj, key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ProtocolError("json: cannot unmarshal %s into Go struct field Data.%s of type string" % (_json_type(value), key))
        result[key] = value
    return result
