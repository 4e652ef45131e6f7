# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kms/ek_certificate.py against PKIs built with cryptography: chains, the EK profile, bounds, CA files.

The swtpm manufacturers (real swtpm_setup certificates) are in
tests/integration/test_ek_certificates.py.
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity, messages
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import ek_certificate as ekc
from support import ek_pki
from support.soft_tpm import key_pool

DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def keys():
    return key_pool(8)


@pytest.fixture(scope="module")
def pki(keys):
    """A vendor: root -> intermediate -> EK certificate of keys[2]; another vendor with the same CA names."""
    root_key, inter_key, ek_key, other_root_key, other_inter_key = keys[:5]
    root = ek_pki.ca_certificate("Vendor EK Root CA", root_key)
    inter = ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key, path_length=0)
    other_root = ek_pki.ca_certificate("Vendor EK Root CA", other_root_key)
    other_inter = ek_pki.ca_certificate("Vendor EK Intermediate CA", other_inter_key, other_root, other_root_key)
    return {
        "root": root, "root_key": root_key, "inter": inter, "inter_key": inter_key, "ek_key": ek_key,
        "ek_pem": identity.public_key_pem(ek_key.public_key()), "tpm_hash": identity.tpm_hash(ek_key.public_key()),
        "leaf": ek_pki.ek_certificate(ek_key.public_key(), inter, inter_key),
        "other_root": other_root, "other_inter": other_inter, "other_inter_key": other_inter_key,
    }


def _admit(policy, pki, leaf=None, chain=(), now=None, ek_pem=None):
    leaf = pki["leaf"] if leaf is None else leaf
    return policy.admit(pki["tpm_hash"], ek_pem or pki["ek_pem"], ek_pki.der(leaf) if leaf is not False else b"",
                        [ek_pki.der(c) for c in chain], now=now)


def _require(*trusted):
    return ekc.EKCertificatePolicy(ekc.MODE_REQUIRE, trusted)


def test_a_chain_through_the_tpms_intermediate_to_a_trusted_root_is_admitted(pki):
    verdict = _admit(_require(pki["root"]), pki, chain=[pki["inter"]])
    assert verdict.admitted, verdict.reason
    assert verdict.trusted_ca == "CN=Vendor EK Root CA"
    assert verdict.tpm == "manufacturer id:4E544300, model NPCT75x, version id:00070002"
    assert "issued under CN=Vendor EK Root CA" in verdict.describe()


def test_intermediates_may_come_from_the_bundle_and_any_bundle_certificate_is_trusted(pki):
    assert _admit(_require(pki["root"], pki["inter"]), pki).admitted
    assert _admit(_require(pki["inter"]), pki).admitted  # trusting only the vendor's intermediate is narrower, and works


def test_a_missing_intermediate_is_refused_with_the_issuer_named(pki):
    verdict = _admit(_require(pki["root"]), pki)
    assert not verdict.admitted
    assert "EK certificate not trusted: it was issued by CN=Vendor EK Intermediate CA, which is not a trusted EK CA" in verdict.reason


def test_another_vendors_ca_with_the_same_names_does_not_sign_for_this_one(pki, keys):
    """Names chain, signatures do not: the other vendor's root and intermediate are tried and refused."""
    verdict = _admit(_require(pki["other_root"]), pki, chain=[pki["inter"]])
    assert not verdict.admitted and "did not sign" in verdict.reason
    foreign = ek_pki.ek_certificate(pki["ek_key"].public_key(), pki["other_inter"], pki["other_inter_key"])
    verdict = _admit(_require(pki["root"], pki["inter"]), pki, leaf=foreign, chain=[pki["other_inter"]])
    assert not verdict.admitted
    assert "has the issuer's name but did not sign" in verdict.reason


def test_validity_dates_of_the_ek_certificate_and_of_every_ca(pki, keys):
    expired = ek_pki.ek_certificate(pki["ek_key"].public_key(), pki["inter"], pki["inter_key"],
                                    not_before=ek_pki.now() - 30 * DAY, not_after=ek_pki.now() - DAY)
    verdict = _admit(_require(pki["root"], pki["inter"]), pki, leaf=expired)
    assert not verdict.admitted and "EK certificate not trusted: it expired on " in verdict.reason
    future = ek_pki.ek_certificate(pki["ek_key"].public_key(), pki["inter"], pki["inter_key"], not_before=ek_pki.now() + DAY)
    assert "not valid yet" in _admit(_require(pki["root"], pki["inter"]), pki, leaf=future).reason
    # the same certificate is fine at another time, and a CA that expired breaks the chain
    assert _admit(_require(pki["root"], pki["inter"]), pki, leaf=expired, now=ek_pki.now() - 10 * DAY).admitted
    old_inter = ek_pki.ca_certificate("Vendor EK Intermediate CA", pki["inter_key"], pki["root"], pki["root_key"],
                                      not_before=ek_pki.now() - 30 * DAY, not_after=ek_pki.now() - DAY)
    verdict = _admit(_require(pki["root"]), pki, chain=[old_inter])
    assert not verdict.admitted and "CA CN=Vendor EK Intermediate CA expired on" in verdict.reason


def test_a_certificate_for_another_key_is_refused_as_copied(pki, keys):
    other_ek = keys[5].public_key()
    verdict = _admit(_require(pki["root"], pki["inter"]), pki, ek_pem=identity.public_key_pem(other_ek))
    assert not verdict.admitted
    assert "it certifies another key (TPM hash %s)" % pki["tpm_hash"] in verdict.reason
    assert "a certificate copied from another TPM" in verdict.reason


@pytest.mark.parametrize("change, expected", [
    ({"basic_constraints": x509.BasicConstraints(ca=True, path_length=None)}, "it is a CA certificate"),
    ({"key_usage": ek_pki._usage(digital_signature=True)}, "does not include keyEncipherment"),
    ({"extended_key_usage": x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])}, "tcg-kp-EKCertificate"),
    ({"san": None}, "it names no TPM manufacturer"),
    ({"san": ek_pki.tpm_san(manufacturer="")}, "it names no TPM manufacturer"),
    ({"extra": [(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)]},
     "critical extension this KMS does not process (1.3.6.1.4.1.99999.1)"),
])
def test_the_ek_certificate_profile(pki, change, expected):
    leaf = ek_pki.ek_certificate(pki["ek_key"].public_key(), pki["inter"], pki["inter_key"], **change)
    verdict = _admit(_require(pki["root"], pki["inter"]), pki, leaf=leaf)
    assert not verdict.admitted and expected in verdict.reason


def test_lenient_where_vendors_are(pki):
    """No extended key usage, no key usage, no model/version, no basicConstraints: still an EK certificate."""
    leaf = ek_pki.ek_certificate(pki["ek_key"].public_key(), pki["inter"], pki["inter_key"], extended_key_usage=None,
                                 key_usage=None, basic_constraints=None, san=ek_pki.tpm_san(model="", version=""))
    verdict = _admit(_require(pki["root"], pki["inter"]), pki, leaf=leaf)
    assert verdict.admitted, verdict.reason
    assert verdict.tpm == "manufacturer id:4E544300"


def test_ca_rules_on_the_path(pki, keys):
    root, root_key, inter_key = pki["root"], pki["root_key"], pki["inter_key"]
    cases = [
        (ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key, ca=False), "is not a CA certificate"),
        (ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key, basic_constraints=False),
         "no basicConstraints CA:TRUE"),
        (ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key,
                               key_usage=ek_pki._usage(digital_signature=True)), "lacks keyCertSign"),
        (ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key,
                               extra=[(x509.NameConstraints([x509.DNSName("example.org")], None), True)]),
         "critical extension this KMS does not process (2.5.29.30)"),
    ]
    for inter, expected in cases:
        verdict = _admit(_require(root), pki, chain=[inter])
        assert not verdict.admitted and expected in verdict.reason, (expected, verdict.reason)
    # pathLenConstraint 0 on the root: no CA may sit between it and the EK certificate
    strict_root = ek_pki.ca_certificate("Vendor EK Root CA", root_key, path_length=0)
    verdict = _admit(_require(strict_root), pki, chain=[pki["inter"]])
    assert not verdict.admitted and "may have 0 CA(s) below it (pathLenConstraint), not 1" in verdict.reason


def test_modes(pki):
    off = ekc.EKCertificatePolicy()
    assert not off.enabled and _admit(off, pki, leaf=False).admitted
    verdict = _admit(_require(pki["root"]), pki, leaf=False)
    assert not verdict.admitted and verdict.reason.startswith("no EK certificate: this KMS enrols only TPMs")
    lenient = ekc.EKCertificatePolicy(ekc.MODE_VERIFY_IF_PRESENT, [pki["root"]])
    assert _admit(lenient, pki, leaf=False).admitted
    assert not _admit(lenient, pki).admitted  # present, but its intermediate is missing
    assert _admit(lenient, pki, chain=[pki["inter"]]).admitted
    with pytest.raises(ekc.EKCertificateError, match="needs the CA certificates"):
        ekc.EKCertificatePolicy(ekc.MODE_REQUIRE, ())
    with pytest.raises(ekc.EKCertificateError, match="must be one of off, verify-if-present, require"):
        ekc.EKCertificatePolicy("sometimes", [pki["root"]])


def test_what_a_node_sends_is_bounded_and_never_raises(pki, keys):
    policy = _require(pki["root"])
    garbage = policy.admit(pki["tpm_hash"], pki["ek_pem"], b"\x30\x03\x02\x01\x01")
    assert not garbage.admitted and "the EK certificate is not a DER X.509 certificate" in garbage.reason
    huge = policy.admit(pki["tpm_hash"], pki["ek_pem"], b"\x30" + b"\x00" * (ekc.MAX_CERTIFICATE_SIZE + 1))
    assert not huge.admitted and "bytes; certificates are at most" in huge.reason
    too_many = _admit(policy, pki, chain=[pki["inter"]] * (messages.MAX_EK_CHAIN + 1))
    assert not too_many.admitted and "at most %d are accepted" % messages.MAX_EK_CHAIN in too_many.reason
    bad_chain = policy.admit(pki["tpm_hash"], pki["ek_pem"], ek_pki.der(pki["leaf"]), [b"not a certificate"])
    assert not bad_chain.admitted and "CA certificate 1 from the TPM's NV is not a DER X.509 certificate" in bad_chain.reason


def test_the_path_search_is_bounded_when_many_cas_share_a_name(pki, keys):
    """Eight forged intermediates with the issuer's name: each costs one signature check, then the search stops."""
    forged = [ek_pki.ca_certificate("Vendor EK Intermediate CA", keys[6]) for dummy in range(messages.MAX_EK_CHAIN)]
    search = ekc._PathSearch({}, {}, ek_pki.now())
    for ca in forged:
        search.untrusted.setdefault(ca.subject.public_bytes(), []).append((ca, ca.tbs_certificate_bytes))
    assert search.path(pki["leaf"], pki["leaf"].tbs_certificate_bytes) is None
    assert search.checks == messages.MAX_EK_CHAIN
    assert "did not sign" in search.reason(pki["leaf"])


def test_certificates_as_tpms_store_them(pki):
    """NV content: the TCG header, zero padding, and chains of certificates back to back."""
    leaf = ek_pki.der(pki["leaf"])
    wrapped = b"\x10\x01\x00" + len(leaf).to_bytes(2, "big") + leaf + b"\x00" * 40
    assert identity.certificate_der(wrapped) == leaf == identity.certificate_der(leaf + b"\xff" * 8)
    assert identity.certificate_der(b"\x00" * 16) == b"\x00" * 16 and identity.certificate_der(b"") == b""
    verdict = _require(pki["root"], pki["inter"]).admit(pki["tpm_hash"], pki["ek_pem"], wrapped)
    assert verdict.admitted, verdict.reason
    chain = ek_pki.der(pki["inter"]) + ek_pki.der(pki["root"])
    assert identity.split_certificates(chain + b"\x00" * 100) == [ek_pki.der(pki["inter"]), ek_pki.der(pki["root"])]
    assert identity.split_certificates(chain[:-1]) == [ek_pki.der(pki["inter"])]  # a truncated last one is dropped


def test_names_out_of_der_order_as_nuvoton_issues_them(pki, keys, tmp_path):
    """cryptography refuses a certificate whose multi-valued RDN is not sorted (Nuvoton's CAs and EK certificates);
    it is read from a sorted copy, and its signature is still checked over the bytes the vendor signed."""
    vendor = ek_pki.multi_valued_name((x509.oid.NameOID.COMMON_NAME, "Test TPM EK Root CA 01"),
                                      (x509.oid.NameOID.ORGANIZATION_NAME, "Test Technology Corporation"),
                                      (x509.oid.NameOID.COUNTRY_NAME, "TW"))
    root_key = keys[6]
    root = ek_pki.unsorted_names(ek_pki.ca_certificate(vendor, root_key), root_key, vendor)
    leaf = ek_pki.unsorted_names(ek_pki.ek_certificate(pki["ek_key"].public_key(), x509.load_der_x509_certificate(
        ek_pki.der(ek_pki.ca_certificate(vendor, root_key))), root_key), root_key, vendor)
    for raw in (root, leaf):
        with pytest.raises(ValueError, match="InvalidSetOrdering"):
            x509.load_der_x509_certificate(raw)
    ca_file = tmp_path / "vendor-root.cer"
    ca_file.write_bytes(root)
    policy = ekc.EKCertificatePolicy.from_settings("require", [str(ca_file)])
    verdict = policy.admit(pki["tpm_hash"], pki["ek_pem"], leaf)
    assert verdict.admitted, verdict.reason
    assert verdict.trusted_ca == "C=TW+CN=Test TPM EK Root CA 01+O=Test Technology Corporation"
    forged = leaf[:-1] + bytes([leaf[-1] ^ 1])  # the signature is checked over the original bytes
    assert "did not sign the EK certificate" in policy.admit(pki["tpm_hash"], pki["ek_pem"], forged).reason
    sorted_leaf = ekc._sorted_sets(leaf)  # what the KMS reads; signed by nobody
    assert x509.load_der_x509_certificate(sorted_leaf).issuer == x509.load_der_x509_certificate(ekc._sorted_sets(root)).subject
    assert not policy.admit(pki["tpm_hash"], pki["ek_pem"], sorted_leaf).admitted


def test_the_init_message_carries_the_certificates_and_bounds_them(pki):
    params = messages.AttestationParameters(b"p", b"d", b"a", b"s")
    message = messages.init_message(b"spki", params, ek_certificate=ek_pki.der(pki["leaf"]), ek_chain=[ek_pki.der(pki["inter"])])
    parsed = messages.parse_init(messages.load_json_object(messages.write_json(message), "init"))
    assert parsed.ek_certificate == ek_pki.der(pki["leaf"]) and parsed.ek_chain == (ek_pki.der(pki["inter"]),)
    plain = messages.init_message(b"spki", params)
    assert "ek_certificate" not in plain and "ek_chain" not in plain  # omitempty: upstream's init, byte for byte
    assert messages.parse_init(plain).ek_chain == ()
    for chain, error in (("text", "cannot unmarshal string into"), ([1], "cannot unmarshal number into"),
                         (["AA=="] * (messages.MAX_EK_CHAIN + 1), "at most %d are accepted" % messages.MAX_EK_CHAIN)):
        with pytest.raises(messages.ProtocolError, match=error):
            messages.parse_init(dict(plain, ek_chain=chain))


def test_trusted_ca_files(tmp_path, pki):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ek_pki.pem(pki["root"]) + ek_pki.pem(pki["inter"]))
    der_file = tmp_path / "cas" / "other.cer"
    der_file.parent.mkdir()
    der_file.write_bytes(ek_pki.der(pki["other_root"]))
    (tmp_path / "cas" / "README").write_text("not a certificate, and not read\n")
    loaded = ekc.load_trusted_cas([str(bundle), str(der_file.parent), str(bundle)])
    assert [c.subject.rfc4514_string() for c in loaded] == ["CN=Vendor EK Root CA", "CN=Vendor EK Intermediate CA",
                                                            "CN=Vendor EK Root CA"]  # the same file twice: read once
    policy = ekc.EKCertificatePolicy.from_settings("require", [str(bundle)])
    assert len(policy.trusted) == 2 and _admit(policy, pki).admitted
    assert ekc.EKCertificatePolicy.from_settings("off", ["/nonexistent"]).trusted == ()  # off reads nothing

    leaf_file = tmp_path / "ek.pem"
    leaf_file.write_bytes(ek_pki.pem(pki["leaf"]))
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for paths, error in (([str(tmp_path / "missing.pem")], "no such file or directory"),
                         ([str(empty_dir)], "the directory holds no certificate file"),
                         ([str(leaf_file)], "is not a CA certificate; --ek-ca takes the CA certificates"),
                         ([str(garbage)], "not a PEM or DER X.509 certificate file")):
        with pytest.raises(ekc.EKCertificateError, match=error):
            ekc.load_trusted_cas(paths)
