# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""bin/kcrypt-discovery-challenger run as a process, against swtpm: root, info, get argument
handling and the discovery.password plugin protocol without a KMS (remote cases: test_discovery_remote.py)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob as tpm_blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.discovery_node import DiscoveryNode, plugin_reply


@pytest.fixture
def node(tmp_path, subprocess_env):
    return DiscoveryNode(tmp_path, subprocess_env)


def tpm_hash(tcti):
    with TPM(tcti) as tpm:
        return tpm.endorsement_key().tpm_hash


def test_root_prints_exactly_the_hash_and_reads_tpm_device_from_config(node, swtpm):
    expected = tpm_hash(swtpm.tcti)
    result = node.run("--tpm-device", swtpm.tcti)
    assert (result.returncode, result.stdout, result.stderr) == (0, expected.encode(), b"")
    node.config("kcrypt:\n  tpm_device: %s\n" % swtpm.tcti)
    result = node.run()
    assert (result.returncode, result.stdout) == (0, expected.encode())


def test_root_error_goes_to_stderr_with_exit_1(node):
    result = node.run("--tpm-device", "/nonexistent/tpm")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(b"Error: no TPM at /nonexistent/tpm")


def test_there_is_no_cleanup_command(node):
    """Checklist 42: like every released upstream binary (cobra: unknown command); NV maintenance is `kcrypt cleanupnv`."""
    result = node.run("cleanup")
    assert (result.returncode, result.stdout) == (1, b"")
    error = result.stderr.decode()
    assert error.startswith("Error: argument command: invalid choice: 'cleanup'") and error.count("\n") == 1


def test_info_layout(node, swtpm_plain):
    with TPM(swtpm_plain.tcti) as tpm:
        ek = tpm.endorsement_key()
        pcrs = tpm.pcr_read([0, 7, 11])
    assert ek.certificate is None
    result = node.run("info", "--tpm-device", swtpm_plain.tcti, "--pcrs", "11, 7,0,7")
    assert result.returncode == 0, result.stderr
    expected = (
        "TPM Enrollment Information\n==========================\n\n"
        "TPM Hash:\n  %s\n\n"
        "PCR Values:\n  PCR  0: %s\n  PCR  7: %s\n  PCR 11: %s\n\n"
        "EK Public Key (PEM):\n%s\n" % (ek.tpm_hash, pcrs[0].hex(), pcrs[7].hex(), pcrs[11].hex(), ek.public_pem)
    )
    assert result.stdout.decode() == expected


def test_info_rejects_bad_pcr_lists_with_upstream_text(node):
    for pcrs, message in (("0,24", "PCR index 24 is out of range (0-23)"), ("", "PCR list cannot be empty"),
                          (",", "no valid PCR indices found"), ("x", "invalid PCR index 'x'")):
        result = node.run("info", "--tpm-device", "/nonexistent/tpm", "--pcrs=" + pcrs)
        assert (result.returncode, result.stdout) == (1, b"")
        assert result.stderr.decode() == "Error: parsing PCR list: %s\n" % message


def test_get_requires_an_identifier_and_a_server(node):
    result = node.run("get", "--challenger-server", "http://127.0.0.1:1")
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == (
        "Error: at least one of --partition-name, --partition-uuid, or --partition-label must be provided\n"
    )
    result = node.run("get", "--partition-label", "COS_PERSISTENT", "--mdns")
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == (
        "Error: getting passphrase: challenger server URL is required "
        "(challenger_server must be configured or provided via payload)\n"
    )


def test_get_with_malformed_config_names_the_file(node):
    node.config("kcrypt: [unclosed\n", name="bad.yaml")
    result = node.run("get", "--partition-label", "COS_PERSISTENT")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("Error: Kairos config file %s/bad.yaml is not valid YAML" % node.oem)


LEGACY_PAYLOAD = {  # jaypipes/ghw block.Partition, as kcrypt <= v0.11 sent it
    "name": "vda5", "label": "persistent", "mount_point": "", "size_bytes": 1073741824, "type": "ext4",
    "read_only": False, "uuid": "8bb2f4c9-0c4c-4d63-b0d2-2bbbd3e3c3a1", "filesystem_label": "COS_PERSISTENT",
}
NEWEST_PAYLOAD = {  # kairos-sdk bus.DiscoveryPasswordPayload
    "partition": {"name": "vda5", "partition_label": "persistent", "label": "COS_PERSISTENT", "size": 1024,
                  "fs": "crypto_LUKS", "uuid": "8bb2f4c9-0c4c-4d63-b0d2-2bbbd3e3c3a1"},
}


def test_plugin_legacy_payload_without_server_uses_the_offline_nv_passphrase(node, swtpm):
    node.config("kcrypt:\n  challenger:\n    tpm_device: %s\n    nv_index: '0x1500010'\n" % swtpm.tcti)
    first = plugin_reply(node.plugin(json.dumps(LEGACY_PAYLOAD), env={"KCRYPT_DISCOVERY_DEBUG": "1"}))
    assert first["error"] == ""
    assert len(first["data"]) == 32
    again = plugin_reply(node.plugin(json.dumps(LEGACY_PAYLOAD)))
    assert again["data"] == first["data"]
    with TPM(swtpm.tcti) as tpm:
        assert tpm_blob.read_nv_passphrase(tpm, 0x1500010) == first["data"].encode()
        assert tpm.nv_read(0x1500000) is None  # the configured index, not the default
    log_text = node.log_text()
    assert "Received payload" in log_text
    assert first["data"] not in log_text


def test_plugin_newest_payload_without_server_fails_like_upstream(node):
    reply = plugin_reply(node.plugin(json.dumps(NEWEST_PAYLOAD)))
    assert reply == {"state": "", "data": "", "error": (
        "failed getting pass: challenger server URL is required "
        "(challenger_server must be configured or provided via payload)"), "log": ""}


def test_plugin_payload_errors(node):
    reply = plugin_reply(node.plugin("{not json"))
    assert reply["error"].startswith("failed reading payload: ")
    data = json.dumps({"challenger_server": "http://kms"})
    reply = plugin_reply(node.plugin(data))
    assert reply["error"] == "partition is required in payload. Received payload data: %s" % data
    for event in (b"garbage", b'{"name": "discovery.password", "data": {"partition": {}}}',
                  b'{"name": "discovery.password", "data": "", "file": "/nonexistent/pluggable1"}'):
        result = node.run("discovery.password", stdin=event)
        assert (result.returncode, result.stdout) == (1, b"")
        assert result.stderr.startswith(b"Error: starting plugin: ")


def test_plugin_reads_large_data_from_the_event_file(node, tmp_path):
    payload = dict(NEWEST_PAYLOAD, padding="x" * 9000)  # > 8192 bytes: go-pluggable passes a file instead
    data_file = tmp_path / "pluggable123"
    data_file.write_text(json.dumps(payload))
    reply = plugin_reply(node.plugin("", file=str(data_file)))
    # The partition was read from the file: the failure is the missing server, not the payload.
    assert reply["error"].startswith("failed getting pass: challenger server URL is required")


def test_plugin_logs_only_to_its_file(node):
    result = node.plugin(json.dumps(NEWEST_PAYLOAD), env={"KCRYPT_DISCOVERY_DEBUG": "1"})
    plugin_reply(result)
    assert result.stderr == b""
    text = node.log_text()
    assert "DBG Debug mode enabled for plugin mode" in text
    assert "ERR failed getting pass: challenger server URL is required" in text


# -- upstream cmd/discovery/cli_test.go, mirrored with assertions that always run --------------------

UPSTREAM_TEST_CONFIG = """kcrypt:
  challenger:
    challenger_server: "https://default-server.com:8080"
    mdns: false
    certificate: "/default/path/to/cert.pem"
    nv_index: "0x1500000"
    c_index: "0x81000008"
    tpm_device: "/nonexistent/tpm0"
"""


def debug_get(node, *extra):
    result = node.run("get", "--partition-name=/dev/test", "--partition-uuid=test-uuid",
                      "--partition-label=test-label", "--attempts=1", *extra)
    assert result.returncode == 1 and result.stdout == b""
    return result.stderr.decode()


def test_cli_config_values_without_overrides(node):
    node.config(UPSTREAM_TEST_CONFIG)
    log = debug_get(node, "--debug")
    original, final = log.split("Original configuration:")[1].split("Final configuration:")
    assert "  Server: https://default-server.com:8080" in original
    assert "  MDNS: false" in original
    assert "  Certificate: /de" + "*" * 19 + "pem\n" in original  # masked: first and last 3 characters
    assert "  TPMDevice: /nonexistent/tpm0" in original
    assert "Overriding" not in log
    assert "  Server: https://default-server.com:8080" in final
    debug_lines = [line for line in log.splitlines() if " DBG " in line]
    assert debug_lines and not any("/default/path/to/cert.pem" in line for line in debug_lines)
    assert log.rstrip().splitlines()[-1].startswith("Error: getting passphrase: ")


def test_cli_flags_override_config_and_are_logged(node):
    node.config(UPSTREAM_TEST_CONFIG)
    log = debug_get(node, "--challenger-server=https://overridden-server.com:9999", "--mdns",
                    "--certificate=/overridden/cert.pem", "--debug")
    assert "Overriding server URL: https://default-server.com:8080 -> https://overridden-server.com:9999" in log
    assert "Overriding MDNS setting: false -> true" in log
    assert "Overriding certificate: /de%s -> /ov%s" % ("*" * 19 + "pem", "*" * 14 + "pem") in log
    final = log.split("Final configuration:")[1]
    assert "  Server: https://overridden-server.com:9999" in final
    assert "  MDNS: true" in final
    # The overridden .local-less server with --mdns fails with upstream's mDNS text, before any TPM work.
    assert 'domain should end in ".local" when using mdns' in log


def test_cli_partition_details_in_debug(node):
    log = debug_get(node, "--debug", "--attempts=2")
    details = log.split("Partition details:")[1]
    for line in ("  Name: /dev/test", "  UUID: test-uuid", "  Label: test-label", "  Attempts: 2"):
        assert line in details


def test_cli_no_debug_output_without_debug(node):
    node.config(UPSTREAM_TEST_CONFIG)
    log = debug_get(node)
    assert "Original configuration" not in log
    assert "Partition details" not in log
    assert log.startswith("Error: getting passphrase: ")


def test_cli_missing_config_shows_defaults(node):
    log = debug_get(node, "--debug", "--challenger-server=http://127.0.0.1:9", "--tpm-device=/nonexistent/tpm0")
    original = log.split("Original configuration:")[1].split("Final configuration:")[0]
    assert "  Server: \n" in original and "  Certificate: <empty>" in original
    assert "Overriding server URL:  -> http://127.0.0.1:9" in log
    assert "Overriding MDNS" not in log and "Overriding certificate" not in log
