# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-discovery-challenger``: the node CLI, a drop-in for upstream's (spec §1.3-1.4, §5.3-5.4).

Private to the collection. Commands:

- no subcommand: the TPM hash, no newline, exit 0 (checklist 3);
- ``get --partition-label/--partition-name/--partition-uuid``: the passphrase from the
  KMS on stdout, no newline;
- ``info [--pcrs 0,7,11]``: hash, PCR values and EK PEM in upstream's layout;
- ``discovery.password``: the kcrypt plugin protocol: a JSON event on stdin, a JSON reply on
  stdout; logs go to a file, never to stdout.

Errors: ``Error: <message>`` on stderr, exit 1 (cobra's behaviour). Passphrases go to
stdout only (``get``, the plugin reply), never to a log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import builder, kairos_config, kms_client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.pcrs import is_decimal, pcr_index
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM

PROG = "kcrypt-discovery-challenger"
EVENT_DISCOVERY_PASSWORD = "discovery.password"
DEFAULT_PCRS = "0,7,11"

# Where plugin mode logs (upstream: /var/log/kairos/<name>.log); override for tests/unusual layouts.
PLUGIN_LOG_FILE = "/var/log/kairos/kcrypt-discovery-challenger.log"
ENV_LOG_FILE = "KCRYPT_DISCOVERY_LOG"
ENV_DEBUG = "KCRYPT_DISCOVERY_DEBUG"  # plugin mode has no flags: any non-empty value turns on debug logs
ENV_CONFIG_DIRS = "KCRYPT_CONFIG_DIRS"  # colon-separated, instead of /oem:/sysroot/oem:/run/cos/oem
ENV_CMDLINE = "KCRYPT_CMDLINE"  # instead of /proc/cmdline ("" = do not read one)

# Upstream's texts (kcrypt/discovery, kcrypt/discovery/client).
IDENTIFIER_ERROR = "at least one of --partition-name, --partition-uuid, or --partition-label must be provided"

log = logging.getLogger("kcrypt.discovery")


class CLIError(KcryptError):
    """A usage error, reported like cobra does (``Error: ...``, exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(message)


# -- logging ---------------------------------------------------------------


class _Formatter(logging.Formatter):
    LEVELS = {"DEBUG": "DBG", "INFO": "INF", "WARNING": "WRN", "ERROR": "ERR", "CRITICAL": "ERR"}

    def format(self, record):
        return "%s %s %s" % (
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            self.LEVELS.get(record.levelname, record.levelname),
            record.getMessage(),
        )


def _setup_logging(debug, stream=None, path=None):
    """Log to ``stream`` (CLI) or append to ``path`` (plugin mode); level error unless ``debug``."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.ERROR)
    handler = None
    if path:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            handler = None  # as upstream: no log file is not a reason to fail
    elif stream is not None:
        handler = logging.StreamHandler(stream)
    if handler is None:
        handler = logging.NullHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)


# -- configuration -----------------------------------------------------------


def _config_locations():
    dirs = os.environ.get(ENV_CONFIG_DIRS)
    cmdline = os.environ.get(ENV_CMDLINE)
    return (
        [d for d in dirs.split(":") if d] if dirs is not None else None,
        cmdline,
    )


def _warn_loudly(message):
    """At boot a broken config source is skipped: say so at error level, which the plugin log always keeps."""
    log.error("Kairos config: %s", message)


def load_settings(strict=True, at_boot=False):
    """The Kairos config. ``strict=False`` (root, info) falls back to defaults on a config error;
    ``at_boot`` (plugin mode) skips a broken file or config_url with a loud log line, as upstream carries on."""
    dirs, cmdline = _config_locations()
    try:
        return kairos_config.read_settings(dirs, cmdline, log=log.debug, at_boot=at_boot, warn=_warn_loudly)
    except kairos_config.ConfigError as error:
        if strict:
            raise
        log.error("ignoring the Kairos config: %s", error)
        return kairos_config.KcryptSettings()


# -- passphrase ----------------------------------------------------------------


def fetch_passphrase(settings, partition, attempts=builder.DEFAULT_ATTEMPTS, default_protocol="attestation"):
    """The passphrase for ``partition`` from the KMS in ``settings`` (bytes). Upstream's GetPassphrase."""
    config = builder.client_config(settings, attempts=attempts, default_protocol=default_protocol,
                                   cmdline_path=_config_locations()[1], log=log)
    return kms_client.get_passphrase(config, partition, log=log)


def offline_passphrase(settings):
    """Offline mode (legacy plugin without a server): the passphrase in TPM NV, created on first use."""
    with TPM(settings.tpm_device) as tpm:
        passphrase, created = blob.nv_passphrase(tpm, settings.nv_index, settings.c_index)
    log.debug("offline passphrase %s NV index 0x%x", "stored in" if created else "read from", settings.nv_index)
    return passphrase


def _write_secret(out, data):
    """Write bytes to stdout without a newline (binary when the stream has a buffer)."""
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode("utf-8", errors="replace"))


# -- commands ----------------------------------------------------------------------


def run_tpm_hash(args, out):
    tpm_device = args.tpm_device or load_settings(strict=False).tpm_device
    with TPM(tpm_device) as tpm:
        out.write(tpm.endorsement_key().tpm_hash)


def parse_info_pcrs(text):
    """``info --pcrs``: upstream's parsePCRList (comma-separated 0-23, de-duplicated and sorted) with its error texts."""
    if text == "":
        raise KcryptError("PCR list cannot be empty")
    pcrs = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        index = pcr_index(part)
        if index is None:
            if not is_decimal(part):
                raise KcryptError("invalid PCR index '%s'" % part)
            raise KcryptError("PCR index %d is out of range (0-23)" % int(part, 10))
        pcrs.add(index)
    if not pcrs:
        raise KcryptError("no valid PCR indices found")
    return sorted(pcrs)


def run_info(args, out):
    try:
        pcrs = parse_info_pcrs(args.pcrs)
    except KcryptError as error:
        raise KcryptError("parsing PCR list: %s" % error) from None
    log.debug("Displaying info for PCRs: %s", pcrs)
    tpm_device = args.tpm_device or load_settings(strict=False).tpm_device
    with TPM(tpm_device) as tpm:
        ek = tpm.endorsement_key()
        values = tpm.pcr_read(pcrs)
    lines = ["TPM Enrollment Information", "==========================", "", "TPM Hash:", "  %s" % ek.tpm_hash, ""]
    lines.append("PCR Values:")
    for index in pcrs:
        value = values.get(index)
        lines.append("  PCR %2d: %s" % (index, value.hex() if value is not None else "<not available>"))
    lines.extend(["", "EK Public Key (PEM):"])
    # Upstream prints the certificate when the TPM has one (the server stores the PUBLIC KEY form).
    out.write("\n".join(lines) + "\n" + (ek.certificate_pem or ek.public_pem) + "\n")


def run_get(args, out):
    if not (args.partition_name or args.partition_uuid or args.partition_label):
        raise CLIError(IDENTIFIER_ERROR)
    if args.attempts < 1:
        raise CLIError("--attempts must be at least 1")
    settings = builder.apply_overrides(load_settings(), {
        "challenger_server": args.challenger_server,
        "mdns": True if args.mdns else None,  # upstream: --mdns can only turn mDNS on
        "certificate": args.certificate,
        "tpm_device": args.tpm_device,
        "protocol": args.protocol,
        "mdns_interfaces": args.mdns_interfaces,
    }, log)
    partition = PartitionRef(label=args.partition_label, device_name=args.partition_name, uuid=args.partition_uuid)
    log.debug("Partition details:")
    log.debug("  Name: %s", partition.device_name)
    log.debug("  UUID: %s", partition.uuid)
    log.debug("  Label: %s", partition.label)
    log.debug("  Attempts: %d", args.attempts)
    try:
        passphrase = fetch_passphrase(settings, partition, args.attempts)
    except KcryptError as error:
        raise KcryptError("getting passphrase: %s" % error) from None
    _write_secret(out, passphrase)


# -- plugin mode (discovery.password) -----------------------------------------------------


def _reply(data="", error=""):
    return {"state": "", "data": data, "error": error, "log": ""}


def parse_payload(data):
    """(PartitionRef, server, mdns, generation) from the event's data, for both payload shapes.

    Newest (kairos-sdk bus.DiscoveryPasswordPayload): ``{"partition": {"name", "label"
    (filesystem label), "uuid", ...}, "challenger_server", "mdns"}``. Legacy (ghw
    block.Partition): ``{"name", "label" (GPT label), "filesystem_label", "uuid", ...}``;
    its ``filesystem_label`` is what upstream sent as the ``label`` header.
    """
    try:
        payload = json.loads(data)
    except ValueError as error:
        raise KcryptError("failed reading payload: %s" % error) from None
    if isinstance(payload, dict) and isinstance(payload.get("partition"), dict):
        part = payload["partition"]
        ref = PartitionRef(label=_text(part.get("label")), device_name=_text(part.get("name")), uuid=_text(part.get("uuid")))
        return ref, _text(payload.get("challenger_server")), payload.get("mdns") is True, "newest"
    legacy_keys = ("filesystem_label", "name", "label", "uuid", "mount_point", "size_bytes", "type", "read_only")
    if isinstance(payload, dict) and "partition" not in payload and any(key in payload for key in legacy_keys):
        ref = PartitionRef(
            label=_text(payload.get("filesystem_label")), device_name=_text(payload.get("name")), uuid=_text(payload.get("uuid"))
        )
        return ref, "", False, "legacy"
    raise KcryptError("partition is required in payload. Received payload data: %s" % data)


def _text(value):
    return value if isinstance(value, str) else ""


def handle_event(data):
    """The reply dict for one event's payload string (upstream's discovery.password handler)."""
    log.debug("Received payload: Data=%s", data)
    try:
        partition, server, mdns, generation = parse_payload(data)
    except KcryptError as error:
        return _reply(error=str(error))
    try:
        settings = load_settings(at_boot=True)  # plugin mode runs at boot: one broken file must not block unlock
    except KcryptError as error:
        return _reply(error="failed getting pass: %s" % error)
    if server:
        log.debug("Using ChallengerServer from payload: %s", server)
    settings = builder.apply_overrides(settings, {"challenger_server": server, "mdns": True if mdns else None})
    log.debug(
        "Final config: TPMDevice=%s, Server=%s, MDNS=%s, payload=%s",
        settings.tpm_device, settings.challenger_server, builder.go_bool(settings.mdns), generation,
    )
    try:
        if generation == "legacy" and not settings.challenger_server:
            passphrase = offline_passphrase(settings)  # the legacy plugin fell back to local NV
        else:
            default_protocol = "legacy" if generation == "legacy" else "attestation"
            passphrase = fetch_passphrase(settings, partition, builder.DEFAULT_ATTEMPTS, default_protocol)
    except KcryptError as error:
        log.error("failed getting pass: %s", error)
        return _reply(error="failed getting pass: %s" % error)
    try:
        text = passphrase.decode("utf-8")
    except UnicodeDecodeError:
        log.error("the passphrase is not UTF-8; it is passed on with replacement characters, as upstream does")
        text = passphrase.decode("utf-8", errors="replace")
    return _reply(data=text)


def read_event(raw):
    """(payload string, event name) from go-pluggable's event JSON; the payload may be in ``file``.

    Like go-pluggable's factory, an unreadable event is an error of the whole run (exit 1).
    """
    try:
        event = json.loads(raw)
        if not isinstance(event, dict):
            raise ValueError("the event is not a JSON object")
        for key in ("name", "data", "file"):
            if not isinstance(event.get(key) or "", str):
                raise ValueError("event field %r must be a string" % key)
    except ValueError as error:
        raise KcryptError("starting plugin: reading the event from stdin: %s" % error) from None
    data = event.get("data") or ""
    if event.get("file"):
        try:
            with open(event["file"], encoding="utf-8") as handle:
                data = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise KcryptError("starting plugin: reading the event data from %s: %s" % (event["file"], error)) from None
    return data, event.get("name") or ""


def run_plugin(stdin, out):
    """Read the event from ``stdin``, answer on ``out``; nothing else reaches ``out``."""
    data, name = read_event(stdin.read())
    if name not in ("", EVENT_DISCOVERY_PASSWORD):
        reply = _reply()  # go-pluggable answers unknown events with an empty response
    else:
        real_stdout, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the JSON reply
        try:
            reply = handle_event(data)
        finally:
            sys.stdout = real_stdout
    out.write(json.dumps(reply, separators=(",", ":")))
    out.flush()


# -- entry point ---------------------------------------------------------------------


def build_parser():
    parser = _Parser(
        prog=PROG,
        description="Print this node's TPM hash, or fetch a partition passphrase from a kcrypt challenger.",
        epilog=(
            "Configuration is read from Kairos config files (#cloud-config YAML) in /oem, /sysroot/oem and "
            "/run/cos/oem, from /proc/cmdline (kcrypt.challenger.challenger_server=..., kairos.config=..., "
            "kairos.config_url=...) and from the config_url they name. Environment: "
            "%s (TPM), %s (mDNS interfaces), %s/%s (config locations), %s/%s (plugin mode log file, debug)."
            % ("KCRYPT_TPM_DEVICE", "KCRYPT_MDNS_INTERFACES", ENV_CONFIG_DIRS, ENV_CMDLINE, ENV_LOG_FILE, ENV_DEBUG)
        ),
    )

    def common(sub, default):
        # Accepted before and after the subcommand, as cobra's persistent flags are; SUPPRESS keeps a
        # value given before the subcommand from being reset by the subcommand's default.
        sub.add_argument("--debug", action="store_true", default=default, help="enable debug logging")
        sub.add_argument(
            "--tpm-device", default="" if default is False else default,
            help="TPM device path or TCTI string (default: config, $KCRYPT_TPM_DEVICE, /dev/tpmrm0, /dev/tpm0)",
        )

    common(parser, False)
    subs = parser.add_subparsers(dest="command", parser_class=_Parser)

    get = subs.add_parser("get", help="get the passphrase for an encrypted partition from the KMS")
    common(get, argparse.SUPPRESS)
    get.add_argument("--partition-name", default="", help="name of the partition (at least one identifier required)")
    get.add_argument("--partition-uuid", default="", help="UUID of the partition (at least one identifier required)")
    get.add_argument(
        "--partition-label", default="", help="filesystem label of the partition (at least one identifier required)"
    )
    get.add_argument("--attempts", type=int, default=builder.DEFAULT_ATTEMPTS, help="number of attempts to get the passphrase")
    get.add_argument("--challenger-server", default="", help="URL of the challenger server (overrides config)")
    get.add_argument("--mdns", action="store_true", help="enable mDNS discovery (overrides config)")
    get.add_argument(
        "--certificate", default="", help="CA certificate for the server, as PEM text or a PEM file path (overrides config)"
    )
    get.add_argument(
        "--protocol", choices=kms_client.CLIENT_PROTOCOLS, default="",
        help="KMS protocol: attestation (newest Kairos, default) or legacy (/getPass, Kairos <= 3.x)",
    )
    get.add_argument(
        "--mdns-interfaces", default="",
        help="interfaces (names or IPv4 addresses, comma-separated, or 'all') for mDNS (default: config, "
        "$KCRYPT_MDNS_INTERFACES, else every interface, as upstream)",
    )
    get.set_defaults(run=run_get)

    info = subs.add_parser("info", help="display TPM enrollment information (hash, PCRs, EK)")
    common(info, argparse.SUPPRESS)
    info.add_argument("--pcrs", default=DEFAULT_PCRS, help="comma-separated PCR indices to display (default 0,7,11)")
    info.set_defaults(run=run_info)

    plugin = subs.add_parser(EVENT_DISCOVERY_PASSWORD, help="kcrypt plugin mode: JSON event on stdin, JSON reply on stdout")
    common(plugin, argparse.SUPPRESS)
    plugin.set_defaults(run=None)
    return parser


def main(argv=None, out=None, err=None, stdin=None):
    out = out or sys.stdout
    err = err or sys.stderr
    stdin = stdin or sys.stdin
    try:
        args = build_parser().parse_args(argv)
        if args.command == EVENT_DISCOVERY_PASSWORD:
            debug = args.debug or bool(os.environ.get(ENV_DEBUG))
            _setup_logging(debug, path=os.environ.get(ENV_LOG_FILE) or PLUGIN_LOG_FILE)
            log.debug("Debug mode enabled for plugin mode")
            run_plugin(stdin, out)
        else:
            _setup_logging(args.debug, stream=err)
            (args.run if args.command else run_tpm_hash)(args, out)
    except KcryptError as error:
        err.write("Error: %s\n" % error)
        return 1
    out.flush()
    return 0
