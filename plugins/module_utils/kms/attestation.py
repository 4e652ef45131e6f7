# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Server side of the TPM proof: EK loading, AK checks, MakeCredential, quote verification, sessions.

Private to the collection. Used by the challenger (kms/server.py); the messages
themselves are in common/messages.py.

* go-attestation's ``CheckAKParameters`` (every check of §2.A.1), TPM2_MakeCredential,
  and quote verification (checklist 13) plus the nonce binding of upstream's pending
  fix (§2.A.2: the activation secret is the quote's qualifying data).
* :class:`AttestationSession` (newest protocol) and :class:`LegacyAuth` (legacy
  Bearer token): one exchange each.

TPM structures are unmarshalled by tpm2-pytss (libtss2's marshalling code
validates them); fields are then read from the underlying C structure, because
the Python attribute wrappers cost ~100 us per structure and the server has a
budget of well under a millisecond per attestation. MakeCredential is written on
``cryptography`` for the same reason (~36 us against ~183 us for
``tpm2_pytss.utils.make_credential``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.messages import (
    AttestationParameters,
    EncryptedCredential,
    PCRQuote,
    ProtocolError,
    challenge_message,
    legacy_challenge,
    load_json_object,
    parse_init,
    parse_legacy_answer,
    parse_legacy_token,
    parse_proof,
)

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
# What TPMs make (TCG EK templates, go-attestation's AK template): RSA-2048/3072/4096 with exponent 65537 (0 in
# a TPMT_PUBLIC). Anything else is refused before an RSA operation: a 2048-bit exponent costs 4-10x the CPU of
# a whole exchange and a 16384-bit modulus more (issue 14.4).
RSA_KEY_BITS = (2048, 3072, 4096)
RSA_EXPONENT = 65537
MAX_EK_SPKI_SIZE = 2048  # an RSA-4096 SubjectPublicKeyInfo is 550 bytes
SECRET_SIZE = 32  # go-attestation activationSecretLen
SEED_SIZE = 16  # symBlockSize: AES-128 seed for an RSA-2048 EK
IDENTITY_LABEL = b"IDENTITY\x00"

# How the server treats the quote's qualifying data (extraData); see verify_quote.
NONCE_OFF = "off"
NONCE_WHEN_SUPPORTED = "when-supported"
NONCE_REQUIRED = "required"
NONCE_MODES = (NONCE_OFF, NONCE_WHEN_SUPPORTED, NONCE_REQUIRED)


class Rejection(KcryptError):
    """The KMS refused the attestation (credential, quote, or policy)."""


# -- EK handling -------------------------------------------------------------


@dataclass(frozen=True)
class PresentedEK:
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
    """The EK from ``ek_public`` (DER SPKI) as an PresentedEK. Only RSA EKs exist here (spec §1.1).

    The TPM hash is taken over the re-encoded SPKI, as upstream does, not over the bytes sent. A key
    parsed here is cached only by ``remember_ek``, once its TPM has proven it holds it: unauthenticated
    requests cannot fill the cache (or push real nodes out of it).
    """
    require("cryptography", "to read the EK")
    der = bytes(der)
    ek = _EK_CACHE.get(der)
    if ek is not None:
        _EK_CACHE.move_to_end(der)
        return ek
    if len(der) > MAX_EK_SPKI_SIZE:
        raise ProtocolError("parse EK SPKI: %d bytes, more than any TPM EK (at most %d)" % (len(der), MAX_EK_SPKI_SIZE))
    try:
        key = identity.load_spki(der)
    except (ValueError, TypeError, crypto_exceptions.UnsupportedAlgorithm) as error:
        raise ProtocolError("parse EK SPKI: %s" % (error or "not a DER SubjectPublicKeyInfo")) from None
    return PresentedEK.from_key(_check_ek(key))


def remember_ek(der, ek):
    """Cache a PresentedEK whose TPM passed an attestation, for its next one."""
    der = bytes(der)
    _EK_CACHE[der] = ek
    _EK_CACHE.move_to_end(der)
    if len(_EK_CACHE) > EK_CACHE_SIZE:
        _EK_CACHE.popitem(last=False)


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
    except (ValueError, crypto_exceptions.UnsupportedAlgorithm) as error:
        raise ProtocolError("error parsing the EK PEM: %s" % error) from None
    return _check_ek(key)


def _check_ek(key):
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProtocolError("the EK is a %s key; only RSA EKs are supported" % type(key).__name__)
    if key.key_size not in RSA_KEY_BITS:
        raise ProtocolError("the EK is RSA-%d; TPM EKs are RSA-2048, 3072 or 4096" % key.key_size)
    exponent = key.public_numbers().e
    if exponent != RSA_EXPONENT:
        raise ProtocolError("the EK has %s; TPMs use 65537" % _describe_exponent(exponent))
    return key


def _describe_exponent(exponent):
    return "exponent of %d bits" % exponent.bit_length() if exponent.bit_length() > 32 else "exponent %d" % exponent


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
    modulus = _check_ak_rsa_parameters(detail.keyBits, detail.exponent, _tpm2b(pub.unique.rsa))
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
    try:
        public_key = rsa.RSAPublicNumbers(RSA_EXPONENT, modulus).public_key()
    except ValueError as error:  # unreachable after _check_ak_rsa_parameters; no input may escape as a traceback
        raise ProtocolError("the AK's RSA public key is invalid: %s" % error) from None
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


def _check_ak_rsa_parameters(key_bits, exponent, modulus_bytes):
    """The AK's modulus as an int, if its size and exponent are what a TPM makes; else ProtocolError."""
    if key_bits not in RSA_KEY_BITS:
        raise ProtocolError("the AK is RSA-%d; TPMs make RSA-2048, 3072 or 4096 AKs" % key_bits)
    if exponent not in (0, RSA_EXPONENT):  # 0 is the default exponent, 2^16+1 (TPM 2.0 Part 2, TPMS_RSA_PARMS)
        raise ProtocolError("the AK exponent %d; TPMs use 65537 (0 in the public area)" % exponent)
    if len(modulus_bytes) != key_bits // 8:
        raise ProtocolError("the AK modulus is %d bytes; an RSA-%d key has %d" % (len(modulus_bytes), key_bits, key_bits // 8))
    modulus = int.from_bytes(modulus_bytes, "big")
    if modulus.bit_length() != key_bits:
        raise ProtocolError("the AK modulus of RSA-%d has %d significant bits" % (key_bits, modulus.bit_length()))
    if not modulus & 1:
        raise ProtocolError("the AK modulus is even")
    return modulus


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
    ek_certificate: bytes = b""  # DER, as the node sent it (checked by the policy before an enrolment)
    ek_chain: tuple = ()  # DER CA certificates from the TPM's NV, as the node sent them


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
        remember_ek(self._init.ek_public, self._ek)
        return VerifiedAttestation(
            tpm_hash=self.tpm_hash,
            ek_pem=self._ek.pem,
            pcrs=pcrs_for_policy(pcrs),
            defer_pcr_enrollment=self._init.defer_pcr_enrollment,
            nonce_bound=bound,
            ek_certificate=self._init.ek_certificate,
            ek_chain=self._init.ek_chain,
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
