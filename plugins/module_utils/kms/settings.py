# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger's settings: defaults < config file < flags, validated, and the store URL.

Private to the collection. ``kcrypt-challenger serve`` and its admin subcommands read
their settings here, so the config file means the same to both.
"""

from __future__ import annotations

import os

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.attestation import NONCE_MODES, NONCE_WHEN_SUPPORTED
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.ek_certificate import MODE_OFF, parse_mode
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import (
    DEFAULT_MAX_PARTITIONS_PER_TPM,
    ENROLLMENT_MODES,
    parse_max_partitions,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.server import PROTOCOL_NAMES, parse_protocols
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import DEFAULT_SQLITE_PATH

yaml = optional_import("yaml")

ENV_CONFIG = "KCRYPT_CHALLENGER_CONFIG"
DEFAULT_CONFIG = "/etc/kcrypt-challenger/config.yaml"
DEFAULTS = {
    "listen": "0.0.0.0:8082",  # upstream's --challenger-bind-address default is :8082
    "store": "sqlite://" + DEFAULT_SQLITE_PATH,
    "tls_cert": "",
    "tls_key": "",
    "enrollment": "tofu",
    "nonce": NONCE_WHEN_SUPPORTED,
    "protocols": list(PROTOCOL_NAMES),  # both, for fleets with Kairos nodes of either generation
    "max_partitions_per_tpm": DEFAULT_MAX_PARTITIONS_PER_TPM,
    "ek_certificate": MODE_OFF,  # upstream: any TPM that passes credential activation may enrol
    "ek_ca": [],  # PEM/DER files or directories of TPM manufacturer CA certificates
    "request_timeout": 10.0,
    "first_message_timeout": 120.0,
    "read_timeout": 10.0,
    "exchange_timeout": 150.0,
    "max_message_size": 64 * 1024,
    "max_connections": "auto",
    "max_connections_per_client": "auto",
    "store_calls": "auto",
    "workers": 1,
    "mdns_host": "",
    "mdns_interfaces": [],
    "mdns_address": "",
    "log_level": "info",
}
SETTING_TYPES = {"request_timeout": float, "first_message_timeout": float, "read_timeout": float, "exchange_timeout": float,
                 "max_message_size": int}
MAX_WORKERS = 64
LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path=None):
    """Settings from the YAML file: {} when no file applies. Raises KcryptError on a bad file."""
    explicit = path or os.environ.get(ENV_CONFIG)
    path = explicit or DEFAULT_CONFIG
    if not os.path.exists(path):
        if explicit:
            raise KcryptError("config file %s does not exist" % path)
        return {}
    if yaml is None:
        raise KcryptError("PyYAML is required to read %s" % path)
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise KcryptError("cannot read config file %s: %s" % (path, error)) from None
    if not isinstance(data, dict):
        raise KcryptError("config file %s must hold a mapping of settings" % path)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise KcryptError("config file %s: unknown setting(s) %s; known: %s" % (path, ", ".join(unknown), ", ".join(sorted(DEFAULTS))))
    return data


def settings(args):
    """Defaults < config file < flags, validated."""
    result = dict(DEFAULTS)
    result.update(load_config(getattr(args, "config", None)))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            result[key] = value
    for key, kind in SETTING_TYPES.items():
        try:
            result[key] = kind(result[key])
        except (TypeError, ValueError):
            raise KcryptError("%s must be a number, not %r" % (key, result[key])) from None
    for key in ("request_timeout", "first_message_timeout", "read_timeout", "exchange_timeout"):
        if not result[key] > 0:
            raise KcryptError("%s must be a positive number of seconds, not %r" % (key, result[key]))
    if result["exchange_timeout"] < result["first_message_timeout"]:
        raise KcryptError("exchange_timeout (%gs) must be at least first_message_timeout (%gs)"
                          % (result["exchange_timeout"], result["first_message_timeout"]))
    if isinstance(result["mdns_interfaces"], str):
        result["mdns_interfaces"] = [i for i in result["mdns_interfaces"].replace(",", " ").split() if i]
    result["workers"] = parse_workers(result["workers"])
    result["protocols"] = list(parse_protocols(result["protocols"]))
    result["max_partitions_per_tpm"] = parse_max_partitions(result["max_partitions_per_tpm"])
    result["max_connections"] = parse_count(result["max_connections"], "max_connections", minimum=1)
    result["max_connections_per_client"] = parse_count(result["max_connections_per_client"], "max_connections_per_client", minimum=0)
    result["ek_certificate"] = parse_mode(result["ek_certificate"])
    result["ek_ca"] = parse_paths(result["ek_ca"], "ek_ca")
    if result["enrollment"] not in ENROLLMENT_MODES:
        raise KcryptError("enrollment must be one of %s, not %r" % (", ".join(ENROLLMENT_MODES), result["enrollment"]))
    if result["nonce"] not in NONCE_MODES:
        raise KcryptError("nonce must be one of %s, not %r" % (", ".join(NONCE_MODES), result["nonce"]))
    if bool(result["tls_cert"]) != bool(result["tls_key"]):
        raise KcryptError("TLS needs both tls_cert and tls_key")
    if result["mdns_host"] and not result["mdns_interfaces"]:
        raise KcryptError("mdns_host needs mdns_interfaces (e.g. --mdns-interface eth0): mDNS is never announced on every interface by default")
    result["host"], result["port"] = parse_listen(result["listen"])
    return result


def parse_workers(value):
    """``workers``: a count from 1 to MAX_WORKERS, or ``auto`` (one per CPU this process may use)."""
    if str(value).strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise KcryptError("workers must be a number or auto, not %r" % (value,)) from None
    if not 1 <= number <= MAX_WORKERS:
        raise KcryptError("workers must be between 1 and %d, not %d" % (MAX_WORKERS, number))
    return number


def parse_count(value, name, minimum):
    """A connection limit: a whole number >= ``minimum``, or ``auto`` (None: derived from the open-file limit)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise KcryptError("%s must be a number or auto, not %r" % (name, value)) from None
    if number < minimum:
        raise KcryptError("%s must be at least %d, not %d" % (name, minimum, number))
    return number


def parse_paths(value, key):
    """A list of paths from a list, or one path as text."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise KcryptError("%s must be a path or a list of paths, not %r" % (key, value))
    return list(value)


def parse_listen(value):
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces, as Go's ``:8082``) → (host, port)."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise KcryptError("listen must be HOST:PORT, not %r" % text)
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise KcryptError("listen %r: %r is not a port number" % (text, port)) from None
    if not 0 <= number <= 65535:
        raise KcryptError("listen %r: port out of range" % text)
    return host, number


def store_url(args):
    """The store URL from --store, else the config file, else the default."""
    return getattr(args, "store", None) or load_config(getattr(args, "config", None)).get("store") or DEFAULTS["store"]


def store_calls(config):
    """``auto``: SQLite calls inline on the event loop (cheaper than a thread hand-off), others in a thread pool."""
    if config["store_calls"] != "auto":
        return config["store_calls"]
    return "inline" if config["store"].startswith(("sqlite:", "/")) else "thread"
