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


@pytest.mark.parametrize("header, seconds", [
    ("1", 1.0), (" 3 ", 3.0), ("0", 0.0),
    ("600", client.MAX_RETRY_AFTER),  # a KMS or proxy cannot park a booting node for ten minutes
    (None, None), ("", None), ("-1", None), ("1.5", None), ("Wed, 21 Oct 2026 07:28:00 GMT", None),
    ("9" * 4000, None),  # bounded before int()
])
def test_retry_after_header(header, seconds):
    assert client.retry_after_seconds(header) == seconds


def test_a_busy_kms_is_retried_after_its_retry_after_with_jitter(monkeypatch):
    pauses, logged, answers = [], [], [client.KmsBusy("busy", 3.0), client.KmsBusy("busy", None), KcryptError("reset"), b"key"]
    monkeypatch.setattr(client.time, "sleep", pauses.append)

    def attempt():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    config = client.ClientConfig("http://kms", attempts=5, retry_delay=1.0)
    assert client._retry(config, attempt, logged.append, "COS_PERSISTENT") == b"key"
    assert 3.0 <= pauses[0] <= 3.0 * (1 + client.RETRY_JITTER)  # Retry-After, stretched
    assert 1.0 <= pauses[1] <= 1.0 * (1 + client.RETRY_JITTER)  # busy without a usable header: retry_delay, stretched
    assert pauses[2] == 1.0  # any other failure: retry_delay exactly, as upstream
    assert "the KMS asked to retry after 3 s" in logged[1] and "after ? s" in logged[3]


def test_busy_answers_still_count_as_attempts(monkeypatch):
    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    calls = []

    def attempt():
        calls.append(1)
        raise client.KmsBusy("the KMS at ws://kms/tpm-attestation is busy: HTTP 503", 1.0)

    config = client.ClientConfig("http://kms", attempts=4, retry_delay=1.0)
    with pytest.raises(KcryptError, match="after 4 attempts; last error: .*busy: HTTP 503"):
        client._retry(config, attempt, lambda line: None, "COS_PERSISTENT")
    assert len(calls) == 4
