# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Generate the challenger's TLS material: a private CA and a server certificate it signs.

Run by the kairos.kcrypt ``challenger`` role with the server's virtualenv Python (which has
``cryptography``) when ``challenger_tls: generate``:

    kcrypt_tls.py --dir DIR --common-name NAME --san DNS:kms.example --san IP:10.0.0.5 \
        [--owner USER] [--group GROUP] [--ca-days 3650] [--days 825] [--check]

Writes ``ca.key``, ``ca.crt``, ``server.key`` and ``server.crt`` in DIR. Private keys are
created 0600 (owned by --owner so the service can read its key) and never printed. The CA
is made once and kept; the server certificate is (re)issued when it is missing, does not
match its key or the CA, lacks one of the wanted names, or expires within 30 days. Prints
one JSON object: ``changed``, ``ca_certificate`` (PEM, public), ``reasons``.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import ipaddress
import json
import os
import pwd
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RENEW_BEFORE = datetime.timedelta(days=30)


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def parse_san(item):
    kind, _sep, value = item.partition(":")
    if kind == "DNS" and value:
        return x509.DNSName(value)
    if kind == "IP" and value:
        return x509.IPAddress(ipaddress.ip_address(value))
    raise ValueError("subject alternative name %r must look like DNS:name or IP:address" % item)


def write_private_key(path, key, uid, gid):
    """Write a PEM private key readable by its owner only, atomically."""
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


def write_certificate(path, certificate):
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load(path, loader):
    try:
        with open(path, "rb") as handle:
            return loader(handle.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # unreadable: treat as missing and replace


def load_key(path):
    return load(path, lambda data: serialization.load_pem_private_key(data, None))


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def issue_ca(key, common_name, days):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = now() - datetime.timedelta(minutes=5)
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


def issue_server(key, ca_key, ca_cert, common_name, names, days):
    start = now() - datetime.timedelta(minutes=5)
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def same_public_key(certificate, key):
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(*pem) == key.public_key().public_bytes(*pem)


def server_problems(cert, key, ca_cert, names):
    """Why the server certificate must be issued again (empty: it is fine)."""
    if cert is None:
        return ["no server certificate"]
    if key is None or not same_public_key(cert, key):
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
    if cert.not_valid_after_utc - now() < RENEW_BEFORE:
        return ["server certificate expires soon"]
    return []


def ensure(args):
    names = [parse_san(item) for item in args.san]
    if not names:
        raise ValueError("at least one --san is needed")
    uid = gid = None
    if args.owner:
        uid = pwd.getpwnam(args.owner).pw_uid
        gid = grp.getgrnam(args.group).gr_gid if args.group else pwd.getpwnam(args.owner).pw_gid
    paths = {name: os.path.join(args.dir, name) for name in ("ca.key", "ca.crt", "server.key", "server.crt")}
    reasons = []
    ca_key = load_key(paths["ca.key"])
    ca_cert = load(paths["ca.crt"], x509.load_pem_x509_certificate)
    if ca_key is None or ca_cert is None or not same_public_key(ca_cert, ca_key) or ca_cert.not_valid_after_utc < now():
        reasons.append("no usable CA")
        if not args.check:
            ca_key = new_key()
            ca_cert = issue_ca(ca_key, args.ca_common_name, args.ca_days)
            write_private_key(paths["ca.key"], ca_key, None, None)  # the CA key stays root's
            write_certificate(paths["ca.crt"], ca_cert)
    key = load_key(paths["server.key"])
    cert = load(paths["server.crt"], x509.load_pem_x509_certificate)
    problems = ["new CA"] if reasons else server_problems(cert, key, ca_cert, names)
    if problems:
        reasons += problems
        if not args.check:
            if key is None:
                key = new_key()
                write_private_key(paths["server.key"], key, uid, gid)
            write_certificate(paths["server.crt"], issue_server(key, ca_key, ca_cert, args.common_name, names, args.days))
    if uid is not None and not args.check:  # the service reads its key; keep ownership right on every run
        stat = os.stat(paths["server.key"])
        if (stat.st_uid, stat.st_gid) != (uid, gid) or stat.st_mode & 0o777 != 0o600:
            os.chown(paths["server.key"], uid, gid)
            os.chmod(paths["server.key"], 0o600)
            reasons.append("server key ownership")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode() if ca_cert is not None else ""
    return {"changed": bool(reasons), "reasons": reasons, "ca_certificate": ca_pem,
            "certificate": paths["server.crt"], "key": paths["server.key"], "ca": paths["ca.crt"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="challenger TLS material (CA + server certificate)")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--common-name", required=True)
    parser.add_argument("--ca-common-name", default="kairos.kcrypt challenger CA")
    parser.add_argument("--san", action="append", default=[])
    parser.add_argument("--owner", default="")
    parser.add_argument("--group", default="")
    parser.add_argument("--days", type=int, default=825)
    parser.add_argument("--ca-days", type=int, default=3650)
    parser.add_argument("--check", action="store_true", help="report what would change, write nothing")
    args = parser.parse_args(argv)
    try:
        os.makedirs(args.dir, mode=0o750, exist_ok=True)
        result = ensure(args)
    except (OSError, ValueError, KeyError) as error:
        json.dump({"failed": True, "changed": False, "msg": "TLS: %s" % error}, sys.stdout)
        sys.stderr.write("TLS: %s\n" % error)
        return 1
    json.dump(result, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
