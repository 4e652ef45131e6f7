# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt``: the node CLI over the same code as the node modules.

Private to the collection: the API may change without notice.
Subcommands: ``encrypt``, ``unlock``, ``unlock-all``, ``close`` (kairos_luks_encrypt /
kairos_luks_unlock), ``checknv``, ``readnv``, ``cleanupnv`` (kairos_tpm_nv, named like
``kairos-agent kcrypt``). Flags carry the module option names (``--key-source``,
``--nv-index``, ``--challenger-server`` ...). Results go to stdout (``--json`` for
machines), errors to stderr as ``Error: <message>`` with exit code 1. Keys are never
printed, except a new recovery key and ``readnv``'s answer, which are what was asked for.
"""

from __future__ import annotations

import argparse
import json
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import encryption, key_source, luks, recovery, unlock
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import nv_area
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import DEFAULT_C_INDEX, DEFAULT_DEVICES, DEFAULT_NV_INDEX, ENV_TPM_DEVICE, parse_nv_index
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM_LAYOUTS
from ansible_collections.kairos.kcrypt.plugins.module_utils.node.encryption import Selector
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

PROG = "kcrypt"
TPM_DEVICE_HELP = "TPM device path or TCTI string (default: $%s, %s)" % (ENV_TPM_DEVICE, ", ".join(DEFAULT_DEVICES))
NV_INDEX_HELP = "NV index of the offline passphrase (default 0x%x)" % DEFAULT_NV_INDEX
C_INDEX_HELP = "persistent handle of the RSA key (default 0x%x)" % DEFAULT_C_INDEX


def _partition_spec(text):
    """``label=X``, ``device=/dev/x,label=Y``, ``uuid=U`` or ``name=M`` (comma-separated key=value)."""
    spec = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("label", "device", "uuid", "name"):
            raise argparse.ArgumentTypeError("%r: use key=value pairs with keys label, device, uuid, name" % text)
        spec[key] = value.strip()
    return spec


def _add_selection(parser, with_name=False):
    group = parser.add_argument_group("partitions (repeat to select several)")
    group.add_argument("--label", action="append", default=[], help="select by filesystem/LUKS label (COS_OEM, COS_PERSISTENT fall back to GPT names)")
    group.add_argument("--device", action="append", default=[], help="select by device path")
    group.add_argument("--uuid", action="append", default=[], help="select by filesystem/LUKS UUID or GPT partition UUID")
    keys = "device=/dev/vdb1,label=DATA" + (" or name=vdb1" if with_name else "")
    group.add_argument("--partition", action="append", default=[], type=_partition_spec, help="a partition given as key=value pairs, e.g. %s" % keys)


def _add_key_source(parser):
    group = parser.add_argument_group("key source (as the module options of the same names)")
    group.add_argument("--key-source", choices=key_source.KEY_SOURCES, default="tpm",
                       help="tpm (default), kms, passphrase, or auto: as the node's Kairos config says")
    group.add_argument("--passphrase-file", help="file holding the passphrase for --key-source passphrase ('-' = stdin), used whole")
    group.add_argument("--tpm-device", help=TPM_DEVICE_HELP)
    group.add_argument("--nv-index", help=NV_INDEX_HELP)
    group.add_argument("--c-index", help=C_INDEX_HELP)
    group.add_argument("--tpm-layout", choices=TPM_LAYOUTS,
                       help="how a missing c_index key and a new NV index are created: go-tpm (default, newest Kairos) "
                       "or tpmk (Kairos up to v0.11); both are always read")
    group.add_argument("--challenger-server", help="KMS URL for --key-source kms")
    group.add_argument("--certificate", help="CA certificate of the KMS: PEM text or a file")
    group.add_argument("--mdns", action="store_true", default=None, help="resolve the .local KMS host with mDNS")
    group.add_argument("--mdns-interface", dest="mdns_interfaces", action="append",
                       help="interface name or IPv4 address for mDNS (repeat; default $KCRYPT_MDNS_INTERFACES, then all)")
    group.add_argument("--kms-protocol", choices=("attestation", "legacy"), help="default attestation")
    group.add_argument("--kms-attempts", type=int, default=30)
    group.add_argument("--kms-retry-delay", type=float, default=1.0)
    group.add_argument("--config-dir", dest="config_dirs", action="append",
                       help="for --key-source auto: a Kairos config directory (repeat; default /oem, /sysroot/oem, /run/cos/oem)")
    group.add_argument("--cmdline", dest="cmdline_path", help="for --key-source auto: kernel command line file (default /proc/cmdline)")


def _add_tpm(group, c_index=True):
    group.add_argument("--tpm-device", help=TPM_DEVICE_HELP)
    group.add_argument("--nv-index", help=NV_INDEX_HELP)
    if c_index:
        group.add_argument("--c-index", help=C_INDEX_HELP)


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Encrypt and unlock this node's data partitions (Kairos-compatible).")
    parser.add_argument("--debug", action="store_true", help="log progress to stderr")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encrypt = commands.add_parser("encrypt", help="encrypt partitions (mode format or in_place)")
    _add_selection(encrypt)
    encrypt.add_argument("--mode", choices=encryption.MODES, required=True)
    encrypt.add_argument("--wipe", action="store_true", help="allow format to destroy a partition that is not empty")
    encrypt.add_argument("--type", default="luks2", choices=("luks2",))
    encrypt.add_argument("--cipher")
    encrypt.add_argument("--hash")
    encrypt.add_argument("--keysize", type=int)
    encrypt.add_argument("--sector-size", type=int)
    encrypt.add_argument("--pbkdf-algorithm", choices=luks.PBKDF_ALGORITHMS)
    encrypt.add_argument("--pbkdf-iteration-time", type=float, help="seconds")
    encrypt.add_argument("--pbkdf-iteration-count", type=int)
    encrypt.add_argument("--pbkdf-memory", type=int, help="KiB")
    encrypt.add_argument("--pbkdf-parallel", type=int)
    encrypt.add_argument("--recovery-key", action="store_true", help="add a recovery key")
    encrypt.add_argument("--recovery-escrow", choices=recovery.ESCROWS, default=recovery.ESCROW_CONTROLLER,
                         help="controller (default): print the new recovery key once; kms: escrow it in the KMS "
                              "of --challenger-server (a kairos.kcrypt challenger), never print it")
    encrypt.add_argument("--check", action="store_true", help="show what would change, change nothing")
    _add_key_source(encrypt)

    for name, text in (("unlock", "open the given partitions"), ("unlock-all", "open every LUKS partition (Kairos unlock-all)")):
        command = commands.add_parser(name, help=text)
        if name == "unlock":
            _add_selection(command, with_name=True)
        command.add_argument("--keyslot", type=int)
        command.add_argument("--attempts", type=int, default=unlock.DEFAULT_ATTEMPTS)
        command.add_argument("--retry-delay", type=float, default=1.0)
        command.add_argument("--check", action="store_true", help="test the key, open nothing")
        _add_key_source(command)

    close = commands.add_parser("close", help="close the mappings of the given partitions")
    _add_selection(close, with_name=True)
    close.add_argument("--name", action="append", default=[], help="close the mapping with this name")
    close.add_argument("--check", action="store_true")

    checknv = commands.add_parser("checknv", help="does the offline NV index hold a blob?")
    _add_tpm(checknv, c_index=False)
    readnv = commands.add_parser("readnv", help="print the offline passphrase decrypted by the TPM")
    _add_tpm(readnv)
    cleanupnv = commands.add_parser("cleanupnv", help="remove the offline NV index (destroys the passphrase)")
    _add_tpm(cleanupnv, c_index=False)
    cleanupnv.add_argument("--i-know-what-i-am-doing", dest="confirmed", action="store_true", help="do not ask for confirmation")
    return parser


def _selectors(args):
    specs = [{"label": v} for v in args.label] + [{"device": v} for v in args.device] + [{"uuid": v} for v in args.uuid]
    specs += args.partition
    if not specs and not getattr(args, "name", None):
        raise KcryptError("select at least one partition (--label, --device, --uuid or --partition)")
    return specs


def _selector(spec):
    if not (spec.get("label") or spec.get("device") or spec.get("uuid")):
        return None
    return Selector(label=spec.get("label", ""), device=spec.get("device", ""), uuid=spec.get("uuid", "")).validate()


def _key_params(args):
    return {name: getattr(args, name) for name in (
        "key_source", "tpm_device", "nv_index", "c_index", "tpm_layout", "challenger_server", "certificate", "mdns", "mdns_interfaces",
        "kms_protocol", "kms_attempts", "kms_retry_delay")}


def _key_source(args, stdin, err=None):
    params = _key_params(args)
    if args.key_source == "passphrase":
        if not args.passphrase_file:
            raise KcryptError("--key-source passphrase needs --passphrase-file (a file, or - for stdin)")
        params["passphrase"] = key_source.read_passphrase_file(args.passphrase_file, stdin)
    elif args.passphrase_file:
        raise KcryptError("--passphrase-file is only used with --key-source passphrase")
    # unlock-all is what Kairos runs at boot: a broken config file is reported and skipped, as upstream
    at_boot = args.command == "unlock-all"

    def warn(message):
        if err is not None:
            err.write("kcrypt: warning: Kairos config: %s\n" % message)
            err.flush()

    return key_source.build(params, config_dirs=args.config_dirs, cmdline_path=args.cmdline_path, at_boot=at_boot, warn=warn)


def _luks_options(args):
    pbkdf = {"algorithm": args.pbkdf_algorithm, "iteration_time": args.pbkdf_iteration_time,
             "iteration_count": args.pbkdf_iteration_count, "memory": args.pbkdf_memory, "parallel": args.pbkdf_parallel}
    return luks.LuksOptions.from_options(type=args.type, cipher=args.cipher, keysize=args.keysize, hash=args.hash,
                                         sector_size=args.sector_size, pbkdf=pbkdf)


def cmd_encrypt(args, log, stdin):
    request = encryption.EncryptRequest(
        partitions=tuple(_selector(s) or Selector() for s in _selectors(args)),
        mode=args.mode,
        wipe=args.wipe,
        options=_luks_options(args),
        recovery_key=args.recovery_key,
        recovery_escrow=recovery.build_escrow(args.recovery_escrow, _key_params(args), args.config_dirs, args.cmdline_path),
    )
    source = _key_source(args, stdin)
    plans = encryption.plan(request, source)
    for item in plans:
        for note in item.notes:
            log("%s: %s" % (item.device.path, note))
    if args.check:
        return [encryption.result(item, source) for item in plans]
    return encryption.apply(plans, request, source, log=log)


def cmd_unlock(args, log, stdin, err=None):
    if args.attempts < 1:
        raise KcryptError("--attempts must be at least 1")
    targets = None
    if args.command == "unlock":
        targets = [unlock.Target(selector=_selector(s), name=s.get("name", "")) for s in _selectors(args)]
    source = _key_source(args, stdin, err)
    plans = unlock.plan_open(targets)
    if args.check:
        unlock.verify_keys(plans, source)
        return [p.as_result(predicted=True) for p in plans]
    return unlock.apply_open(plans, source, keyslot=args.keyslot, attempts=args.attempts, retry_delay=args.retry_delay, log=log)


def cmd_close(args, log):
    targets = [unlock.Target(selector=_selector(s), name=s.get("name", "")) for s in _selectors(args)]
    targets += [unlock.Target(name=name) for name in args.name]
    plans = unlock.plan_close(targets)
    if args.check:
        return [p.as_result(predicted=True) for p in plans]
    return unlock.apply_close(plans, log=log)


def cmd_cleanupnv(args, stdin, err):
    confirmed = args.confirmed
    if not confirmed and stdin.isatty():
        err.write("This removes NV index 0x%x and the offline passphrase in it. Type yes to continue: " % parse_nv_index(args.nv_index))
        err.flush()
        confirmed = stdin.readline().strip() == "yes"
    if not confirmed:
        raise KcryptError("not confirmed: pass --i-know-what-i-am-doing (or answer yes) to remove the NV index")
    return nv_area.cleanup(args.tpm_device, args.nv_index, confirmed=True)


def _print_partitions(report, out):
    for entry in report["partitions"]:
        what = entry.get("action", "")
        where = entry.get("device") or entry.get("mapper")
        line = "%s: %s%s" % (where, what, "" if entry.get("changed") else " (no change)")
        if entry.get("label"):
            line += " label=%s" % entry["label"]
        if entry.get("luks_uuid"):
            line += " luks_uuid=%s" % entry["luks_uuid"]
        if entry.get("mapper") and entry.get("action") in ("open", "none"):
            line += " mapper=%s" % entry["mapper"]
        if entry.get("reason"):
            line += " (%s)" % entry["reason"]
        out.write(line + "\n")
        if entry.get("recovery_key"):
            out.write("%s: recovery key (shown once, store it now): %s\n" % (where, entry["recovery_key"]))


def main(argv=None, out=None, err=None, stdin=None):
    out = out or sys.stdout
    err = err or sys.stderr
    stdin = stdin or sys.stdin
    args = build_parser().parse_args(argv)

    def log(message):
        if args.debug:
            err.write("kcrypt: %s\n" % message)

    try:
        if args.command == "encrypt":
            results = cmd_encrypt(args, log, getattr(stdin, "buffer", stdin))
            return _emit(args, {"changed": any(r["changed"] for r in results), "partitions": results}, out, _print_partitions)
        if args.command in ("unlock", "unlock-all"):
            results = cmd_unlock(args, log, getattr(stdin, "buffer", stdin), err)
            return _emit(args, {"changed": any(r["changed"] for r in results), "partitions": results}, out, _print_partitions)
        if args.command == "close":
            results = cmd_close(args, log)
            return _emit(args, {"changed": any(r["changed"] for r in results), "partitions": results}, out, _print_partitions)
        if args.command == "checknv":
            status = nv_area.check(args.tpm_device, args.nv_index)
            return _emit(args, status, out, lambda s, o: o.write(
                "NV index %s holds %d bytes\n" % (s["nv_index"], s["size"]) if s["exists"] else "NV index %s is empty or does not exist\n" % s["nv_index"]))
        if args.command == "readnv":
            status, passphrase = nv_area.read(args.tpm_device, args.nv_index, args.c_index)
            if not status["exists"]:
                raise KcryptError("NV index %s is empty or does not exist" % status["nv_index"])
            if passphrase is None:
                raise KcryptError(status["error"])
            if args.json:
                status["passphrase"] = passphrase.decode("utf-8", "replace")
                return _emit(args, status, out, None)
            out.write(passphrase.decode("utf-8", "replace") + "\n")
            return 0
        if args.command == "cleanupnv":
            status = cmd_cleanupnv(args, stdin, err)
            return _emit(args, status, out, lambda s, o: o.write(
                "NV index %s removed\n" % s["nv_index"] if s["removed"] else "NV index %s appears to be empty or does not exist\n" % s["nv_index"]))
    except KcryptError as error:
        err.write("Error: %s\n" % error)
        return 1
    return 0


def _emit(args, data, out, human):
    if args.json or human is None:
        out.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        human(data, out)
    out.flush()
    return 0
