# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checklist 11 / issue 13.8: an AK made exactly as go-attestation v0.6.4's ``newAK`` makes it, by tpm2-tools on a
swtpm (no code of ours on the node side), is accepted, and our extra AK rules refuse nothing a TPM makes for it.

go-attestation (attest/wrapped_tpm20.go ``newAK``, attest/tpm.go templates, read at v0.6.4):

* parent: the SRK persisted at 0x81000001, ``defaultRSASRKTemplate`` (RSA-2048, SHA-256, FlagStorageDefault
  | FlagNoDA = fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt|noDA, AES-128-CFB,
  256 zero bytes of unique), created and persisted if absent;
* AK: ``tpm2.CreateKey(srk, no PCRs, "", "", akTemplateRSA)``: RSA-2048, SHA-256, FlagSignerDefault |
  FlagNoDA (fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign|noDA), RSASSA-SHA256;
* ``tpm2.Load``, then ``tpm2.CertifyCreation(ak, ak, qualifying data nil, creationHash, RSASSA-SHA256, ticket)``.

The same with tpm2-tools: tpm2_createprimary + tpm2_evictcontrol, tpm2_create (--creation-data, -d, -t),
tpm2_load, tpm2_certifycreation. The node's whole exchange then runs on tpm2-tools too:
tpm2_activatecredential under PolicySecret(endorsement), tpm2_quote bound to the activation secret,
tpm2_pcrread; the server is ours, with the real policy and SQLite.
"""

from __future__ import annotations

import os
import struct
import subprocess

import pytest
import tpm2_pytss as tss
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity, messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation, policy, server, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import device
from support.challenger import ChallengerThread, connect

SRK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
CREDENTIAL_BLOB_MAGIC = b"\xba\xdc\xc0\xde\x00\x00\x00\x01"  # tpm2-tools' credential file: magic, version 1


@pytest.fixture
def tools(swtpm, tmp_path):
    """Run tpm2-tools against the swtpm (an EK certificate and the EK persisted at 0x81010001) in tmp_path."""
    env = dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti, TSS2_LOG="all+NONE")

    def run(*args, check=True):
        result = subprocess.run(list(args), env=env, cwd=str(tmp_path), capture_output=True, timeout=120, check=False)
        if check:
            assert result.returncode == 0, "%s: %s" % (" ".join(args), result.stderr.decode())
        return result

    run.path = tmp_path
    run.swtpm = swtpm
    return run


def _read(tools, name):
    with open(os.path.join(str(tools.path), name), "rb") as handle:
        return handle.read()


def _persist_srk(tools):
    """go-attestation's SRK (defaultRSASRKTemplate, 256 zero bytes of unique) at 0x81000001."""
    (tools.path / "zero-unique").write_bytes(b"\x00" * 256)
    tools("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048:aes128cfb", "-a", SRK_ATTRIBUTES,
          "-u", "zero-unique", "-c", "srk.ctx")
    tools("tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", hex(device.SRK_PERSISTENT_HANDLE))
    tools("tpm2_flushcontext", "-t")


def _new_ak(tools):
    """go-attestation's newAK with tpm2-tools; AttestationParameters as go-attestation sends them."""
    _persist_srk(tools)
    tools("tpm2_create", "-C", hex(device.SRK_PERSISTENT_HANDLE), "-g", "sha256", "-G", "rsa2048:rsassa-sha256:null",
          "-a", AK_ATTRIBUTES, "-u", "ak.pub", "-r", "ak.priv", "--creation-data", "ak.creation", "-d", "ak.creation-hash",
          "-t", "ak.ticket")
    tools("tpm2_load", "-C", hex(device.SRK_PERSISTENT_HANDLE), "-u", "ak.pub", "-r", "ak.priv", "-c", "ak.ctx")
    tools("tpm2_certifycreation", "-C", "ak.ctx", "-c", "ak.ctx", "-d", "ak.creation-hash", "-t", "ak.ticket",
          "-g", "sha256", "-s", "rsassa", "-o", "ak.signature", "--attestation", "ak.attest")
    tools("tpm2_flushcontext", "-t")
    # tpm2-tools writes TPM2B_PUBLIC and TPM2B_CREATION_DATA (size-prefixed); go-attestation sends the bare structures.
    return protocol.AttestationParameters(
        public=_read(tools, "ak.pub")[2:], create_data=_read(tools, "ak.creation")[2:],
        create_attestation=_read(tools, "ak.attest"), create_signature=_read(tools, "ak.signature"))


def _ek_spki(tools):
    tools("tpm2_readpublic", "-c", "0x81010001", "-f", "der", "-o", "ek.der")
    return identity.spki_der(identity.load_spki(_read(tools, "ek.der")))


def test_a_go_attestation_ak_made_by_tpm2_tools_passes_every_check(tools):
    params = _new_ak(tools)
    public = tss.TPMT_PUBLIC.unmarshal(params.public)[0]
    assert public.objectAttributes == device.ak_attributes()  # the template matches ours bit for bit
    checked = attestation.check_ak_parameters(params)
    assert checked.public_key.key_size == 2048 and checked.public_key.public_numbers().e == 65537


def test_the_whole_exchange_with_tpm2_tools_as_the_node(tools, tmp_path):
    params = _new_ak(tools)
    ek_spki = _ek_spki(tools)
    kms_store = store_factory.open_store("sqlite://%s/kms.db" % tmp_path)
    try:
        with ChallengerThread(server.Challenger(policy.Policy(kms_store), nonce_mode=attestation.NONCE_REQUIRED)) as kms:
            ws = connect(kms.ws_url, headers={"label": "COS_PERSISTENT", "name": "vda5", "uuid": ""})
            try:
                ws.send(protocol.write_json(protocol.init_message(ek_spki, params)))
                challenge = protocol.parse_challenge(protocol.load_json_object(ws.recv(), "challenge"))
                (tools.path / "credential.blob").write_bytes(CREDENTIAL_BLOB_MAGIC + challenge.credential + challenge.secret)
                tools("tpm2_load", "-C", hex(device.SRK_PERSISTENT_HANDLE), "-u", "ak.pub", "-r", "ak.priv", "-c", "ak.ctx")
                tools("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
                tools("tpm2_policysecret", "-S", "session.ctx", "-c", "e")
                tools("tpm2_activatecredential", "-c", "ak.ctx", "-C", "0x81010001", "-i", "credential.blob",
                      "-o", "secret", "-P", "session:session.ctx")
                tools("tpm2_flushcontext", "session.ctx")
                secret = _read(tools, "secret")
                tools("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,7,11", "-q", secret.hex(), "-g", "sha256",
                      "-m", "quote.attest", "-s", "quote.signature")
                tools("tpm2_pcrread", "sha256:0,7,11", "-o", "pcrs.bin")
                tools("tpm2_flushcontext", "-t")
                values = _read(tools, "pcrs.bin")
                pcrs = {index: values[i * 32:(i + 1) * 32] for i, index in enumerate((0, 7, 11))}
                quote = protocol.PCRQuote(protocol.QUOTE_VERSION, _read(tools, "quote.attest"), _read(tools, "quote.signature"), pcrs)
                ws.send(protocol.write_json(protocol.proof_message(secret, quote)))
                passphrase, error = protocol.parse_response(protocol.load_json_object(ws.recv(), "response"))
            finally:
                ws.close()
        assert error == "" and len(passphrase) == 44  # enrolled on first use: nonce bound, PCRs learned
        (volume,) = kms_store.volumes_for(identity.tpm_hash(identity.load_spki(ek_spki)))
        assert volume["spec"]["attestation"]["pcrValues"]["pcrs"] == {str(i): v.hex() for i, v in pcrs.items()}
    finally:
        kms_store.close()


def _tpm_create(swtpm, attributes, scheme):
    """TPM2_Create under the SRK with go-attestation's AK template changed: None when the TPM made it,
    else the TPM's response code."""
    with device.TPM(swtpm.tcti) as tpm:
        srk = tpm._srk_handle()
        template = device.ak_template(attributes)
        template.publicArea.parameters.rsaDetail.scheme = scheme
        try:
            tpm.esys.create(srk, None, template)
        except tss.TSS2_Exception as error:
            return error.rc & 0xBF  # the error without its parameter number
        return None


def _scheme(algorithm, hash_algorithm=tss.TPM2_ALG.SHA256):
    details = tss.TPMU_ASYM_SCHEME()
    if algorithm != tss.TPM2_ALG.NULL:
        details = tss.TPMU_ASYM_SCHEME(rsassa=tss.TPMS_SCHEME_HASH(hashAlg=hash_algorithm))
    return tss.TPMT_RSA_SCHEME(scheme=algorithm, details=details)


def test_what_the_extra_ak_rules_refuse_a_tpm_does_not_make(swtpm):
    """Our rules beyond go-attestation's CheckAKParameters (docs/challenger.md, "AK rules"): a TPM refuses to
    make a restricted key that both signs and decrypts, or a restricted signing key without a scheme."""
    restricted_signer = device.ak_attributes()
    assert _tpm_create(swtpm, restricted_signer | tss.TPMA_OBJECT.DECRYPT, _scheme(tss.TPM2_ALG.RSASSA)) == tss.TPM2_RC.ATTRIBUTES & 0xBF
    assert _tpm_create(swtpm, restricted_signer, _scheme(tss.TPM2_ALG.NULL)) == tss.TPM2_RC.SCHEME & 0xBF
    assert _tpm_create(swtpm, restricted_signer, _scheme(tss.TPM2_ALG.RSASSA)) is None  # the go-attestation AK itself


def test_an_rsapss_ak_fails_go_attestations_own_check_too(tools):
    """A TPM makes a restricted RSAPSS AK, but go-attestation verifies the creation signature as PKCS#1 v1.5,
    which a PSS signature never passes: upstream refuses it as well (we say why earlier)."""
    _persist_srk(tools)
    srk = hex(device.SRK_PERSISTENT_HANDLE)
    tools("tpm2_create", "-C", srk, "-g", "sha256", "-G", "rsa2048:rsapss-sha256:null", "-a", AK_ATTRIBUTES,
          "-u", "pss.pub", "-r", "pss.priv", "--creation-data", "pss.creation", "-d", "pss.hash", "-t", "pss.ticket")
    tools("tpm2_load", "-C", srk, "-u", "pss.pub", "-r", "pss.priv", "-c", "pss.ctx")
    tools("tpm2_certifycreation", "-C", "pss.ctx", "-c", "pss.ctx", "-d", "pss.hash", "-t", "pss.ticket", "-g", "sha256",
          "-s", "rsapss", "-o", "pss.signature", "--attestation", "pss.attest")
    tools("tpm2_flushcontext", "-t")
    params = protocol.AttestationParameters(_read(tools, "pss.pub")[2:], _read(tools, "pss.creation")[2:],
                                            _read(tools, "pss.attest"), _read(tools, "pss.signature"))
    signature = _read(tools, "pss.signature")
    assert struct.unpack(">H", signature[:2])[0] == 0x0016  # TPM_ALG_RSAPSS
    # go-attestation's verifyRSASignature: rsa.VerifyPKCS1v15(AK, scheme hash, H(CreateAttestation), signature)
    public = tss.TPMT_PUBLIC.unmarshal(params.public)[0]
    ak = rsa.RSAPublicNumbers(65537, int.from_bytes(bytes(public.unique.rsa), "big")).public_key()
    with pytest.raises(InvalidSignature):
        ak.verify(signature[6:], params.create_attestation, padding.PKCS1v15(), hashes.SHA256())
    ak.verify(signature[6:], params.create_attestation,  # the TPM's signature is fine, as PSS
              padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO), hashes.SHA256())
    with pytest.raises(protocol.ProtocolError, match="signing scheme must be RSASSA"):
        attestation.check_ak_parameters(params)
