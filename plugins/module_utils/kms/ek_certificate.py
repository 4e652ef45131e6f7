# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Genuine TPMs only: does a TPM's EK certificate chain to a manufacturer CA the operator trusts?

Private to the collection. Pure ``cryptography``, no TPM and no network. The policy
(kms/policy.py) asks :meth:`EKCertificatePolicy.admit` before it enrols an unknown TPM
on first contact; TPMs that have a SealedVolume are served by it and never checked here.

Modes (``kcrypt-challenger serve --ek-certificate``):

* ``off`` — no check (upstream: any TPM that passes credential activation enrols);
* ``verify-if-present`` — a TPM that sends an EK certificate enrols only if it is valid
  and chains to a trusted CA; a TPM without one enrols as before;
* ``require`` — only a TPM with such a certificate enrols.

What is checked (docs/challenger.md lists it for operators):

* the certificate's public key is the EK the TPM proved by credential activation (a
  certificate is public: anyone can copy a genuine TPM's and send it with their own EK);
* the EK certificate: X.509 v3, RSA key, valid now, not a CA (basicConstraints), key
  usage keyEncipherment when the extension is present, extended key usage
  tcg-kp-EKCertificate (2.23.133.8.1) when the extension is present, a subjectAltName
  directoryName naming the TPM manufacturer (2.23.133.2.1), no unknown critical
  extension (TCG EK Credential Profile for TPM Family 2.0, section 3.2);
* a path to a trusted CA: every certificate in the ``--ek-ca`` files is trusted (a
  vendor's root and intermediate CAs alike); intermediates the TPM keeps in NV (sent
  by the node) are used to build the path but trusted only through it. Each CA on the
  path must have signed the certificate below it, be valid now, be a CA
  (basicConstraints CA:TRUE; a version 1 root among the trusted ones counts as one),
  allow certificate signing when it has a key usage, respect its path length, and
  have no critical extension this code does not process (name constraints included).

Lenient where real TPM certificates are: subject names are ignored (many are empty),
model and version in the subjectAltName are optional, the authority/subject key
identifiers and the TPM specification attributes are not required (go-attestation's
x509 package requires them); SHA-1 signatures are accepted (Infineon's older EK CAs);
a certificate whose names are not in DER order (Nuvoton's multi-valued RDNs, which
``cryptography`` refuses to parse; Keylime issue 944) is read from a copy with its SETs
sorted, while its signature is still checked over the bytes the vendor signed.
Revocation is not checked: vendors publish no CRLs for EK certificates that a KMS
could use without fetching at run time.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import os
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.messages import MAX_EK_CHAIN

x509 = optional_import("cryptography.x509")
rsa = optional_import("cryptography.hazmat.primitives.asymmetric.rsa")
ec = optional_import("cryptography.hazmat.primitives.asymmetric.ec")
serialization = optional_import("cryptography.hazmat.primitives.serialization")
crypto_exceptions = optional_import("cryptography.exceptions")

MODE_OFF = "off"
MODE_VERIFY_IF_PRESENT = "verify-if-present"
MODE_REQUIRE = "require"
MODES = (MODE_OFF, MODE_VERIFY_IF_PRESENT, MODE_REQUIRE)

OID_EK_CERTIFICATE = "2.23.133.8.1"  # tcg-kp-EKCertificate
OID_TPM_MANUFACTURER = "2.23.133.2.1"
OID_TPM_MODEL = "2.23.133.2.2"
OID_TPM_VERSION = "2.23.133.2.3"
# Extensions a certificate may mark critical: the ones checked here, and certificate policies (we require none).
_HANDLED_CRITICAL = {
    "2.5.29.15",  # keyUsage
    "2.5.29.17",  # subjectAltName
    "2.5.29.19",  # basicConstraints
    "2.5.29.32",  # certificatePolicies
    "2.5.29.37",  # extendedKeyUsage
}

MAX_CERTIFICATE_SIZE = 16 * 1024  # real EK and CA certificates are 1-2 KiB
MAX_CHAIN_DEPTH = 8  # CAs between an EK certificate and a trusted CA, plus one
MAX_SIGNATURE_CHECKS = 32  # bounds the path search when many CAs share a name
CA_FILE_SUFFIXES = (".pem", ".crt", ".cer", ".der")


class EKCertificateError(KcryptError):
    """The EK certificate settings cannot be used (a CA file is missing or holds no CA certificate)."""


@dataclass(frozen=True)
class Verdict:
    """Whether a TPM may enrol on its own, and why (both are written to the log and the audit)."""

    admitted: bool
    reason: str
    tpm: str = ""  # "manufacturer id:00001014, model swtpm, version id:20191023" from the certificate
    trusted_ca: str = ""  # the trusted CA the chain ends at

    def describe(self):
        details = ", ".join(part for part in (self.tpm and "TPM %s" % self.tpm,
                                              self.trusted_ca and "issued under %s" % self.trusted_ca) if part)
        return "%s (%s)" % (self.reason, details) if details else self.reason


def parse_mode(value):
    if value not in MODES:
        raise EKCertificateError("ek_certificate must be one of %s, not %r" % (", ".join(MODES), value))
    return value


class EKCertificatePolicy(object):
    """The ``--ek-certificate`` mode and the trusted CAs of ``--ek-ca``."""

    def __init__(self, mode=MODE_OFF, trusted=()):
        self.mode = parse_mode(mode)
        self.trusted = tuple(trusted)
        if self.mode != MODE_OFF and not self.trusted:
            raise EKCertificateError("--ek-certificate %s needs the CA certificates of the TPM manufacturers to trust "
                                     "(--ek-ca FILE or DIRECTORY, config key ek_ca)" % self.mode)
        self._by_subject = {}
        for certificate in self.trusted:
            self._by_subject.setdefault(_name_key(certificate.subject), []).append(certificate)

    @classmethod
    def from_settings(cls, mode, paths):
        mode = parse_mode(mode)
        return cls(mode, load_trusted_cas(paths) if mode != MODE_OFF else ())

    @property
    def enabled(self):
        return self.mode != MODE_OFF

    def admit(self, tpm_hash, ek_pem, certificate=b"", chain=(), now=None):
        """The Verdict for a TPM that has no SealedVolume yet.

        ``tpm_hash``/``ek_pem``: the EK the TPM proved (``PUBLIC KEY`` PEM, as the policy has it);
        ``certificate``: its EK certificate (DER, b"" when none came); ``chain``: DER CA
        certificates the node sent from the TPM's NV. Never raises for what a node sent.
        """
        if self.mode == MODE_OFF:
            return Verdict(True, "EK certificate not checked (--ek-certificate off)")
        if not certificate:
            if self.mode == MODE_REQUIRE:
                return Verdict(False, "no EK certificate: this KMS enrols only TPMs whose EK certificate chains to a "
                                      "trusted manufacturer CA (--ek-certificate require), and the node sent none "
                                      "(its TPM has no certificate in NV 0x01c00002, or its client does not send it); "
                                      "register the TPM to serve it")
            return Verdict(True, "no EK certificate sent (--ek-certificate verify-if-present admits that)")
        require("cryptography", "to check EK certificates")
        now = now or datetime.datetime.now(datetime.timezone.utc)
        try:
            return self._check(tpm_hash, ek_pem, certificate, chain, now)
        except _Refused as refusal:
            return Verdict(False, "EK certificate not trusted: %s" % refusal, refusal.tpm)

    def _check(self, tpm_hash, ek_pem, certificate, chain, now):
        leaf, leaf_tbs = _parse(certificate, "the EK certificate")
        key = _public_key(leaf)
        if not isinstance(key, rsa.RSAPublicKey) or identity.public_key_pem(key) != ek_pem:
            raise _Refused("it certifies another key (TPM hash %s) than the EK this TPM proved (TPM hash %s): a "
                           "certificate copied from another TPM" % (_tpm_hash_of_key(key), tpm_hash))
        tpm = _tpm_attributes(leaf)
        problem = _leaf_problem(leaf, now)
        if problem:
            raise _Refused(problem, tpm)
        if len(chain) > MAX_EK_CHAIN:
            raise _Refused("the node sent %d CA certificates; at most %d are accepted" % (len(chain), MAX_EK_CHAIN), tpm)
        untrusted = {}
        for index, der in enumerate(chain):
            ca, tbs = _parse(der, "CA certificate %d from the TPM's NV" % (index + 1))
            untrusted.setdefault(_name_key(ca.subject), []).append((ca, tbs))
        search = _PathSearch(self._by_subject, untrusted, now)
        path = search.path(leaf, leaf_tbs)
        if path is None:
            raise _Refused(search.reason(leaf), tpm)
        return Verdict(True, "EK certificate trusted", tpm, _describe_name(path[-1].subject))


class _Refused(Exception):
    def __init__(self, reason, tpm=""):
        super().__init__(reason)
        self.tpm = tpm


class _PathSearch(object):
    """Depth-first search for issuers from a certificate up to a trusted CA, with a bounded number of signature checks."""

    def __init__(self, trusted, untrusted, now):
        self.trusted = trusted
        self.untrusted = untrusted
        self.now = now
        self.checks = 0
        self.problems = []

    def path(self, certificate, tbs, depth=0, visited=frozenset()):
        """[issuer, ..., trusted CA] above ``certificate`` (whose signed bytes are ``tbs``), or None."""
        if depth >= MAX_CHAIN_DEPTH:
            self.problems.append("the chain is longer than %d certificates" % MAX_CHAIN_DEPTH)
            return None
        key = _name_key(certificate.issuer)
        candidates = [(ca, None, True) for ca in self.trusted.get(key, ())]
        candidates += [(ca, ca_tbs, False) for ca, ca_tbs in self.untrusted.get(key, ()) if _der(ca) not in visited]
        for ca, ca_tbs, trusted in candidates:
            if self.checks >= MAX_SIGNATURE_CHECKS:
                self.problems.append("gave up after %d signature checks" % MAX_SIGNATURE_CHECKS)
                return None
            self.checks += 1
            if not _signed_by(certificate, tbs, ca):
                self.problems.append("%s CA %s has the issuer's name but did not sign %s"
                                     % ("the trusted" if trusted else "the TPM's", _describe_name(ca.subject),
                                        "the EK certificate" if depth == 0 else "CA " + _describe_name(certificate.subject)))
                continue
            problem = _ca_problem(ca, depth, trusted, self.now)
            if problem:
                self.problems.append(problem)
                continue
            if trusted:
                return [ca]
            rest = self.path(ca, ca_tbs, depth + 1, visited | {_der(ca)})
            if rest is not None:
                return [ca] + rest
        return None

    def reason(self, leaf):
        if self.problems:
            return self.problems[0]
        return ("it was issued by %s, which is not a trusted EK CA (--ek-ca) and no certificate the TPM sent leads to one"
                % (_describe_name(leaf.issuer) or "an unnamed CA"))


def _leaf_problem(leaf, now):
    """Why ``leaf`` is not an acceptable EK certificate (TCG EK Credential Profile basics), or ""."""
    if leaf.version != x509.Version.v3:
        return "it is an X.509 %s certificate; EK certificates are version 3" % leaf.version.name
    validity = _validity_problem(leaf, "it", now)
    if validity:
        return validity
    try:
        extensions = leaf.extensions
    except ValueError as error:
        return "its extensions cannot be read: %s" % error
    critical = _unhandled_critical(extensions)
    if critical:
        return "it has a critical extension this KMS does not process (%s)" % critical
    constraints = _extension(extensions, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        return "it is a CA certificate (basicConstraints CA:TRUE), not an EK certificate"
    usage = _extension(extensions, x509.KeyUsage)
    if usage is not None and not usage.key_encipherment:
        return "its key usage does not include keyEncipherment, which an RSA EK certificate has"
    extended = _extension(extensions, x509.ExtendedKeyUsage)
    if extended is not None and OID_EK_CERTIFICATE not in [oid.dotted_string for oid in extended]:
        return "its extended key usage does not include tcg-kp-EKCertificate (2.23.133.8.1)"
    if not _san_attributes(extensions).get(OID_TPM_MANUFACTURER):
        return ("it names no TPM manufacturer (a subjectAltName directoryName with 2.23.133.2.1, TCG EK Credential "
                "Profile 3.2.9)")
    return ""


def _ca_problem(ca, depth, trusted, now):
    """Why ``ca`` may not issue the certificate ``depth`` CAs below it, or ""."""
    name = _describe_name(ca.subject) or "(unnamed)"
    validity = _validity_problem(ca, "CA %s" % name, now)
    if validity:
        return validity
    try:
        extensions = ca.extensions
    except ValueError as error:
        return "the extensions of CA %s cannot be read: %s" % (name, error)
    critical = _unhandled_critical(extensions)
    if critical:
        return "CA %s has a critical extension this KMS does not process (%s)" % (name, critical)
    constraints = _extension(extensions, x509.BasicConstraints)
    if constraints is None:
        if not (trusted and ca.version == x509.Version.v1):
            return "%s is not a CA certificate (no basicConstraints CA:TRUE)" % name
    elif not constraints.ca:
        return "%s is not a CA certificate (basicConstraints CA:FALSE)" % name
    elif constraints.path_length is not None and depth > constraints.path_length:
        return "CA %s may have %d CA(s) below it (pathLenConstraint), not %d" % (name, constraints.path_length, depth)
    usage = _extension(extensions, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "CA %s may not sign certificates (its key usage lacks keyCertSign)" % name
    return ""


def _validity_problem(certificate, what, now):
    not_before, not_after = _utc(certificate, "not_valid_before"), _utc(certificate, "not_valid_after")
    if now < not_before:
        return "%s is not valid yet (from %s)" % (what, _stamp(not_before))
    if now > not_after:
        return "%s expired on %s" % (what, _stamp(not_after))
    return ""


def _utc(certificate, name):
    """``not_valid_*_utc`` (cryptography >= 42), else the naive UTC value of older releases."""
    value = getattr(certificate, name + "_utc", None)
    if value is None:
        value = getattr(certificate, name).replace(tzinfo=datetime.timezone.utc)
    return value


def _stamp(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _extension(extensions, kind):
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _unhandled_critical(extensions):
    for extension in extensions:
        if extension.critical and extension.oid.dotted_string not in _HANDLED_CRITICAL:
            return extension.oid.dotted_string
    return ""


def _san_attributes(extensions):
    """{OID: value} of the TPM attributes in the subjectAltName's directoryName(s)."""
    names = _extension(extensions, x509.SubjectAlternativeName)
    found = {}
    for name in names.get_values_for_type(x509.DirectoryName) if names is not None else ():
        for attribute in name:
            if isinstance(attribute.value, str):
                found.setdefault(attribute.oid.dotted_string, attribute.value)
    return found


def _tpm_attributes(leaf):
    """"manufacturer X, model Y, version Z" (what the certificate says), or ""."""
    try:
        found = _san_attributes(leaf.extensions)
    except ValueError:
        return ""
    names = (("manufacturer", OID_TPM_MANUFACTURER), ("model", OID_TPM_MODEL), ("version", OID_TPM_VERSION))
    parts = [(label, found.get(oid, "")) for label, oid in names]
    return ", ".join("%s %s" % (label, _printable(value)) for label, value in parts if value)


def _printable(text, limit=64):
    """A certificate string fit for a log line: printable ASCII, bounded."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _describe_name(name):
    try:
        return _printable(name.rfc4514_string(), 160)
    except ValueError:
        return "(unreadable name)"


def _name_key(name):
    return name.public_bytes()


def _der(certificate):
    return certificate.public_bytes(serialization.Encoding.DER)


def _parse(der, what):
    """(certificate, the bytes its issuer signed) from DER a node sent; _Refused when it is none."""
    data = bytes(der)
    if len(data) > MAX_CERTIFICATE_SIZE:
        raise _Refused("%s is %d bytes; certificates are at most %d" % (what, len(data), MAX_CERTIFICATE_SIZE))
    try:
        return _load_der(identity.certificate_der(data))
    except ValueError as error:
        raise _Refused("%s is not a DER X.509 certificate (%s)" % (what, _printable(str(error), 120))) from None


def _load_der(data):
    """(certificate, signed TBS bytes). A certificate cryptography refuses only because a SET is out of DER order is
    read from a copy with its SETs sorted; the TBS bytes stay the original ones, which the signature covers."""
    try:
        certificate = x509.load_der_x509_certificate(data)
        return certificate, certificate.tbs_certificate_bytes
    except ValueError as error:
        parts = _children(data, 0x30)
        if "SetOrdering" not in str(error) or not parts:
            raise
        certificate = x509.load_der_x509_certificate(_sorted_sets(data))
        return certificate, parts[0]


def _signed_by(certificate, tbs, issuer):
    """Whether ``issuer`` signed ``tbs`` with the certificate's signature algorithm (RSA PKCS#1 v1.5 or PSS, ECDSA)."""
    if certificate.issuer != issuer.subject:
        return False
    try:
        key = issuer.public_key()
        algorithm = certificate.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(certificate.signature, tbs, certificate.signature_algorithm_parameters, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(certificate.signature, tbs, ec.ECDSA(algorithm))
        else:
            return False
    except (ValueError, TypeError, crypto_exceptions.InvalidSignature, crypto_exceptions.UnsupportedAlgorithm):
        return False
    return True


# -- DER: sorting the SET OFs of a certificate (names, and the DER inside extension values) ----------------


def _tlv(data, offset):
    """(tag, content start, end) of the element at ``offset``, or None (long tags and indefinite lengths too)."""
    size = identity.der_element_size(data, offset)
    if not size or data[offset] & 0x1F == 0x1F:
        return None
    length = data[offset + 1]
    start = offset + 2 + (length & 0x7F if length & 0x80 else 0)
    return data[offset], start, offset + size


def _children(data, tag=None):
    """The encoded elements inside the single element ``data`` (of ``tag``, when given), or None."""
    element = _tlv(data, 0)
    if element is None or element[2] != len(data) or (tag is not None and element[0] != tag) or not element[0] & 0x20:
        return None
    parts, offset = [], element[1]
    while offset < len(data):
        child = _tlv(data, offset)
        if child is None:
            return None
        parts.append(data[offset:child[2]])
        offset = child[2]
    return parts


def _encode(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _sorted_sets(data, extension=False):
    """``data`` with every SET's elements in DER order (X.690 11.6); inside an Extension (``extension``) the
    OCTET STRING value, which holds DER, is sorted too. Anything that does not parse is left as it is."""
    parts = _children(data)
    if parts is None:
        if extension and data[:1] == b"\x04":
            element = _tlv(data, 0)
            inner = data[element[1]:element[2]]
            return _encode(0x04, _sorted_sets(inner)) if _children(inner) is not None else data
        return data
    tag = data[0]
    in_extensions = tag == 0xA3  # [3] Extensions of a TBSCertificate
    parts = [_sorted_sets(part, extension=extension or in_extensions) for part in parts]
    if tag == 0x31:
        longest = max((len(part) for part in parts), default=0)
        parts.sort(key=lambda part: part.ljust(longest, b"\x00"))
    return _encode(tag, b"".join(parts))


def _public_key(certificate):
    """The certificate's key, or None when cryptography cannot read it (e.g. an RSA-OAEP key of old EK certificates)."""
    try:
        return certificate.public_key()
    except (ValueError, crypto_exceptions.UnsupportedAlgorithm):
        return None


def _tpm_hash_of_key(key):
    try:
        return identity.tpm_hash(key)
    except (ValueError, TypeError, AttributeError):
        return "(a key no TPM hash is made of)"


# -- trusted CAs ---------------------------------------------------------------


def load_trusted_cas(paths):
    """The CA certificates in ``paths``: PEM or DER files, or directories of them (*.pem, *.crt, *.cer, *.der).

    Raises EKCertificateError naming the path for anything that is not a readable CA certificate,
    so a typo or a wrong file stops the server at start instead of refusing every TPM later.
    """
    require("cryptography", "to read the EK CA certificates")
    if isinstance(paths, str):
        paths = [paths]
    files = []
    for path in paths or ():
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(CA_FILE_SUFFIXES) and not name.startswith(".")
                           and os.path.isfile(os.path.join(path, name)))
            if not found:
                raise EKCertificateError("--ek-ca %s: the directory holds no certificate file (%s)"
                                         % (path, ", ".join("*" + suffix for suffix in CA_FILE_SUFFIXES)))
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise EKCertificateError("--ek-ca %s: no such file or directory" % path)
    certificates, seen = [], set()
    for path in files:
        for certificate in _read_certificates(path):
            problem = _trusted_ca_problem(certificate)
            if problem:
                raise EKCertificateError("--ek-ca %s: %s" % (path, problem))
            if _der(certificate) not in seen:
                seen.add(_der(certificate))
                certificates.append(certificate)
    return tuple(certificates)


def _read_certificates(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise EKCertificateError("--ek-ca %s: %s" % (path, error.strerror or error)) from None
    blocks = _pem_blocks(data) if b"-----BEGIN" in data else [data]
    try:
        return [_load_der(block)[0] for block in blocks]
    except ValueError as error:
        raise EKCertificateError("--ek-ca %s: not a PEM or DER X.509 certificate file (%s)" % (path, error)) from None


def _pem_blocks(data):
    """The DER of every CERTIFICATE block of a PEM file; ValueError when there is none or one is not base64."""
    blocks = []
    for part in data.split(b"-----BEGIN CERTIFICATE-----")[1:]:
        body, end, _rest = part.partition(b"-----END CERTIFICATE-----")
        if not end:
            raise ValueError("a CERTIFICATE block has no END line")
        try:
            blocks.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError) as error:
            raise ValueError("a CERTIFICATE block is not base64: %s" % error) from None
    if not blocks:
        raise ValueError("no CERTIFICATE block")
    return blocks


def _trusted_ca_problem(certificate):
    name = _describe_name(certificate.subject) or "(unnamed)"
    try:
        constraints = _extension(certificate.extensions, x509.BasicConstraints)
    except ValueError as error:
        return "the extensions of %s cannot be read: %s" % (name, error)
    if constraints is None and certificate.version == x509.Version.v1:
        return ""
    if constraints is None or not constraints.ca:
        return ("%s is not a CA certificate; --ek-ca takes the CA certificates of TPM manufacturers, not EK certificates"
                % name)
    return ""
