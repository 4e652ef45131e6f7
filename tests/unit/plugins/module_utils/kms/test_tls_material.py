# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kms/tls_material.py: the challenger's private CA and server certificate, with real cryptography and files."""

from __future__ import annotations

import json
import os
import ssl
import stat

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import tls_material

x509 = pytest.importorskip("cryptography.x509")


def ensure(tmp_path, *extra, **options):
    return tls_material.ensure(str(tmp_path / "tls"), "kms", ["DNS:kms", "IP:127.0.0.1"] + list(extra), **options)


def test_generates_a_ca_and_a_server_certificate_once(tmp_path):
    first = ensure(tmp_path)
    assert first["changed"] and "BEGIN CERTIFICATE" in first["ca_certificate"]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "tls" / key).st_mode) == 0o600
    assert "PRIVATE KEY" not in json.dumps(first)
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["kms"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ensure(tmp_path)["changed"] is False


def test_python_ssl_accepts_the_pair(tmp_path):
    """A peer we did not write (Python's ssl, i.e. OpenSSL) loads the key pair and trusts the chain."""
    ensure(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(tmp_path / "tls" / "server.crt"), str(tmp_path / "tls" / "server.key"))
    client = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.crt"))
    assert client.get_ca_certs()[0]["subject"] == ((("commonName", tls_material.CA_COMMON_NAME),),)


def test_reissues_the_server_certificate_for_new_names_and_keeps_the_ca(tmp_path):
    ensure(tmp_path)
    ca = (tmp_path / "tls" / "ca.crt").read_bytes()
    key = (tmp_path / "tls" / "server.key").read_bytes()
    checked = ensure(tmp_path, "DNS:kms.local", check_mode=True)
    assert checked["changed"] and checked["reasons"] == ["server certificate lacks kms.local"]
    assert b"kms.local" not in (tmp_path / "tls" / "server.crt").read_bytes()  # check mode wrote nothing
    assert ensure(tmp_path, "DNS:kms.local")["changed"]
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == ca
    assert (tmp_path / "tls" / "server.key").read_bytes() == key
    assert ensure(tmp_path, "DNS:kms.local")["changed"] is False


def test_replaces_a_server_certificate_that_does_not_match_its_key(tmp_path):
    ensure(tmp_path)
    (tmp_path / "tls" / "server.key").unlink()
    assert ensure(tmp_path)["reasons"] == ["server certificate does not match its key"]


def test_check_mode_on_nothing_creates_nothing(tmp_path):
    result = ensure(tmp_path, check_mode=True)
    assert result["changed"] and result["reasons"][0] == "no usable CA" and result["ca_certificate"] == ""
    assert not (tmp_path / "tls").exists()


@pytest.mark.parametrize("names, message", [
    ([], "at least one subject alternative name"),
    (["kms.example"], "must look like DNS:name or IP:address"),
    (["IP:not-an-address"], "must look like DNS:name or IP:address"),
])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, names, message):
    with pytest.raises(KcryptError, match=message):
        tls_material.ensure(str(tmp_path / "tls"), "kms", names)
    assert not (tmp_path / "tls").exists()


def test_an_unknown_owner_is_a_clear_error(tmp_path):
    with pytest.raises(KcryptError, match="no such user or group: .*nobody-kcrypt-test"):
        ensure(tmp_path, owner="nobody-kcrypt-test")
