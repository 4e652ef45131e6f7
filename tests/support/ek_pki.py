# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""EK certificate PKIs for tests: CAs and EK certificates shaped as the TCG EK Credential Profile says.

``ek_certificate`` issues what a TPM vendor puts in NV 0x01c00002 (v3, keyEncipherment,
tcg-kp-EKCertificate, a critical subjectAltName directoryName with the TPM manufacturer,
model and version, empty subject); every field can be changed to build the bad cases.
``ca_certificate`` makes roots and intermediates. Keys come from support.soft_tpm's pool.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID, ObjectIdentifier

EK_CERTIFICATE_OID = ObjectIdentifier("2.23.133.8.1")
TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
TPM_VERSION = ObjectIdentifier("2.23.133.2.3")
UNSET = object()


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def name(common_name):
    """A name with that common name (empty: no attribute); an x509.Name as it is."""
    if isinstance(common_name, x509.Name):
        return common_name
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]) if common_name else x509.Name([])


def _usage(**flags):
    fields = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
              "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{field: flags.get(field, False) for field in fields})


def ca_certificate(subject, key, issuer=None, issuer_key=None, not_before=None, not_after=None, ca=True,
                   path_length=None, key_usage=UNSET, basic_constraints=True, extra=()):
    """A CA certificate (self-signed without ``issuer``)."""
    start = not_before or now() - datetime.timedelta(days=365)
    builder = (x509.CertificateBuilder().subject_name(name(subject))
               .issuer_name(issuer.subject if issuer is not None else name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(not_after or start + datetime.timedelta(days=3650)))
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    usage = _usage(key_cert_sign=True, crl_sign=True) if key_usage is UNSET else key_usage
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key or key, hashes.SHA256())


def tpm_san(manufacturer="id:4E544300", model="NPCT75x", version="id:00070002"):
    attributes = [x509.NameAttribute(oid, value) for oid, value in
                  ((TPM_MANUFACTURER, manufacturer), (TPM_MODEL, model), (TPM_VERSION, version)) if value]
    return x509.SubjectAlternativeName([x509.DirectoryName(x509.Name(attributes))])


def ek_certificate(ek_public_key, issuer, issuer_key, not_before=None, not_after=None, san=UNSET,
                   key_usage=UNSET, extended_key_usage=UNSET, basic_constraints=UNSET, extra=()):
    """An EK certificate for ``ek_public_key`` issued by ``issuer``; UNSET fields get the profile's values, None drops them."""
    start = not_before or now() - datetime.timedelta(days=1)
    builder = (x509.CertificateBuilder().subject_name(name("")).issuer_name(issuer.subject)
               .public_key(ek_public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(not_after or start + datetime.timedelta(days=7300)))
    san = tpm_san() if san is UNSET else san
    if san is not None:
        builder = builder.add_extension(san, critical=True)
    constraints = x509.BasicConstraints(ca=False, path_length=None) if basic_constraints is UNSET else basic_constraints
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    usage = _usage(key_encipherment=True) if key_usage is UNSET else key_usage
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    extended = x509.ExtendedKeyUsage([EK_CERTIFICATE_OID]) if extended_key_usage is UNSET else extended_key_usage
    if extended is not None:
        builder = builder.add_extension(extended, critical=False)
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def der(certificate):
    return certificate.public_bytes(serialization.Encoding.DER)


def pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def load_swtpm_localca_key(path):
    """The private key of a swtpm-localca CA: certtool writes a text dump before the PEM block."""
    data = open(path, "rb").read()
    return serialization.load_pem_private_key(data[data.index(b"-----BEGIN"):], password=None)


def multi_valued_name(*attributes):
    """A name of one RDN holding several attributes, as Nuvoton's CAs have: ((oid, value), ...)."""
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in attributes])])


def _der_header(tag, size):
    if size < 0x80:
        return bytes([tag, size])
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length


def unsorted_names(certificate, signer_key, name):
    """DER of ``certificate`` with the SET of ``name``'s single RDN in reverse DER order wherever it occurs
    (issuer, subject), signed again by ``signer_key``: a certificate as a vendor that does not sort its SETs
    issues it. Swapping elements keeps every length, so only the bytes of the SET change."""
    attributes = [x509.Name([attribute]).public_bytes() for attribute in name]
    encoded = [attribute[4:] for attribute in attributes]  # strip SEQUENCE and SET headers (short lengths here)
    longest = max(len(item) for item in encoded)
    ordered = sorted(encoded, key=lambda item: item.ljust(longest, b"\x00"))
    tbs = certificate.tbs_certificate_bytes
    assert b"".join(ordered) in tbs and ordered != ordered[::-1]
    tbs = tbs.replace(b"".join(ordered), b"".join(ordered[::-1]))
    signature = signer_key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    algorithm = der(certificate)[4 + len(certificate.tbs_certificate_bytes):][:15]  # sha256WithRSAEncryption
    bits = _der_header(0x03, len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bits
    return _der_header(0x30, len(body)) + body
