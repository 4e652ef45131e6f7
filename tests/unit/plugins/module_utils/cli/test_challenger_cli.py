# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kcrypt-challenger settings (kms/settings.py: defaults < config file < flags) through its command line."""

from __future__ import annotations

import os

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger as challenger_cli
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import settings
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch, tmp_path):
    monkeypatch.delenv(settings.ENV_CONFIG, raising=False)
    monkeypatch.setattr(settings, "DEFAULT_CONFIG", str(tmp_path / "absent.yaml"))


def _settings(argv):
    parser = challenger_cli.build_parser()
    return settings.settings(parser.parse_args(argv))


def test_defaults():
    config = _settings(["serve"])
    assert (config["host"], config["port"]) == ("0.0.0.0", 8082)
    assert config["store"] == "sqlite:///var/lib/kcrypt-challenger/kms.db"
    assert config["enrollment"] == "tofu" and config["nonce"] == "when-supported"


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("listen: 127.0.0.1:9000\nstore: sqlite:///srv/kms.db\nenrollment: registered-only\nnonce: required\n"
                    "read-timeout: 3\nmdns_host: kms.local\nmdns_interfaces: [127.0.0.1]\n")
    config = _settings(["serve", "--config", str(path)])
    assert (config["host"], config["port"], config["store"]) == ("127.0.0.1", 9000, "sqlite:///srv/kms.db")
    assert (config["enrollment"], config["nonce"], config["read_timeout"]) == ("registered-only", "required", 3.0)
    config = _settings(["--config", str(path), "serve", "--listen", ":8443", "--nonce", "off", "--store", "sqlite:///x/kms.db"])
    assert (config["host"], config["port"], config["nonce"], config["store"]) == ("0.0.0.0", 8443, "off", "sqlite:///x/kms.db")
    assert config["enrollment"] == "registered-only"  # from the file
    # a top-level --store survives the subcommand's copy of the option
    assert _settings(["--store", "sqlite:///top/kms.db", "serve"])["store"] == "sqlite:///top/kms.db"


@pytest.mark.parametrize(
    "content, message",
    [
        ("port: 1\n", "unknown setting"),
        ("- a\n", "must hold a mapping"),
        ("nonce: sometimes\n", "nonce must be one of"),
        ("tls_cert: /c.pem\n", "needs both tls_cert and tls_key"),
        ("mdns_host: kms.local\n", "needs mdns_interfaces"),
        ("listen: localhost\n", "listen must be HOST:PORT"),
        ("read_timeout: soon\n", "read_timeout must be a number"),
        ("workers: 0\n", "workers must be between 1 and 64, not 0"),
        ("workers: 65\n", "workers must be between 1 and 64"),
        ("workers: many\n", "workers must be a number or auto, not 'many'"),
        ("protocols: []\n", "protocols must list one or both of attestation, legacy"),
        ("protocols: [attestation, v0.1]\n", "protocols must list one or both of attestation, legacy"),
        ("protocols: legacy;attestation\n", "protocols must list one or both"),
        ("max_partitions_per_tpm: 0\n", "max_partitions_per_tpm must be a whole number from 1 to 1024, not 0"),
        ("max_partitions_per_tpm: 2.5\n", "max_partitions_per_tpm must be a whole number"),
        ("max_partitions_per_tpm: lots\n", "max_partitions_per_tpm must be a number"),
        ("max_connections: 0\n", "max_connections must be at least 1, not 0"),
        ("max_connections: lots\n", "max_connections must be a number or auto"),
        ("max_connections_per_client: -1\n", "max_connections_per_client must be at least 0"),
        ("first_message_timeout: 0\n", "first_message_timeout must be a positive number"),
        ("exchange_timeout: 30\n", r"exchange_timeout \(30s\) must be at least first_message_timeout \(120s\)"),
    ],
)
def test_bad_config_files_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(KcryptError, match=message):
        _settings(["serve", "--config", str(path)])


def test_connection_budget_settings(tmp_path):
    config = _settings(["serve"])
    assert (config["request_timeout"], config["first_message_timeout"], config["read_timeout"], config["exchange_timeout"]) == (10, 120, 10, 150)
    assert config["max_connections"] is None and config["max_connections_per_client"] is None  # auto
    path = tmp_path / "config.yaml"
    path.write_text("max_connections: 5000\nmax_connections_per_client: 0\nfirst_message_timeout: 60\n")
    config = _settings(["serve", "--config", str(path), "--max-connections", "auto", "--request-timeout", "5"])
    assert (config["max_connections"], config["max_connections_per_client"]) == (None, 0)
    assert (config["first_message_timeout"], config["request_timeout"]) == (60.0, 5.0)


def test_named_config_must_exist(tmp_path):
    with pytest.raises(KcryptError, match="does not exist"):
        _settings(["serve", "--config", str(tmp_path / "nope.yaml")])


def test_workers():
    assert _settings(["serve"])["workers"] == 1
    assert _settings(["serve", "--workers", "3"])["workers"] == 3
    assert _settings(["serve", "--workers", "auto"])["workers"] == len(os.sched_getaffinity(0))


def test_protocols_and_partition_cap():
    config = _settings(["serve"])
    assert config["protocols"] == ["attestation", "legacy"] and config["max_partitions_per_tpm"] == 16
    assert _settings(["serve", "--protocols", "legacy,attestation"])["protocols"] == ["attestation", "legacy"]
    assert _settings(["serve", "--protocols", "attestation"])["protocols"] == ["attestation"]
    assert _settings(["serve", "--max-partitions-per-tpm", "4"])["max_partitions_per_tpm"] == 4


def test_protocols_from_the_role_s_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("protocols:\n- legacy\nmax_partitions_per_tpm: 8\n")  # what the role's to_nice_yaml writes
    config = _settings(["serve", "--config", str(path)])
    assert config["protocols"] == ["legacy"] and config["max_partitions_per_tpm"] == 8
    assert _settings(["serve", "--config", str(path), "--protocols", "attestation,legacy"])["protocols"] == ["attestation", "legacy"]


def test_parse_listen():
    assert settings.parse_listen("[::1]:8082") == ("::1", 8082)
    assert settings.parse_listen(":0") == ("0.0.0.0", 0)
    with pytest.raises(KcryptError, match="port out of range"):
        settings.parse_listen("h:70000")


def test_main_reports_errors_without_traceback(capsys, tmp_path):
    assert challenger_cli.main(["--config", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err.startswith("Error: config file")
