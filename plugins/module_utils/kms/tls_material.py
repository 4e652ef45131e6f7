# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger's own TLS material: a private CA and a server certificate it signs.

Private to the collection (kairos_challenger_tls, used by the ``challenger`` role with
``challenger_tls: generate``). In a directory: ``ca.key``, ``ca.crt``, ``server.key``,
``server.crt``. Private keys are written 0600 (the server key owned by the service user
so the server can read it, the CA key root's) and never returned. The CA is made once
and kept; the server certificate is (re)issued when it is missing, does not match its
key or the CA, lacks one of the wanted names, or expires within 30 days.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import pwd

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

x509 = optional_import("cryptography.x509")
oid = optional_import("cryptography.x509.oid")
hashes = optional_import("cryptography.hazmat.primitives.hashes")
serialization = optional_import("cryptography.hazmat.primitives.serialization")
ec = optional_import("cryptography.hazmat.primitives.asymmetric.ec")

RENEW_BEFORE = datetime.timedelta(days=30)
CA_COMMON_NAME = "kairos.kcrypt challenger CA"
FILES = ("ca.key", "ca.crt", "server.key", "server.crt")


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def parse_san(item):
    """``DNS:name`` or ``IP:address`` as an x509 general name."""
    kind, _sep, value = item.partition(":")
    if kind == "DNS" and value:
        return x509.DNSName(value)
    if kind == "IP" and value:
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise KcryptError("subject alternative name %r must look like DNS:name or IP:address" % item)


def service_identity(owner, group):
    """(uid, gid) of the service user (and its group, or ``group``), or (None, None) for root's files."""
    if not owner:
        return None, None
    try:
        entry = pwd.getpwnam(owner)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as error:
        raise KcryptError("no such user or group: %s" % error.args[0]) from None
    return entry.pw_uid, gid


def _write_private_key(path, key, uid, gid):
    """A PEM private key readable by its owner only, replaced atomically."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        if uid is not None:
            os.fchown(fd, uid, gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_certificate(path, certificate):
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _load(path, loader):
    """The parsed file, or None when it is missing or unreadable (then it is replaced)."""
    try:
        with open(path, "rb") as handle:
            return loader(handle.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def _load_key(path):
    return _load(path, lambda data: serialization.load_pem_private_key(data, None))


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _issue_ca(key, common_name, days):
    name = x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, common_name)])
    start = _now() - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue_server(key, ca_key, ca_cert, common_name, names, days):
    start = _now() - datetime.timedelta(minutes=5)
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _same_public_key(certificate, key):
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(*pem) == key.public_key().public_bytes(*pem)


def server_problems(cert, key, ca_cert, names):
    """Why the server certificate must be issued again (empty: it is fine)."""
    if cert is None:
        return ["no server certificate"]
    if key is None or not _same_public_key(cert, key):
        return ["server certificate does not match its key"]
    if cert.issuer != ca_cert.subject:
        return ["server certificate not issued by the CA"]
    try:
        ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # any verification failure means: not signed by this CA
        return ["server certificate not signed by the CA"]
    try:
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        present = set()
    missing = [str(name.value) for name in names if name not in present]
    if missing:
        return ["server certificate lacks %s" % ", ".join(missing)]
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return ["server certificate expires soon"]
    return []


def ensure(directory, common_name, subject_alt_names, owner="", group="", days=825, ca_days=3650,
           ca_common_name=CA_COMMON_NAME, check_mode=False):
    """Make the CA and server certificate in ``directory`` what they should be.

    Returns {"changed", "reasons", "ca_certificate" (PEM, public), "certificate", "key", "ca"}
    (paths). In check mode nothing is written and ``reasons`` says what would change.
    """
    require("cryptography", "to make the challenger's TLS certificates")
    try:
        return _ensure(directory, common_name, subject_alt_names, owner, group, days, ca_days, ca_common_name, check_mode)
    except OSError as error:
        raise KcryptError("challenger TLS material in %s: %s" % (directory, error)) from None


def _ensure(directory, common_name, subject_alt_names, owner, group, days, ca_days, ca_common_name, check_mode):
    if not subject_alt_names:
        raise KcryptError("the server certificate needs at least one subject alternative name (DNS:name or IP:address)")
    if days < 1 or ca_days < 1:
        raise KcryptError("certificate lifetimes must be at least one day")
    names = [parse_san(item) for item in subject_alt_names]
    uid, gid = service_identity(owner, group)
    paths = {name: os.path.join(directory, name) for name in FILES}
    if not check_mode:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    reasons = []
    ca_key = _load_key(paths["ca.key"])
    ca_cert = _load(paths["ca.crt"], x509.load_pem_x509_certificate)
    if ca_key is None or ca_cert is None or not _same_public_key(ca_cert, ca_key) or ca_cert.not_valid_after_utc < _now():
        reasons.append("no usable CA")
        if not check_mode:
            ca_key = _new_key()
            ca_cert = _issue_ca(ca_key, ca_common_name, ca_days)
            _write_private_key(paths["ca.key"], ca_key, None, None)  # the CA key stays root's
            _write_certificate(paths["ca.crt"], ca_cert)
    key = _load_key(paths["server.key"])
    cert = _load(paths["server.crt"], x509.load_pem_x509_certificate)
    problems = ["new CA"] if reasons else server_problems(cert, key, ca_cert, names)
    if problems:
        reasons += problems
        if not check_mode:
            if key is None:
                key = _new_key()
                _write_private_key(paths["server.key"], key, uid, gid)
            _write_certificate(paths["server.crt"], _issue_server(key, ca_key, ca_cert, common_name, names, days))
    if uid is not None and os.path.exists(paths["server.key"]):  # the service reads its key; keep ownership right
        info = os.stat(paths["server.key"])
        if (info.st_uid, info.st_gid) != (uid, gid) or info.st_mode & 0o777 != 0o600:
            reasons.append("server key ownership")
            if not check_mode:
                os.chown(paths["server.key"], uid, gid)
                os.chmod(paths["server.key"], 0o600)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode() if ca_cert is not None else ""
    return {"changed": bool(reasons), "reasons": reasons, "ca_certificate": ca_pem,
            "certificate": paths["server.crt"], "key": paths["server.key"], "ca": paths["ca.crt"]}
