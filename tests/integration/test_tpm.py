# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TPM layer against real swtpm instances, cross-checked with tpm2-tools."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from tpm2_pytss import TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob as tpm_blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError, TPMError, TPMNotFoundError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM, EK_PERSISTENT_HANDLE


def tools_env(swtpm):
    env = dict(os.environ)
    env["TPM2TOOLS_TCTI"] = swtpm.tcti
    env["TSS2_LOG"] = "all+NONE"
    return env


def tpm2_tools_hash(swtpm, tmp_path):
    """The TPM hash computed independently: tpm2_createek + openssl + sha256."""
    pem = tmp_path / "ek.pem"
    subprocess.run(
        ["tpm2_createek", "-G", "rsa", "-c", str(tmp_path / "ek.ctx"), "-u", str(pem), "-f", "pem"],
        env=tools_env(swtpm), check=True, capture_output=True,
    )
    subprocess.run(["tpm2_flushcontext", "-t"], env=tools_env(swtpm), check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(pem), "-outform", "DER"], check=True, capture_output=True
    ).stdout
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("ek_cert", [True, False], ids=["with-ek-cert", "template-ek"])
def test_hash_matches_tpm2_tools(swtpm_factory, tmp_path, ek_cert):
    swtpm = swtpm_factory(ek_cert=ek_cert)
    with TPM(swtpm.tcti) as tpm:
        ek = tpm.endorsement_key()
    assert (ek.certificate is not None) is ek_cert
    assert len(ek.tpm_hash) == 64 and ek.tpm_hash == ek.tpm_hash.lower()
    assert ek.tpm_hash == tpm2_tools_hash(swtpm, tmp_path)
    assert ek.public_pem.startswith("-----BEGIN PUBLIC KEY-----\n") and ek.public_pem.endswith("-----END PUBLIC KEY-----\n")
    swtpm.stop()


def test_hash_stable_across_restarts_and_distinct_between_tpms(swtpm_factory):
    first = swtpm_factory(fresh=True)
    second = swtpm_factory(fresh=True)
    with TPM(first.tcti) as tpm:
        before = tpm.endorsement_key().tpm_hash
    first.restart()
    with TPM(first.tcti) as tpm:
        after = tpm.endorsement_key().tpm_hash
    with TPM(second.tcti) as tpm:
        other = tpm.endorsement_key().tpm_hash
    assert before == after
    assert other != before
    first.stop()
    second.stop()


def test_ek_certificate_key_equals_template_key(swtpm):
    """With a certificate the hash is of the certificate's key; it must be the key the template yields."""
    with TPM(swtpm.tcti) as tpm:
        ek = tpm.endorsement_key()
        assert ek.certificate is not None
        from tpm2_pytss.utils import NVReadEK, create_ek_template
        import tpm2_pytss as tss

        template = create_ek_template("EK-RSA2048", NVReadEK(tpm.esys))[1]
        handle, public = tpm.esys.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)[:2]
        tpm.esys.flush_context(handle)
        assert int.from_bytes(bytes(public.publicArea.unique.rsa), "big") == ek.public_key.public_numbers().n


def test_nv_define_write_read_undefine(swtpm):
    data = os.urandom(700)  # larger than one NV buffer chunk on most TPMs
    index = 0x01500123
    with TPM(swtpm.tcti) as tpm:
        assert tpm.nv_read(index) is None
        assert not tpm.nv_exists(index)
        tpm.nv_write(index, data)
        assert tpm.nv_exists(index)
        assert tpm.nv_read(index) == data
        with pytest.raises(TPMError, match="already defined"):
            tpm.nv_write(index, b"other")
        assert tpm.nv_read(index) == data
        assert tpm.nv_undefine(index) is True
        assert tpm.nv_undefine(index) is False
        assert tpm.nv_read(index) is None


def test_nv_readable_by_tpm2_tools(swtpm, tmp_path):
    index = 0x01500124
    with TPM(swtpm.tcti) as tpm:
        tpm.nv_write(index, b"kairos")
    out = subprocess.run(
        ["tpm2_nvread", "-C", "o", hex(index)], env=tools_env(swtpm), check=True, capture_output=True
    ).stdout
    assert out == b"kairos"


def _nvreadpublic(swtpm, index):
    """tpm2_nvreadpublic's report of one index, without the index line and the name (they differ per index)."""
    out = subprocess.run(["tpm2_nvreadpublic", index], env=tools_env(swtpm), check=True, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip() and not line.strip().startswith("name:")]


@pytest.mark.parametrize("layout, name_alg, alg_value", [("go-tpm", "sha256", "0xB"), ("tpmk", "sha1", "0x4")])
def test_offline_nv_index_and_key_look_like_upstreams(swtpm, tmp_path, layout, name_alg, alg_value):
    """Checklist 46, compared with what tpm2-tools prints: an index we wrote reads exactly like one
    written the upstream way (go-tpm tpm-helpers: name algorithm SHA-256; tpmk / go-tpm's legacy
    NVDefineSpace: SHA-1), and the key at c_index has tpm-helpers' template."""
    with TPM(swtpm.tcti) as tpm:
        tpm_blob.nv_passphrase(tpm, layout=layout)
    ours = _nvreadpublic(swtpm, "0x1500000")
    assert ours == [
        "hash algorithm:", "friendly: %s" % name_alg, "value: %s" % alg_value,
        "attributes:", "friendly: ownerwrite|ppread|ownerread|authread|written", "value: 0x20070002",
        "size: 256",
    ]
    env = tools_env(swtpm)
    (tmp_path / "blob").write_bytes(os.urandom(256))
    subprocess.run(["tpm2_nvdefine", "0x1500007", "-C", "o", "-s", "256", "-g", name_alg, "-a", "ownerwrite|ownerread|authread|ppread"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_nvwrite", "0x1500007", "-C", "o", "-i", str(tmp_path / "blob")], env=env, check=True, capture_output=True)
    assert _nvreadpublic(swtpm, "0x1500007") == ours
    key = subprocess.run(["tpm2_readpublic", "-c", "0x81000008"], env=env, check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in key.splitlines() if line and not line.startswith(" ") and ":" in line)
    assert {k: v.strip() for k, v in fields.items() if k in ("exponent", "bits", "sym-keybits")} == {
        "exponent": "65537", "bits": "2048", "sym-keybits": "0"}
    assert "name-alg:\n  value: sha256" in key
    assert "attributes:\n  value: sensitivedataorigin|userwithauth|decrypt|sign\n" in key
    assert "type:\n  value: rsa" in key and "scheme:\n  value: null" in key and "sym-alg:\n  value: null" in key


@pytest.mark.parametrize("c_index", [0x81000008, 0x81000042], ids=["default", "custom"])
def test_owner_key_encrypt_in_software_decrypt_in_tpm(swtpm, c_index):
    with TPM(swtpm.tcti) as tpm:
        public, created = tpm.owner_key_public(c_index)
        assert created is True
        again, created_again = tpm.owner_key_public(c_index)
        assert created_again is False
        assert again.public_numbers() == public.public_numbers()
        ciphertext = public.encrypt(
            b"secret", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        )
        assert len(ciphertext) == 256
        assert tpm.rsa_decrypt(c_index, ciphertext) == b"secret"
        with pytest.raises(TPMError):
            tpm.rsa_decrypt(c_index, b"\x00" * 256)


def test_offline_blob_roundtrip_and_tpm2_tools_decrypt(swtpm, tmp_path):
    """The NV blob holds OAEP-SHA256 under c_index: tpm2-tools alone recovers the passphrase."""
    with TPM(swtpm.tcti) as tpm:
        passphrase, created = tpm_blob.nv_passphrase(tpm)
        assert created is True
        assert len(passphrase) == 32 and passphrase.decode().isalnum() and passphrase.decode() == passphrase.decode().lower()
        again, created_again = tpm_blob.nv_passphrase(tpm)
        assert (again, created_again) == (passphrase, False)
    blob = tmp_path / "blob"
    env = tools_env(swtpm)
    subprocess.run(["tpm2_nvread", "-C", "o", "-o", str(blob), "0x1500000"], env=env, check=True, capture_output=True)
    assert blob.stat().st_size == 256
    plain = subprocess.run(
        ["tpm2_rsadecrypt", "-c", "0x81000008", "-s", "oaep", str(blob)],
        env=env, check=True, capture_output=True,
    ).stdout
    assert plain == passphrase


def test_wrong_c_index_gives_clear_error(swtpm, tmp_path):
    """A blob read with another RSA key fails with a message naming the index and key, not a traceback."""
    env = tools_env(swtpm)
    ctx = str(tmp_path / "other.ctx")
    # The upstream template is deterministic per owner seed, so make a key that differs in its attributes.
    subprocess.run(
        ["tpm2_createprimary", "-C", "o", "-G", "rsa2048:null:null", "-c", ctx,
         "-a", "decrypt|sign|userwithauth|sensitivedataorigin|fixedtpm|fixedparent"],
        env=env, check=True, capture_output=True,
    )
    subprocess.run(["tpm2_evictcontrol", "-C", "o", "-c", ctx, "0x81000009"], env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    with TPM(swtpm.tcti) as tpm:
        tpm_blob.nv_passphrase(tpm, c_index=0x81000008)
        with pytest.raises(KcryptError, match="NV index 0x1500000 holds 256 bytes that the key at 0x81000009 cannot decrypt"):
            tpm_blob.read_nv_passphrase(tpm, c_index=0x81000009)


def test_ak_activation_and_quote(swtpm):
    """AK under the SRK, credential activation under the EK policy, quote over PCRs; nothing left loaded."""
    from cryptography.hazmat.primitives.asymmetric import utils as asym_utils  # noqa: F401
    import tpm2_pytss as tss

    with TPM(swtpm.tcti) as tpm:
        ak = tpm.create_ak()
        public = TPMT_PUBLIC.unmarshal(ak.public)[0]
        attrs = public.objectAttributes
        assert attrs & tss.TPMA_OBJECT.RESTRICTED and attrs & tss.TPMA_OBJECT.FIXEDTPM
        assert attrs & tss.TPMA_OBJECT.SIGN_ENCRYPT and not attrs & tss.TPMA_OBJECT.DECRYPT
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        template = create_ek_template("EK-RSA2048", NVReadEK(tpm.esys))[1]
        handle, ek_public = tpm.esys.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)[:2]
        tpm.esys.flush_context(handle)
        secret = os.urandom(32)
        credential, encrypted_secret = make_credential(ek_public, secret, public.get_name())
        assert tpm.activate_credential(ak, credential.marshal(), encrypted_secret.marshal()) == secret

        tpm.pcr_extend(7, b"boot state")
        values = tpm.pcr_read([0, 7, 11])
        assert values[0] == b"\x00" * 32 and values[7] != b"\x00" * 32
        attest, signature = tpm.quote(ak, [0, 7, 11], b"nonce-1234")
        quoted = tss.TPMS_ATTEST.unmarshal(attest)[0]
        assert quoted.type == tss.TPM2_ST.ATTEST_QUOTE
        assert bytes(quoted.extraData) == b"nonce-1234"
        expected = hashlib.sha256(values[0] + values[7] + values[11]).digest()
        assert bytes(quoted.attested.quote.pcrDigest) == expected
        sig = tss.TPMT_SIGNATURE.unmarshal(signature)[0]
        ak_key = tpm_public_to_key(public)
        ak_key.verify(bytes(sig.signature.rsassa.sig), attest, padding.PKCS1v15(), hashes.SHA256())
        assert tpm._handles(0x80000000) == []


def test_activation_with_wrong_ek_fails(swtpm_factory):
    """A credential made for another TPM's EK does not activate."""
    import tpm2_pytss as tss
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    ours = swtpm_factory(fresh=True)
    theirs = swtpm_factory(fresh=True)
    with TPM(theirs.tcti) as other:
        template = create_ek_template("EK-RSA2048", NVReadEK(other.esys))[1]
        handle, their_ek = other.esys.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)[:2]
        other.esys.flush_context(handle)
    with TPM(ours.tcti) as tpm:
        ak = tpm.create_ak()
        public = TPMT_PUBLIC.unmarshal(ak.public)[0]
        credential, encrypted_secret = make_credential(their_ek, os.urandom(32), public.get_name())
        with pytest.raises(TPMError, match="activating the credential"):
            tpm.activate_credential(ak, credential.marshal(), encrypted_secret.marshal())
        assert tpm._handles(0x80000000) == []
    ours.stop()
    theirs.stop()


def test_leftover_objects_are_flushed_on_open(swtpm):
    """swtpm has no resource manager: a crashed process's objects must not exhaust the 3 slots."""
    import tpm2_pytss as tss
    from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import _srk_template

    crashed = TPM(swtpm.tcti).open()
    for dummy in range(3):
        crashed.esys.create_primary(None, _srk_template(), tss.ESYS_TR.OWNER)
    crashed._tcti_ctx = None  # simulate a crash: the connection drops without flushing
    crashed.esys = None
    with TPM(swtpm.tcti) as tpm:
        assert tpm._handles(0x80000000) == []
        tpm.create_ak()


def test_ek_persistent_handle_untouched(swtpm_plain):
    """Reading the identity and activating never persist an EK (go-attestation would; we leave the TPM as it was)."""
    with TPM(swtpm_plain.tcti) as tpm:
        tpm.endorsement_key()
        tpm.create_ak()
        assert EK_PERSISTENT_HANDLE not in tpm._handles(0x81000000)


@pytest.mark.parametrize(
    "device, error, message",
    [
        ("/dev/no-such-tpm", TPMNotFoundError, "no TPM at /dev/no-such-tpm"),
        ("/etc/hostname", TPMNotFoundError, "neither a TPM character device nor a swtpm socket"),
        ("bogus:host=x", TPMError, "neither a device path nor a TCTI string"),
        ("swtpm:host=127.0.0.1,port=1", TPMError, "cannot open the TPM at swtpm:host=127.0.0.1,port=1"),
    ],
)
def test_bad_devices(device, error, message):
    with pytest.raises(error, match=message):
        TPM(device).open()


def test_no_default_device(monkeypatch):
    monkeypatch.delenv("KCRYPT_TPM_DEVICE", raising=False)
    monkeypatch.setattr("ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device.DEFAULT_DEVICES", ("/nonexistent/tpmrm0", "/nonexistent/tpm0"))
    with pytest.raises(TPMNotFoundError, match="no TPM at /nonexistent/tpmrm0 or /nonexistent/tpm0; set tpm_device"):
        TPM()


def test_environment_variable_selects_device(monkeypatch, swtpm):
    monkeypatch.setenv("KCRYPT_TPM_DEVICE", swtpm.tcti)
    with TPM() as tpm:
        assert tpm.tcti == swtpm.tcti
        assert len(tpm.endorsement_key().tpm_hash) == 64


def tpm_public_to_key(public):
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPublicNumbers(public.parameters.rsaDetail.exponent or 65537, int.from_bytes(bytes(public.unique.rsa), "big")).public_key()


def test_ek_nonce_in_nv_is_honoured(swtpm_plain, tmp_path):
    """A nonce at NV 0x01c00003 goes into the template's unique field (TCG EK profile, go-attestation).

    tpm2_createek ignores the nonce and tpm2_createprimary 5.4 fails on --unique-data, so the
    expectation comes from CreatePrimary with the TCG low-range template spelled out here by hand.
    """
    import tpm2_pytss as tss

    env = tools_env(swtpm_plain)
    nonce = b"kairos-ek-nonce"
    (tmp_path / "nonce").write_bytes(nonce)
    subprocess.run(["tpm2_nvdefine", "0x01c00003", "-C", "o", "-s", str(len(nonce)), "-a", "ownerread|ownerwrite|authread|authwrite"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_nvwrite", "0x01c00003", "-C", "o", "-i", str(tmp_path / "nonce")], env=env, check=True, capture_output=True)
    template = tss.TPM2B_PUBLIC(publicArea=tss.TPMT_PUBLIC(
        type=tss.TPM2_ALG.RSA,
        nameAlg=tss.TPM2_ALG.SHA256,
        objectAttributes=tss.TPMA_OBJECT.FIXEDTPM | tss.TPMA_OBJECT.FIXEDPARENT | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | tss.TPMA_OBJECT.ADMINWITHPOLICY | tss.TPMA_OBJECT.RESTRICTED | tss.TPMA_OBJECT.DECRYPT,
        authPolicy=bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"),
        parameters=tss.TPMU_PUBLIC_PARMS(rsaDetail=tss.TPMS_RSA_PARMS(
            symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.AES, keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
                                              mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB)),
            scheme=tss.TPMT_RSA_SCHEME(scheme=tss.TPM2_ALG.NULL), keyBits=2048, exponent=0)),
        unique=tss.TPMU_PUBLIC_ID(rsa=nonce + b"\x00" * (256 - len(nonce))),
    ))
    with TPM(swtpm_plain.tcti) as tpm:
        handle, public = tpm.esys.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)[:2]
        tpm.esys.flush_context(handle)
        expected = int.from_bytes(bytes(public.publicArea.unique.rsa), "big")
        ek = tpm.endorsement_key()
    assert ek.public_key.public_numbers().n == expected
    assert ek.tpm_hash != tpm2_tools_hash(swtpm_plain, tmp_path)  # without the nonce the key differs


def test_ek_certificate_in_nv_decides_the_identity(swtpm_plain, tmp_path):
    """Checklist 2: with an RSA certificate at NV 0x01c00002 the EK is the certificate's key, even when
    the TCG template would yield another key (go-attestation's EKs() takes the certificate first)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    with TPM(swtpm_plain.tcti) as tpm:
        template_ek = tpm.endorsement_key()
    assert template_ek.certificate is None
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kcrypt test EK")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER) + b"\x00" * 16  # vendors zero-pad the NV area
    (tmp_path / "cert.der").write_bytes(der)
    env = tools_env(swtpm_plain)
    subprocess.run(["tpm2_nvdefine", "0x01c00002", "-C", "o", "-s", str(len(der)), "-a", "ownerread|ownerwrite|authread|ppread"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_nvwrite", "0x01c00002", "-C", "o", "-i", str(tmp_path / "cert.der")], env=env, check=True, capture_output=True)
    with TPM(swtpm_plain.tcti) as tpm:
        ek = tpm.endorsement_key()
    assert ek.certificate is not None and ek.certificate_pem == cert.public_bytes(serialization.Encoding.PEM).decode()
    assert ek.public_key.public_numbers() == key.public_key().public_numbers()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ek.tpm_hash == hashlib.sha256(spki).hexdigest() != template_ek.tpm_hash


def _self_signed_ek_certificate():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kcrypt wrapped EK")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert


def _write_ek_certificate_nv(swtpm, tmp_path, data):
    """Define NV 0x01c00002 and write ``data`` with tpm2-tools alone (as a vendor provisions it)."""
    (tmp_path / "ekcert.bin").write_bytes(data)
    env = tools_env(swtpm)
    subprocess.run(["tpm2_nvdefine", "0x01c00002", "-C", "o", "-s", str(len(data)), "-a", "ownerread|ownerwrite|authread|ppread"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_nvwrite", "0x01c00002", "-C", "o", "-i", str(tmp_path / "ekcert.bin")], env=env, check=True, capture_output=True)


def test_wrapped_ek_certificate_is_unwrapped_as_go_attestation_does(swtpm_plain, tmp_path):
    """Checklist 2 / issue 13 item 6: some TPMs store the EK certificate with the TCG PC Client NV header
    ``10 01 00 LL LL`` (go-attestation v0.6.4 attest/tpm.go ParseEKCertificate strips it). The identity is
    then the certificate's key and the certificate is what the legacy token and ``info`` carry, not the
    template EK's PUBLIC KEY. Written into swtpm's NV by tpm2-tools alone."""
    from cryptography.hazmat.primitives import serialization

    key, cert = _self_signed_ek_certificate()
    der = cert.public_bytes(serialization.Encoding.DER)
    wrapped = b"\x10\x01\x00" + len(der).to_bytes(2, "big") + der + b"\xff" * 8  # padding after the announced length
    _write_ek_certificate_nv(swtpm_plain, tmp_path, wrapped)
    out = subprocess.run(["tpm2_nvread", "0x01c00002", "-C", "o"], env=tools_env(swtpm_plain), check=True, capture_output=True).stdout
    assert out[:3] == b"\x10\x01\x00"  # what the TPM really holds
    with TPM(swtpm_plain.tcti) as tpm:
        ek = tpm.endorsement_key()
    assert ek.certificate is not None
    assert ek.certificate_pem == cert.public_bytes(serialization.Encoding.PEM).decode()
    assert ek.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ek.tpm_hash == hashlib.sha256(spki).hexdigest()


def test_wrapped_ek_certificate_with_a_wrong_length_falls_back_to_the_template(swtpm_plain, tmp_path):
    """go-attestation refuses a header announcing more bytes than the index holds; EKs() then creates the template EK."""
    from cryptography.hazmat.primitives import serialization

    with TPM(swtpm_plain.tcti) as tpm:
        template_hash = tpm.endorsement_key().tpm_hash
    der = _self_signed_ek_certificate()[1].public_bytes(serialization.Encoding.DER)
    _write_ek_certificate_nv(swtpm_plain, tmp_path, b"\x10\x01\x00" + (len(der) + 10).to_bytes(2, "big") + der)
    with TPM(swtpm_plain.tcti) as tpm:
        ek = tpm.endorsement_key()
    assert ek.certificate is None and ek.tpm_hash == template_hash == tpm2_tools_hash(swtpm_plain, tmp_path)


# -- issue 13 item 7: both NV layouts, proven with keys and blobs that tpm2-tools alone builds --------
#
# What upstream writes was read from the source: tpm-helpers' go-tpm code (tpm_encrypt.go createRSAKey:
# Unique = 256 zero bytes; tpm_nv.go StoreBlob: NameAlg SHA-256), the version kairos-sdk v0.25.2 pins
# (its go.sum, like kcrypt-discovery-challenger v0.13.4's, has no folbricht/tpmk); the older tpmk code
# (tpm-helpers main, e914e08) leaves unique empty and go-tpm's legacy NVDefineSpace uses SHA-1.

OWNER_KEY_ATTRS = "sign|decrypt|userwithauth|sensitivedataorigin"
NV_ATTRS = "ownerwrite|ownerread|authread|ppread"
TOOLS_UNIQUE = {"go-tpm": True, "tpmk": False}


def _createprimary(layout, ctx):
    """tpm2_createprimary with tpm-helpers' owner key template. The go-tpm layout's 256-byte zero unique
    goes in through stdin: tpm2-tools 5.4 ignores a -u FILE here (the key equals the empty-unique one),
    while ``-u -`` applies it."""
    command = ["tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048:null:null", "-a", OWNER_KEY_ATTRS, "-c", ctx]
    return command + (["-u", "-"] if TOOLS_UNIQUE[layout] else [])


def _unique_input(layout):
    return b"\x00" * 256 if TOOLS_UNIQUE[layout] else b""


def _tools_owner_key(swtpm, tmp_path, layout, persist=None):
    """tpm2_createprimary with tpm-helpers' template for ``layout``; returns the public PEM path."""
    env = tools_env(swtpm)
    ctx, pem = str(tmp_path / ("%s.ctx" % layout)), str(tmp_path / ("%s.pem" % layout))
    subprocess.run(_createprimary(layout, ctx) + ["-f", "pem", "-o", pem], input=_unique_input(layout), env=env,
                   check=True, capture_output=True)
    if persist:
        subprocess.run(["tpm2_evictcontrol", "-C", "o", "-c", ctx, persist], env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    return pem, ctx


def _openssl_oaep_encrypt(pem, plaintext, tmp_path):
    (tmp_path / "plain").write_bytes(plaintext)
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", pem, "-in", str(tmp_path / "plain"),
                    "-out", str(tmp_path / "blob"), "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
                    "-pkeyopt", "rsa_mgf1_md:sha256"], check=True, capture_output=True)
    return tmp_path / "blob"


def _evict(swtpm, handle):
    subprocess.run(["tpm2_evictcontrol", "-C", "o", "-c", handle], env=tools_env(swtpm), check=True, capture_output=True)


@pytest.mark.parametrize("layout", ["go-tpm", "tpmk"])
def test_our_owner_key_is_the_key_tpm2_tools_derives_with_that_layouts_template(swtpm_plain, tmp_path, layout):
    """The same owner seed gives the same key only with the same template: ours per layout equals
    tpm2_createprimary's with (go-tpm) or without (tpmk) a zero unique, and the two layouts differ."""
    from cryptography.hazmat.primitives import serialization

    with TPM(swtpm_plain.tcti) as tpm:
        ours, created = tpm.owner_key_public(0x81000008, layout=layout)
    assert created
    tools = {name: serialization.load_pem_public_key(open(_tools_owner_key(swtpm_plain, tmp_path, name)[0], "rb").read())
             for name in TOOLS_UNIQUE}
    assert ours.public_numbers() == tools[layout].public_numbers()
    assert tools["go-tpm"].public_numbers() != tools["tpmk"].public_numbers()


@pytest.mark.parametrize("layout", ["go-tpm", "tpmk"])
def test_blob_and_key_built_by_tpm2_tools_are_read(swtpm_plain, tmp_path, layout):
    """Upstream's direction: key persisted by tpm2_createprimary + tpm2_evictcontrol, blob encrypted by
    openssl, NV index defined by tpm2_nvdefine with the layout's name algorithm: we read the passphrase."""
    pem = _tools_owner_key(swtpm_plain, tmp_path, layout, persist="0x81000008")[0]
    passphrase = b"0123456789abcdefghijklmnopqrstuv"
    blob_file = _openssl_oaep_encrypt(pem, passphrase, tmp_path)
    env = tools_env(swtpm_plain)
    subprocess.run(["tpm2_nvdefine", "0x1500000", "-C", "o", "-s", "256", "-g", {"go-tpm": "sha256", "tpmk": "sha1"}[layout],
                    "-a", NV_ATTRS], env=env, check=True, capture_output=True)
    subprocess.run(["tpm2_nvwrite", "0x1500000", "-C", "o", "-i", str(blob_file)], env=env, check=True, capture_output=True)
    for reader_layout in ("go-tpm", "tpmk"):  # reading never depends on the configured layout
        with TPM(swtpm_plain.tcti) as tpm:
            assert tpm_blob.nv_passphrase(tpm, layout=reader_layout) == (passphrase, False)


@pytest.mark.parametrize("layout", ["go-tpm", "tpmk"])
def test_our_blob_is_opened_by_a_key_tpm2_tools_recreates_with_the_layouts_template(swtpm_plain, tmp_path, layout):
    """Our direction: we create key and blob; the persisted key is then evicted, and tpm2-tools
    re-creates the key from the layout's template alone: it decrypts our blob (so a Kairos tool of that
    generation re-creating the key at c_index gets the same key). We re-derive it too, without
    persisting anything."""
    with TPM(swtpm_plain.tcti) as tpm:
        passphrase, created = tpm_blob.nv_passphrase(tpm, layout=layout)
    assert created
    env = tools_env(swtpm_plain)
    blob_file = str(tmp_path / "ours.blob")
    subprocess.run(["tpm2_nvread", "-C", "o", "-o", blob_file, "0x1500000"], env=env, check=True, capture_output=True)
    _evict(swtpm_plain, "0x81000008")
    with TPM(swtpm_plain.tcti) as tpm:
        assert tpm_blob.read_nv_passphrase(tpm) == passphrase  # re-derived transiently
        assert tpm.owner_key_public(0x81000008, create=False) == (None, False)  # nothing persisted by reading
    ctx = _tools_owner_key(swtpm_plain, tmp_path, layout)[1]
    # _tools_owner_key flushed its transient key; load the context again and decrypt with it
    subprocess.run(_createprimary(layout, ctx), input=_unique_input(layout), env=env, check=True, capture_output=True)
    plain = subprocess.run(["tpm2_rsadecrypt", "-c", ctx, "-s", "oaep", blob_file], env=env, check=True, capture_output=True).stdout
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
    assert plain == passphrase


def test_an_existing_key_of_the_other_layout_is_used_not_replaced(swtpm_plain, tmp_path):
    """A key a tpmk-era node persisted stays: our default (go-tpm) layout only matters when creating."""
    from cryptography.hazmat.primitives import serialization

    pem = _tools_owner_key(swtpm_plain, tmp_path, "tpmk", persist="0x81000008")[0]
    with TPM(swtpm_plain.tcti) as tpm:
        public, created = tpm.owner_key_public(0x81000008)  # default layout
        passphrase, made = tpm_blob.nv_passphrase(tpm)
    assert (created, made) == (False, True)
    assert public.public_numbers() == serialization.load_pem_public_key(open(pem, "rb").read()).public_numbers()
    blob_file = str(tmp_path / "blob")
    env = tools_env(swtpm_plain)
    subprocess.run(["tpm2_nvread", "-C", "o", "-o", blob_file, "0x1500000"], env=env, check=True, capture_output=True)
    plain = subprocess.run(["tpm2_rsadecrypt", "-c", "0x81000008", "-s", "oaep", blob_file], env=env, check=True,
                           capture_output=True).stdout
    assert plain == passphrase
    assert "friendly: sha256" in subprocess.run(["tpm2_nvreadpublic", "0x1500000"], env=env, check=True,
                                                capture_output=True, text=True).stdout
