# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A TPM identity in software, for load tests and the benchmark (never shipped in plugins/).

``SoftTPM`` holds an RSA-2048 EK and AK and produces what a real TPM plus
go-attestation produce: byte-exact AttestationParameters (TPMT_PUBLIC of an AK
with go-attestation's template, TPMS_CREATION_DATA, a TPM_GENERATED
ATTEST_CREATION certified by the AK, TPMT_SIGNATURE), TPM2_ActivateCredential of
a MakeCredential blob, and PCR quotes signed RSASSA-SHA256. The challenger cannot
tell it from a TPM; swtpm-backed tests check that both produce structures the
server treats alike.

RSA key generation costs ~35 ms per key, so ``key_pool`` caches generated keys on
disk and the AK may be shared between identities (the server never stores AKs).
"""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
import tpm2_pytss as tss

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity, messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import device as tpm

ZERO_PCR = b"\x00" * 32
AK_ATTRIBUTES = tpm.ak_attributes()


def generate_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _generate_pem(_index):
    return generate_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_pool(count, cache_dir=None):
    """``count`` RSA-2048 private keys, cached as PEM under ``cache_dir`` (default ~/.cache/kcrypt)."""
    cache_dir = cache_dir or os.environ.get("KCRYPT_CACHE") or os.path.expanduser("~/.cache/kcrypt")
    path = os.path.join(cache_dir, "soft-tpm-rsa2048-keys.pem")
    pems = []
    if os.path.exists(path):
        with open(path, "rb") as handle:
            text = handle.read()
        marker = b"-----END PRIVATE KEY-----\n"
        pems = [block + marker for block in text.split(marker) if block.strip()]
    if len(pems) < count:
        missing = count - len(pems)
        with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 4)) as pool:
            pems.extend(pool.map(_generate_pem, range(missing)))
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".%d.tmp" % os.getpid()
        with open(tmp, "wb") as handle:
            handle.write(b"".join(pems))
        os.replace(tmp, path)
    # The keys were validated when generated here; re-validating costs ~50 ms per key.
    return [serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True) for pem in pems[:count]]


def _rsassa(key, data):
    signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return struct.pack(">HHH", attestation.ALG_RSASSA, attestation.ALG_SHA256, len(signature)) + signature


def _tpm2b(data):
    return struct.pack(">H", len(data)) + data


def quote_attest(signer_name, qualifying_data, pcr_values, clock=1000, firmware=0x2023_0101):
    """TPMS_ATTEST of a TPM2_Quote over the SHA-256 bank (marshalled by hand: it is built per attestation)."""
    bitmap = bytearray(3)
    for index in pcr_values:
        bitmap[index // 8] |= 1 << (index % 8)
    digest = hashlib.sha256(b"".join(pcr_values[i] for i in sorted(pcr_values))).digest()
    return (
        struct.pack(">IH", attestation.TPM_GENERATED, attestation.ST_ATTEST_QUOTE)
        + _tpm2b(signer_name)
        + _tpm2b(qualifying_data)
        + struct.pack(">QIIB", clock, 1, 0, 1)
        + struct.pack(">Q", firmware)
        + struct.pack(">IHB", 1, attestation.ALG_SHA256, 3) + bytes(bitmap)
        + _tpm2b(digest)
    )


class SoftTPM:
    """One software TPM identity: EK, AK, PCR bank (SHA-256, all zero at start)."""

    def __init__(self, ek_key=None, ak_key=None):
        self.ek_key = ek_key or generate_key()
        self.ak_key = ak_key or generate_key()
        self.ek_public = self.ek_key.public_key()
        self.pcrs = {i: ZERO_PCR for i in range(24)}
        self._params = None
        self._ak_name = None

    # -- identity --------------------------------------------------------

    @property
    def tpm_hash(self):
        return identity.tpm_hash(self.ek_public)

    @property
    def ek_spki_der(self):
        return identity.spki_der(self.ek_public)

    @property
    def ek_pem(self):
        return identity.public_key_pem(self.ek_public)

    def ak_public_area(self, attributes=AK_ATTRIBUTES, key_bits=2048):
        modulus = self.ak_key.public_key().public_numbers().n.to_bytes(256, "big")
        return tpm.ak_template(attributes, key_bits, unique=modulus).publicArea.marshal()

    def attestation_parameters(self, public=None, magic=attestation.TPM_GENERATED, sign_key=None):
        """go-attestation AttestationParameters of the AK (cached for the default arguments).

        ``public``/``magic``/``sign_key`` let tests forge bad parameters (wrong
        attributes, a creation attestation not made by a TPM, a foreign signer).
        """
        default = public is None and magic == attestation.TPM_GENERATED and sign_key is None
        if default and self._params is not None:
            return self._params
        public = public or self.ak_public_area()
        name = struct.pack(">H", attestation.ALG_SHA256) + hashlib.sha256(public).digest()
        parent = struct.pack(">H", attestation.ALG_SHA256) + hashlib.sha256(b"srk" + self.ek_spki_der).digest()
        create_data = tss.TPMS_CREATION_DATA(
            pcrSelect=tss.TPML_PCR_SELECTION(),
            pcrDigest=hashlib.sha256(b"").digest(),
            locality=tss.TPMA_LOCALITY.ZERO,
            parentNameAlg=tss.TPM2_ALG.SHA256,
            parentName=parent,
            parentQualifiedName=parent,
            outsideInfo=b"",
        ).marshal()
        attest = (
            struct.pack(">IH", magic, attestation.ST_ATTEST_CREATION)
            + _tpm2b(name)
            + _tpm2b(b"")
            + struct.pack(">QIIB", 500, 1, 0, 1)
            + struct.pack(">Q", 0x2023_0101)
            + _tpm2b(name)
            + _tpm2b(hashlib.sha256(create_data).digest())
        )
        params = protocol.AttestationParameters(public, create_data, attest, _rsassa(sign_key or self.ak_key, attest))
        if default:
            self._params = params
            self._ak_name = name
        return params

    @property
    def ak_name(self):
        self.attestation_parameters()
        return self._ak_name

    # -- TPM operations ------------------------------------------------------

    def activate_credential(self, credential, secret, ak_name=None):
        """TPM2_ActivateCredential: the 32-byte secret, or ValueError when the blob is not for this EK/AK."""
        ak_name = ak_name or self.ak_name
        (encrypted_seed_size,) = struct.unpack(">H", secret[:2])
        seed = self.ek_key.decrypt(
            secret[2 : 2 + encrypted_seed_size],
            padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=attestation.IDENTITY_LABEL),
        )
        id_object = credential[2:]
        (hmac_size,) = struct.unpack(">H", id_object[:2])
        integrity, enc_identity = id_object[2 : 2 + hmac_size], id_object[2 + hmac_size :]
        hmac_key = attestation.kdfa("sha256", seed, b"INTEGRITY", b"", b"", 256)
        if not hmac.compare_digest(integrity, hmac.digest(hmac_key, enc_identity + ak_name, "sha256")):
            raise ValueError("credential integrity check failed")
        plain = attestation._aes_cfb(attestation.kdfa("sha256", seed, b"STORAGE", ak_name, b"", len(seed) * 8), enc_identity, False)
        (size,) = struct.unpack(">H", plain[:2])
        return plain[2 : 2 + size]

    def pcr_extend(self, index, data):
        self.pcrs[index] = hashlib.sha256(self.pcrs[index] + hashlib.sha256(data).digest()).digest()

    def pcr_values(self, indices=protocol.QUOTE_PCRS):
        return {i: self.pcrs[i] for i in indices}

    def quote(self, indices=protocol.QUOTE_PCRS, qualifying_data=b"", sign_key=None):
        """(TPMS_ATTEST, TPMT_SIGNATURE) of a quote over ``indices`` as they are now."""
        attest = quote_attest(self.ak_name, qualifying_data, self.pcr_values(indices))
        return attest, _rsassa(sign_key or self.ak_key, attest)

    # -- whole messages --------------------------------------------------------

    def init_message(self, defer_pcr_enrollment=False):
        return protocol.init_message(self.ek_spki_der, self.attestation_parameters(), defer_pcr_enrollment)

    def proof_message(self, challenge, nonce=True, indices=protocol.QUOTE_PCRS):
        """Message 3 for a parsed challenge dict; ``nonce`` binds the quote to the activation secret."""
        ec = protocol.parse_challenge(challenge)
        secret = self.activate_credential(ec.credential, ec.secret)
        quote, signature = self.quote(indices, secret if nonce else b"")
        return protocol.proof_message(secret, protocol.PCRQuote(protocol.QUOTE_VERSION, quote, signature, self.pcr_values(indices)))

    def legacy_token(self):
        return protocol.legacy_token(self.ek_pem, self.attestation_parameters())

    def legacy_answer(self, frame):
        ec = protocol.parse_legacy_challenge(frame)
        return protocol.legacy_answer(self.activate_credential(ec.credential, ec.secret))
