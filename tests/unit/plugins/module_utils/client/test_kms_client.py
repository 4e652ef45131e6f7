# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node client's configuration: endpoint URLs, checks before any TPM work, the CA certificate."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef


@pytest.mark.parametrize(
    "server, url",
    [  # upstream cmd/discovery/client/client_test.go vectors
        ("http://foo.example:8082/challenge", "ws://foo.example:8082/challenge/tpm-attestation"),
        ("http://foo.example:8082/", "ws://foo.example:8082/tpm-attestation"),
        ("http://foo.example:8082///", "ws://foo.example:8082/tpm-attestation"),
        ("http://foo.example:8082", "ws://foo.example:8082/tpm-attestation"),
        ("https://kms", "wss://kms/tpm-attestation"),
    ],
)
def test_endpoint_url(server, url):
    assert client.endpoint_url(server, "/tpm-attestation") == url


@pytest.mark.parametrize(
    "config, message",
    [
        (client.ClientConfig(""), "challenger_server is empty"),
        (client.ClientConfig("kms:8082"), "must start with http"),
        (client.ClientConfig("http://kms", protocol="v3"), "protocol must be one of"),
        (client.ClientConfig("http://kms.example", mdns=True), 'domain should end in ".local" when using mdns'),
    ],
)
def test_client_config_errors_fail_before_touching_the_tpm(config, message):
    config.tpm_device = "/nonexistent/tpm"  # would fail differently if it were opened
    with pytest.raises(KcryptError, match=message):
        client.get_passphrase(config, PartitionRef(label="COS_PERSISTENT"))


def test_certificate_pem_accepts_text_or_a_file(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    assert client.certificate_pem(pem) == pem
    assert client.certificate_pem("") == ""
    path = tmp_path / "ca.pem"
    path.write_text(pem)
    assert client.certificate_pem(str(path)) == pem
    with pytest.raises(KcryptError, match="cannot read /nonexistent/ca.pem"):
        client.certificate_pem("/nonexistent/ca.pem")
