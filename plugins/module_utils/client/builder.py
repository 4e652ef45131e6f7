# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One way from a node's settings to a KMS client: the discovery CLI, its plugin mode and the
``kms`` key source (modules, ``kcrypt`` CLI) all build their client here.

Private to the collection. :func:`client_config` applies overrides (flags, module options,
the plugin payload) to the node's Kairos settings the way upstream's
``createClientWithOverrides`` does, detects a LiveCD boot (PCR enrolment deferred), reads
the CA certificate, and returns a :class:`kms_client.ClientConfig`.
"""

from __future__ import annotations

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kairos_config
from ansible_collections.kairos.kcrypt.plugins.module_utils.client.kms_client import PROTOCOL_ATTESTATION, ClientConfig
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import DEFAULT_TPM_LAYOUT

DEFAULT_ATTEMPTS = 30  # upstream's default for the CLI, the plugin and the boot-time client
NO_SERVER_ERROR = "challenger server URL is required (challenger_server must be configured or provided via payload)"
OVERRIDABLE = ("challenger_server", "mdns", "certificate", "tpm_device", "c_index", "nv_index", "protocol", "mdns_interfaces",
               "tpm_layout")


def mask(value):
    """Upstream's maskSensitiveString for debug logs: short values fully starred, long ones keep 3+3 characters."""
    if not value:
        return "<empty>"
    if len(value) <= 10:
        return "*" * len(value)
    return value[:3] + "*" * (len(value) - 6) + value[-3:]


def is_set(value):
    """Whether an override was given (None, empty text and empty lists are not)."""
    return value is not None and value != "" and value != () and value != []


def apply_overrides(settings, overrides=None, log=None):
    """``settings`` (KcryptSettings) with every set override replaced (None, "" and empty lists are unset).

    Overrides are keyed like KcryptSettings' fields; ``mdns_interfaces`` may be a comma- or
    space-separated string. ``log`` (a logging.Logger) gets upstream's debug lines, secrets masked.
    """
    changes = {}
    for key, value in (overrides or {}).items():
        if key not in OVERRIDABLE:
            raise KcryptError("unknown client setting %r (known: %s)" % (key, ", ".join(OVERRIDABLE)))
        if not is_set(value):
            continue
        if key == "mdns_interfaces":
            value = tuple(value.replace(",", " ").split()) if isinstance(value, str) else tuple(value)
        changes[key] = value
    if log is not None:
        _log_settings(log, "Original configuration", settings)
        _log_overrides(log, settings, changes)
    settings = settings.with_overrides(**changes)
    if log is not None:
        _log_settings(log, "Final configuration", settings)
    return settings


def _log_overrides(log, settings, changes):
    """Upstream's ``Overriding ...`` debug lines (cli_test.go checks their wording)."""
    if "challenger_server" in changes:
        log.debug("Overriding server URL: %s -> %s", settings.challenger_server, changes["challenger_server"])
    if "mdns" in changes:
        log.debug("Overriding MDNS setting: %s -> %s", go_bool(settings.mdns), go_bool(changes["mdns"]))
    if "certificate" in changes:
        log.debug("Overriding certificate: %s -> %s", mask(settings.certificate), mask(changes["certificate"]))
    if "tpm_device" in changes:
        log.debug("Overriding TPM device from CLI: %s", changes["tpm_device"])


def go_bool(value):
    """``true`` or ``false``, as Go prints a bool (upstream's log lines)."""
    return "true" if value else "false"


def _log_settings(log, title, settings):
    log.debug("%s:", title)
    log.debug("  Server: %s", settings.challenger_server)
    log.debug("  MDNS: %s", go_bool(settings.mdns))
    log.debug("  Certificate: %s", mask(settings.certificate))
    log.debug("  TPMDevice: %s", settings.tpm_device)


def client_config(settings, overrides=None, attempts=DEFAULT_ATTEMPTS, retry_delay=None,
                  default_protocol=PROTOCOL_ATTESTATION, cmdline_path=None, log=None):
    """The ClientConfig for this node: ``settings`` with ``overrides``, LiveCD deferral, the CA's PEM.

    ``cmdline_path`` is the kernel command line to detect a LiveCD boot from (default
    /proc/cmdline, "" = none). ``overrides`` (see :func:`apply_overrides`) are applied, and logged to
    ``log``, when given. Raises KcryptError (upstream's text) without a server URL.
    """
    if overrides is not None:
        settings = apply_overrides(settings, overrides, log)
    if not settings.challenger_server:
        raise KcryptError(NO_SERVER_ERROR)
    # Installing from a LiveCD: the PCRs are not final, let the KMS learn them on the first real boot.
    livecd = kairos_config.read_livecd_boot(cmdline_path)
    if livecd and log is not None:
        log.debug("LiveCD mode detected - deferring PCR enrollment")
    options = {}
    if retry_delay is not None:
        options["retry_delay"] = retry_delay
    return ClientConfig(
        challenger_server=settings.challenger_server,
        certificate=settings.certificate,
        mdns=bool(settings.mdns),
        mdns_interfaces=tuple(settings.mdns_interfaces) or None,
        tpm_device=settings.tpm_device,
        c_index=settings.c_index,
        tpm_layout=settings.tpm_layout or DEFAULT_TPM_LAYOUT,
        attempts=attempts,
        protocol=settings.protocol or default_protocol,
        defer_pcr_enrollment=livecd,
        **options
    )
