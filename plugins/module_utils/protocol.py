# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The two Kairos wire protocols: messages, TPM structure checks, MakeCredential, quotes.

Private to the collection. Shared by the challenger (server.py), the node client
(client.py), the benchmark and the tests, so both ends speak one implementation.

* Newest protocol (spec §2.A): four JSON messages over the ``/tpm-attestation``
  WebSocket, shaped exactly as upstream's Go structs marshal them: ``[]byte`` as
  standard padded base64, ``ak_params``/``challenge``/``pcr_quote`` as embedded
  JSON objects, PCR map keys as decimal strings in Go's (string) order.
* Legacy protocol (spec §2.B): the ``Authorization: Bearer TPM<base64 JSON>``
  token, ``{"EC": ...}`` challenge frames, ``{"Secret": ...}`` answers and the
  ``{passphrase, error, generated_by}`` payload of ``/getPass`` and ``/postPass``.
* Server-side TPM checks: go-attestation's ``CheckAKParameters`` (every check of
  §2.A.1), TPM2_MakeCredential, and quote verification (checklist 13) plus the
  nonce binding of upstream's pending fix (§2.A.2: the activation secret is the
  quote's qualifying data).

TPM structures are unmarshalled by tpm2-pytss (libtss2's marshalling code
validates them); fields are then read from the underlying C structure, because
the Python attribute wrappers cost ~100 us per structure and the server has a
budget of well under a millisecond per attestation. MakeCredential is written on
``cryptography`` for the same reason (~36 us against ~183 us for
``tpm2_pytss.utils.make_credential``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass, field

from ansible_collections.kairos.kcrypt.plugins.module_utils.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils import identity

tss = optional_import("tpm2_pytss")
tss_types = optional_import("tpm2_pytss.types")
rsa = optional_import("cryptography.hazmat.primitives.asymmetric.rsa")
padding = optional_import("cryptography.hazmat.primitives.asymmetric.padding")
hashes = optional_import("cryptography.hazmat.primitives.hashes")
serialization = optional_import("cryptography.hazmat.primitives.serialization")
x509 = optional_import("cryptography.x509")
ciphers = optional_import("cryptography.hazmat.primitives.ciphers")
crypto_exceptions = optional_import("cryptography.exceptions")
# AES-CFB moved to the "decrepit" package in cryptography 43; older releases keep it in primitives.
_decrepit_modes = optional_import("cryptography.hazmat.decrepit.ciphers.modes")
_CFB = getattr(_decrepit_modes, "CFB", None) or getattr(optional_import("cryptography.hazmat.primitives.ciphers.modes"), "CFB", None)

# -- constants (TPM 2.0 Part 2) --------------------------------------------

TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
ST_ATTEST_CREATION = 0x801A
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
HASH_BY_ALG = {ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
ATTR_FIXED_TPM = 0x00000002
ATTR_FIXED_PARENT = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN = 0x00000020
ATTR_RESTRICTED = 0x00010000
ATTR_DECRYPT = 0x00020000
ATTR_SIGN = 0x00040000

MIN_RSA_BITS = 2048
SECRET_SIZE = 32  # go-attestation activationSecretLen
SEED_SIZE = 16  # symBlockSize: AES-128 seed for an RSA-2048 EK
QUOTE_PCRS = (0, 7, 11)  # hard-coded by upstream clients
QUOTE_VERSION = "2"
IDENTITY_LABEL = b"IDENTITY\x00"

# How the server treats the quote's qualifying data (extraData); see verify_quote.
NONCE_OFF = "off"
NONCE_WHEN_SUPPORTED = "when-supported"
NONCE_REQUIRED = "required"
NONCE_MODES = (NONCE_OFF, NONCE_WHEN_SUPPORTED, NONCE_REQUIRED)

# Endpoints (the server serves exactly these paths at the root, spec §2.A transport)
ATTESTATION_PATH = "/tpm-attestation"
GET_PASS_PATH = "/getPass"
POST_PASS_PATH = "/postPass"

# Legacy protocol
BEARER_PREFIX = "Bearer TPM"
GENERATED_BY_TPM = "tpm"
NO_SECRET_FOUND = "No secret found for"  # the legacy /getPass error that makes a client generate a key


class ProtocolError(KcryptError):
    """A message that cannot be parsed or a TPM structure that fails a check.

    The message is fit to send to the peer: it names what was wrong and carries
    no secret.
    """


class Rejection(KcryptError):
    """The KMS refused the attestation (credential, quote, or policy)."""


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
    """Parse one JSON object from a frame (text or bytes). Raises ProtocolError naming ``what``."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("%s is not UTF-8 JSON" % what) from None
    try:
        obj = json.loads(data)
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


def init_message(ek_spki_der, ak_params, defer_pcr_enrollment=False):
    """Client → server message 1 (``omitempty`` on the deferral flag, as upstream)."""
    message = {"ek_public": b64encode(ek_spki_der), "ak_params": ak_params.to_json()}
    if defer_pcr_enrollment:
        message["defer_pcr_enrollment"] = True
    return message


def parse_init(obj):
    """Server side of message 1. Field types are checked here; ak_params is decoded by the challenge step."""
    return AttestationInit(
        ek_public=b64decode(_field(obj, "ek_public"), "Go struct field AttestationInit.ek_public"),
        ak_params=_raw_json_field(obj, "ak_params"),
        defer_pcr_enrollment=_bool_field(obj, "defer_pcr_enrollment", "AttestationInit.defer_pcr_enrollment"),
    )


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
            if not key.isdigit() or (len(key) > 1 and key[0] == "0") or int(key) > 23:
                raise ProtocolError("invalid PCR index %r in quote (valid range: 0-23)" % key)
            pcrs[int(key)] = b64decode(value, "PCR %s" % key)
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


# -- EK handling -------------------------------------------------------------


@dataclass(frozen=True)
class EndorsementKey:
    """A node's EK as the server sees it: the key, its TPM hash and its PEM (what the policy stores)."""

    public_key: object
    tpm_hash: str
    pem: str

    @classmethod
    def from_key(cls, key):
        return cls(key, identity.tpm_hash(key), identity.public_key_pem(key))


_EK_CACHE = collections.OrderedDict()
EK_CACHE_SIZE = 4096  # nodes that attest again reuse the parsed key and its encodings


def load_ek_spki(der):
    """The EK from ``ek_public`` (DER SPKI) as an EndorsementKey. Only RSA EKs exist here (spec §1.1).

    The TPM hash is taken over the re-encoded SPKI, as upstream does, not over the bytes sent.
    """
    require("cryptography", "to read the EK")
    der = bytes(der)
    ek = _EK_CACHE.get(der)
    if ek is not None:
        _EK_CACHE.move_to_end(der)
        return ek
    try:
        ek = EndorsementKey.from_key(_check_ek(identity.load_spki(der)))
    except (ValueError, TypeError) as error:
        raise ProtocolError("parse EK SPKI: %s" % (error or "not a DER SubjectPublicKeyInfo")) from None
    _EK_CACHE[der] = ek
    if len(_EK_CACHE) > EK_CACHE_SIZE:
        _EK_CACHE.popitem(last=False)
    return ek


def load_ek_pem(pem):
    """The EK public key from a legacy token's PEM: a ``CERTIFICATE`` or a ``PUBLIC KEY`` block."""
    require("cryptography", "to read the EK")
    text = pem.decode("ascii", "replace") if isinstance(pem, (bytes, bytearray)) else pem
    try:
        if "-----BEGIN CERTIFICATE-----" in text:
            key = x509.load_pem_x509_certificate(text.encode("ascii")).public_key()
        elif "-----BEGIN PUBLIC KEY-----" in text:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            raise ProtocolError("invalid pemBytes: the EK is neither a CERTIFICATE nor a PUBLIC KEY PEM block")
    except ValueError as error:
        raise ProtocolError("error parsing the EK PEM: %s" % error) from None
    return _check_ek(key)


def _check_ek(key):
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProtocolError("the EK is a %s key; only RSA EKs are supported" % type(key).__name__)
    if key.key_size < MIN_RSA_BITS:
        raise ProtocolError("the EK is RSA-%d; at least %d bits are required" % (key.key_size, MIN_RSA_BITS))
    return key


# -- TPM structures ----------------------------------------------------------


_UNMARSHAL = {}


def _cdata(type_name, data, what):
    """Unmarshal ``data`` as the TPM type ``type_name`` with tpm2-pytss's libtss2 binding, exactly (no
    trailing bytes); returns the C structure. (``tss.<TYPE>.unmarshal`` does the same call and then builds
    a Python wrapper, which costs more than the unmarshalling itself.) Callers check the dependency."""
    entry = _UNMARSHAL.get(type_name)
    if entry is None:
        ffi = tss_types.ffi
        entry = _UNMARSHAL[type_name] = (getattr(tss_types.lib, "Tss2_MU_%s_Unmarshal" % type_name), ffi.typeof(type_name + " *"))
    function, pointer_type = entry
    ffi = tss_types.ffi
    out = ffi.new(pointer_type)
    offset = ffi.new("size_t *")
    rc = function(data, len(data), offset, out)
    if rc:
        raise ProtocolError("%s failed: %s" % (what, tss.TSS2_Exception(rc)))
    if offset[0] != len(data):
        raise ProtocolError("%s failed: %d unexpected trailing bytes" % (what, len(data) - offset[0]))
    return out


def _bytes(buffer, size):
    return bytes(tss_types.ffi.buffer(buffer, size))


def _tpm2b(value):
    """The content of a TPM2B_DIGEST/DATA/PUBLIC_KEY_RSA C structure."""
    return _bytes(value.buffer, value.size)


def _name(value):
    """The content of a TPM2B_NAME C structure."""
    return _bytes(value.name, value.size)


@dataclass(frozen=True)
class CheckedAK:
    """An AK that passed CheckAKParameters: its RSA public key and TPM Name (nameAlg || H(TPMT_PUBLIC))."""

    public_key: object
    name: bytes


def check_ak_parameters(params):
    """go-attestation's CheckAKParameters for a TPM 2.0 RSA AK (spec §2.A.1, checklist 11).

    Verifies the creation attestation is TPM-generated (magic 0xff544347) and of
    type ATTEST_CREATION, that it certifies this creation data and this public
    area (Name), that the key is fixedTPM, fixedParent, sensitiveDataOrigin,
    restricted and a signing key, RSA with at least 2048 bits, and that the
    creation signature verifies with the AK itself. Error texts follow
    go-attestation's. Returns CheckedAK.
    """
    require("cryptography", "to check attestation keys")
    require("tpm2_pytss", "to parse TPM structures")
    if len(params.create_signature) < 8:
        raise ProtocolError("signature is too short to be valid: only %d bytes" % len(params.create_signature))
    pub = _cdata("TPMT_PUBLIC", params.public, "DecodePublic()")
    _cdata("TPMS_CREATION_DATA", params.create_data, "DecodeCreationData()")
    att = _cdata("TPMS_ATTEST", params.create_attestation, "DecodeAttestationData()")
    if att.type != ST_ATTEST_CREATION:
        raise ProtocolError("attestation does not apply to creation data, got tag %x" % att.type)
    if pub.type != ALG_RSA:
        raise ProtocolError("public key of alg 0x%x not supported" % pub.type)
    detail = pub.parameters.rsaDetail
    if detail.keyBits < MIN_RSA_BITS:
        raise ProtocolError(
            "attestation key too small: must be at least %d bits but was %d bits" % (MIN_RSA_BITS, detail.keyBits)
        )
    name_hash = HASH_BY_ALG.get(pub.nameAlg)
    if name_hash is None:
        raise ProtocolError("HashConstructor() failed: name algorithm 0x%x is not supported" % pub.nameAlg)
    creation = att.attested.creation
    if _tpm2b(creation.creationHash) != hashlib.new(name_hash, params.create_data).digest():
        raise ProtocolError("attestation refers to different public key")
    if att.magic != TPM_GENERATED:
        raise ProtocolError("creation attestation was not produced by a TPM")
    attrs = pub.objectAttributes
    if not attrs & ATTR_FIXED_TPM:
        raise ProtocolError("provided key is exportable")
    if not attrs & ATTR_RESTRICTED or not attrs & ATTR_SIGN or attrs & ATTR_DECRYPT:
        raise ProtocolError("provided key is not limited to attestation")
    if not attrs & ATTR_FIXED_PARENT:
        raise ProtocolError("provided key can be duplicated to a different parent")
    if not attrs & ATTR_SENSITIVE_DATA_ORIGIN:
        raise ProtocolError("provided key is not created by TPM")
    name = struct.pack(">H", pub.nameAlg) + hashlib.new(name_hash, params.public).digest()
    if _name(creation.objectName) != name:
        raise ProtocolError("creation attestation refers to a different key")
    scheme = detail.scheme
    sign_hash = HASH_BY_ALG.get(scheme.details.rsassa.hashAlg) if scheme.scheme == ALG_RSASSA else None
    if sign_hash is None:
        raise ProtocolError("the AK's signing scheme must be RSASSA with SHA-256/384/512")
    public_key = rsa.RSAPublicNumbers(detail.exponent or 65537, int.from_bytes(_tpm2b(pub.unique.rsa), "big")).public_key()
    try:
        public_key.verify(
            _rsassa_signature(params.create_signature, "DecodeSignature()", sign_hash),
            params.create_attestation,
            padding.PKCS1v15(),
            _HASHES[sign_hash](),
        )
    except crypto_exceptions.InvalidSignature:
        raise ProtocolError("could not verify attestation: crypto/rsa: verification error") from None
    return CheckedAK(public_key, name)


def _rsassa_signature(data, what, expected_hash):
    sig = _cdata("TPMT_SIGNATURE", data, what)
    if sig.sigAlg != ALG_RSASSA:
        raise ProtocolError("unsupported signature algorithm: 0x%x (the AK signs with RSASSA)" % sig.sigAlg)
    rsassa = sig.signature.rsassa
    if HASH_BY_ALG.get(rsassa.hash) != expected_hash:
        raise ProtocolError("signature hash 0x%x does not match the AK's scheme (%s)" % (rsassa.hash, expected_hash))
    return _tpm2b(rsassa.sig)


_HASHES = {}
if hashes is not None:
    _HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


# -- MakeCredential (server) -----------------------------------------------


def kdfa(hash_name, key, label, context_u, context_v, bits):
    """TPM 2.0 KDFa (SP 800-108 counter mode, HMAC): label is NUL-terminated as go-tpm does."""
    size = (bits + 7) // 8
    out = b""
    counter = 0
    info = label + b"\x00" + context_u + context_v + struct.pack(">I", bits)
    while len(out) < size:
        counter += 1
        out += hmac.digest(key, struct.pack(">I", counter) + info, hash_name)
    return out[:size]


def _aes_cfb(key, data, encrypt):
    cipher = ciphers.Cipher(ciphers.algorithms.AES(key), _CFB(b"\x00" * 16))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


_OAEP = []


def _oaep_identity():
    if not _OAEP:  # built once: the padding object is immutable
        _OAEP.append(padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=IDENTITY_LABEL))
    return _OAEP[0]


def make_credential(ek_public_key, ak_name, secret=None, seed=None):
    """TPM2_MakeCredential in software for an RSA EK (go-tpm credactivation.Generate, spec §2.A.1).

    Returns (secret, EncryptedCredential). ``secret``/``seed`` are random unless
    given (tests use fixed values for golden vectors).
    """
    require("cryptography", "to build the credential challenge")
    random = os.urandom(SECRET_SIZE + SEED_SIZE)  # one getrandom() call for both
    secret = random[:SECRET_SIZE] if secret is None else secret
    seed = random[SECRET_SIZE:] if seed is None else seed
    encrypted_seed = ek_public_key.encrypt(seed, _oaep_identity())
    symmetric_key = kdfa("sha256", seed, b"STORAGE", ak_name, b"", len(seed) * 8)
    enc_identity = _aes_cfb(symmetric_key, struct.pack(">H", len(secret)) + secret, True)
    hmac_key = kdfa("sha256", seed, b"INTEGRITY", b"", b"", 256)
    integrity = hmac.digest(hmac_key, enc_identity + ak_name, "sha256")
    id_object = struct.pack(">H", len(integrity)) + integrity + enc_identity
    credential = struct.pack(">H", len(id_object)) + id_object
    return secret, EncryptedCredential(credential, struct.pack(">H", len(encrypted_seed)) + encrypted_seed)


def generate_challenge(ek_public_key, params):
    """CheckAKParameters then MakeCredential: (CheckedAK, secret, EncryptedCredential)."""
    ak = check_ak_parameters(params)
    secret, credential = make_credential(ek_public_key, ak.name)
    return ak, secret, credential


def secrets_equal(expected, received):
    """Constant-time comparison of the activation secret (upstream uses a byte loop)."""
    return hmac.compare_digest(expected, received)


# -- quotes --------------------------------------------------------------


def verify_quote(ak, pcr_quote, nonce=b"", nonce_mode=NONCE_WHEN_SUPPORTED):
    """Checklist 13 plus the nonce binding.

    The quote must be a TPM-generated ATTEST_QUOTE signed (RSASSA-SHA256) by the
    AK, over the SHA-256 bank, selecting exactly the PCRs provided, whose values
    (32 bytes each) hash in index order to the quote's digest. ``nonce`` is the
    activation secret; with ``nonce_mode``:

    * ``off``: extraData is ignored (upstream HEAD);
    * ``when-supported``: a quote that carries qualifying data must carry the
      nonce; an empty one (HEAD clients) is accepted;
    * ``required``: the quote must carry the nonce.

    Returns (pcrs, bound) where ``bound`` says the quote carried the nonce.
    Raises Rejection with upstream's wording (``PCR quote verification failed: ...``).
    """
    require("tpm2_pytss", "to parse TPM structures")
    try:
        return _verify_quote(ak, pcr_quote, nonce, nonce_mode)
    except ProtocolError as error:
        raise Rejection("PCR quote verification failed: %s" % error) from None


def _verify_quote(ak, pcr_quote, nonce, nonce_mode):
    if not pcr_quote.quote or not pcr_quote.signature:
        raise ProtocolError("quote signature verification failed: empty quote or signature")
    try:
        ak.public_key.verify(
            _rsassa_signature(pcr_quote.signature, "unmarshaling TPM signature", "sha256"),
            pcr_quote.quote,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except crypto_exceptions.InvalidSignature:
        raise ProtocolError("quote signature verification failed: crypto/rsa: verification error") from None
    except ProtocolError as error:
        raise ProtocolError("quote signature verification failed: %s" % error) from None
    prefix = "PCR verification against quote failed: "
    try:
        att = _cdata("TPMS_ATTEST", pcr_quote.quote, "decoding attestation data")
    except ProtocolError as error:
        raise ProtocolError(prefix + str(error)) from None
    if att.magic != TPM_GENERATED:
        raise ProtocolError(prefix + "the quote was not produced by a TPM")
    if att.type != ST_ATTEST_QUOTE:
        raise ProtocolError(prefix + "not a quote attestation, got type: 0x%x" % att.type)
    extra = _tpm2b(att.extraData)
    bound = bool(nonce) and hmac.compare_digest(extra, nonce)
    if nonce_mode == NONCE_REQUIRED or (nonce_mode == NONCE_WHEN_SUPPORTED and extra):
        if not nonce:
            raise ProtocolError(prefix + "a nonce is required to verify the quote is fresh")
        if not bound:
            raise ProtocolError(prefix + "quote was not produced for this attestation: qualifying data does not match the nonce")
    quote_info = att.attested.quote
    selection = quote_info.pcrSelect
    selected = set()
    for i in range(selection.count):
        entry = selection.pcrSelections[i]
        if entry.hash != ALG_SHA256:
            raise ProtocolError(prefix + "the quote covers PCR bank 0x%x; only the SHA-256 bank is accepted" % entry.hash)
        bitmap = _bytes(entry.pcrSelect, entry.sizeofSelect)
        for byte_index, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (1 << bit):
                    index = byte_index * 8 + bit
                    if index in selected:
                        raise ProtocolError(prefix + "PCR %d is selected twice in the quote" % index)
                    selected.add(index)
    provided = pcr_quote.pcrs
    for index in sorted(provided):
        if index not in selected:
            raise ProtocolError(prefix + "PCR %d was provided but not selected in the quote" % index)
    for index in sorted(selected):
        if index not in provided:
            raise ProtocolError(prefix + "PCR %d was selected in the quote but not provided" % index)
    for index in sorted(provided):
        if len(provided[index]) != 32:
            raise ProtocolError(prefix + "PCR %d value is %d bytes, a SHA-256 PCR has 32" % (index, len(provided[index])))
    digest = hashlib.sha256(b"".join(provided[i] for i in sorted(provided))).digest()
    if not hmac.compare_digest(_tpm2b(quote_info.pcrDigest), digest):
        raise ProtocolError(prefix + "PCR digest verification failed: the PCR values do not match the quoted digest")
    return dict(provided), bound


def pcrs_for_policy(pcrs):
    """{index: bytes} → upstream's PCR map for the policy: {"<decimal>": "<lowercase hex>"}."""
    return {str(index): value.hex() for index, value in pcrs.items()}


# -- server-side sessions ------------------------------------------------------

# Stage texts of upstream's server (handleTPMAttestation): the error sent to the
# client is "<stage>: <detail>".
STAGE_READ_INIT = "WebSocket read"
STAGE_CHALLENGE = "Challenge generation"
STAGE_READ_PROOF = "Proof read"
STAGE_VERIFY = "Attestation verification failed"


class StageError(KcryptError):
    """A failure at one protocol step; ``str()`` is the text upstream's server would send."""

    def __init__(self, stage, detail, rejection=False):
        self.stage = stage
        self.detail = detail
        self.rejection = rejection  # a security decision (logged at INFO upstream), not a malformed request
        super().__init__("%s: %s" % (stage, detail))


@dataclass
class VerifiedAttestation:
    """What the policy needs after a successful newest-protocol proof."""

    tpm_hash: str
    ek_pem: str
    pcrs: dict  # {"0": hex, ...}
    defer_pcr_enrollment: bool
    nonce_bound: bool  # the quote carried the activation secret


class AttestationSession:
    """Server side of one newest-protocol exchange: init → challenge, proof → verified identity."""

    def __init__(self, nonce_mode=NONCE_WHEN_SUPPORTED):
        if nonce_mode not in NONCE_MODES:
            raise KcryptError("nonce mode must be one of %s, not %r" % (", ".join(NONCE_MODES), nonce_mode))
        self.nonce_mode = nonce_mode
        self._ek = None
        self._ak = None
        self._secret = None
        self._init = None
        self.tpm_hash = ""

    def challenge(self, init_frame):
        """Message 1 in, message 2 out (a dict). Raises StageError."""
        try:
            self._init = parse_init(load_json_object(init_frame, "attestation.AttestationInit"))
        except ProtocolError as error:
            raise StageError(STAGE_READ_INIT, "reading attestation init: %s" % error) from None
        try:
            self._ek = load_ek_spki(self._init.ek_public)
            self.tpm_hash = self._ek.tpm_hash
            params = AttestationParameters.from_json(self._init.ak_params)
            self._ak, self._secret, credential = generate_challenge(self._ek.public_key, params)
        except ProtocolError as error:
            raise StageError(STAGE_CHALLENGE, "generating challenge: %s" % error) from None
        return challenge_message(credential)

    def verify(self, proof_frame):
        """Message 3 in; returns VerifiedAttestation. Raises StageError (rejection=True for verification failures)."""
        try:
            proof = parse_proof(load_json_object(proof_frame, "attestation.AttestationProof"))
        except ProtocolError as error:
            raise StageError(STAGE_READ_PROOF, "reading proof: %s" % error) from None
        if not secrets_equal(self._secret, proof.secret):
            raise StageError(STAGE_VERIFY, "invalid secret", rejection=True)
        try:
            pcr_quote = PCRQuote.from_json(proof.pcr_quote)
        except ProtocolError as error:
            raise StageError(STAGE_VERIFY, "unmarshaling PCR quote: %s" % error, rejection=True) from None
        try:
            pcrs, bound = verify_quote(self._ak, pcr_quote, self._secret, self.nonce_mode)
        except Rejection as error:
            raise StageError(STAGE_VERIFY, str(error), rejection=True) from None
        return VerifiedAttestation(
            tpm_hash=self.tpm_hash,
            ek_pem=self._ek.pem,
            pcrs=pcrs_for_policy(pcrs),
            defer_pcr_enrollment=self._init.defer_pcr_enrollment,
            nonce_bound=bound,
        )


class LegacyAuth:
    """Server side of the legacy Bearer-token challenge (tpm-helpers AuthRequest)."""

    def __init__(self, authorization):
        """Parse and check the token; raises ProtocolError with a text fit for the client."""
        ek_pem, params = parse_legacy_token(authorization)
        self.ek = load_ek_pem(ek_pem)
        self.tpm_hash = identity.tpm_hash(self.ek)
        _ak, self._secret, self._credential = generate_challenge(self.ek, params)

    def challenge_frame(self):
        return legacy_challenge(self._credential)

    def check_answer(self, frame):
        """Raises Rejection unless the answer carries the activation secret."""
        try:
            answer = parse_legacy_answer(frame)
        except ProtocolError as error:
            raise Rejection("unmarshalling challenge response: %s" % error) from None
        if not secrets_equal(self._secret, answer):
            raise Rejection("invalid challenge response")
