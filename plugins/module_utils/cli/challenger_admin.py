# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Admin subcommands of ``kcrypt-challenger`` over the store (either backend).

Private to the collection. ``cli/challenger.py`` mounts them with
``add_subcommands(subparsers, common)``.

    kcrypt-challenger list [-o table|yaml|json]
    kcrypt-challenger show NAME|TPM_HASH [-o yaml|json]
    kcrypt-challenger add --tpm-hash H [--name N] --partition label=COS_PERSISTENT[,name=vda5,uuid=U,secret=S,path=K] ...
                          [--passphrase-file FILE|-] [--update-passphrase] [--quarantined]
    kcrypt-challenger export [-o FILE] [--include-secrets]
    kcrypt-challenger import FILE|- [--replace]
    kcrypt-challenger quarantine|unquarantine NAME|TPM_HASH
    kcrypt-challenger delete NAME|TPM_HASH [--purge-secrets]
    kcrypt-challenger reindex
    kcrypt-challenger pcr-window open TPM_HASH --pcr 7 [--pcr 0] --until 2h|TIME [--to 7=HEX] [--dry-run]
    kcrypt-challenger pcr-window close TPM_HASH [--pcr 7 ...] [--dry-run]     (no --pcr: every window)
    kcrypt-challenger pcr-window status TPM_HASH
    kcrypt-challenger check
    kcrypt-challenger recovery show NAME|TPM_HASH [--partition LABEL] [--reason TEXT] [-o text|json]
    kcrypt-challenger recovery audit [-o text|json]

``check`` reports Secrets that are not exactly one partition's (kms/secret_ownership.py);
``add`` and ``import`` refuse to create such sharing.

A static passphrase is read from a file or stdin (``-``; prompted twice on a terminal),
never from the command line. Nothing secret is printed unless ``export --include-secrets``
is asked for, and then only into the export, or ``recovery show`` reveals escrowed recovery keys,
each read recorded in the store's audit trail first (kms/recovery.py).
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
import tempfile

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.identity import is_tpm_hash
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import registration as reg
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import secret_ownership as ownership
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import clean_kube_name, secret_ref
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.settings import store_url
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store


def add_subcommands(subparsers, common=None):
    """Add the admin subcommands to an argparse subparsers object; ``common`` is a parent parser (``--store``)."""
    parents = [common] if common is not None else []

    def command(name, func, help_text):
        parser = subparsers.add_parser(name, parents=parents, help=help_text, description=help_text)
        parser.set_defaults(func=func)
        return parser

    parser = command("list", cmd_list, "list the registered SealedVolumes")
    parser.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")

    parser = command("show", cmd_show, "show one SealedVolume (by name or TPM hash)")
    parser.add_argument("target", metavar="NAME|TPM_HASH")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")

    parser = command("add", cmd_add, "register a TPM (or add partitions to its registration)")
    parser.add_argument("--tpm-hash", required=True, help="the node's TPM hash (kcrypt-discovery-challenger prints it)")
    parser.add_argument("--name", help="SealedVolume name (default: the TPM's existing one, else tpm-<hash[:16]>)")
    parser.add_argument("--partition", action="append", required=True, metavar="SPEC",
                        help="label=L[,name=DEV][,uuid=U][,secret=NAME][,path=KEY] (repeatable; a bare word is a label)")
    parser.add_argument("--passphrase-file", metavar="FILE|-",
                        help="static passphrase for the partitions given here, from FILE or stdin (-); no trailing newline")
    parser.add_argument("--update-passphrase", action="store_true",
                        help="replace an existing Secret's passphrase (default: an existing Secret is kept)")
    parser.add_argument("--quarantined", action="store_true", help="register the TPM as quarantined")

    parser = command("export", cmd_export, "write the registrations as Kubernetes YAML")
    parser.add_argument("-o", "--output", metavar="FILE", default="-", help="file to write (default stdout); created 0600")
    parser.add_argument("--include-secrets", action="store_true",
                        help="also export the referenced Secrets (passphrases, base64): keep the file safe")

    parser = command("import", cmd_import, "read SealedVolumes and Secrets from Kubernetes YAML (upstream shape)")
    parser.add_argument("file", metavar="FILE|-")
    parser.add_argument("--replace", action="store_true",
                        help="replace SealedVolumes that exist (Secrets are never overwritten)")

    parser = command("quarantine", cmd_quarantine, "refuse every passphrase to a TPM")
    parser.add_argument("target", metavar="NAME|TPM_HASH")
    parser = command("unquarantine", cmd_unquarantine, "serve a quarantined TPM again")
    parser.add_argument("target", metavar="NAME|TPM_HASH")

    parser = command("pcr-window", cmd_pcr_window, "open, close or show PCR upgrade windows (JSON on stdout)")
    parser.add_argument("action", choices=("open", "close", "status"))
    parser.add_argument("tpm_hash", metavar="TPM_HASH")
    parser.add_argument("--pcr", action="append", default=[], help="PCR index (repeatable); close without --pcr closes all")
    parser.add_argument("--until", help="open: when the window closes, a time (2026-12-06T18:00:00Z) or a duration (2h, 90m)")
    parser.add_argument("--to", action="append", default=[], metavar="PCR=HEX",
                        help="open: the only new value the PCR's window accepts (from an upgraded reference node)")
    parser.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")

    parser = command("delete", cmd_delete, "remove a registration (its Secrets are kept unless --purge-secrets)")
    parser.add_argument("target", metavar="NAME|TPM_HASH")
    parser.add_argument("--purge-secrets", action="store_true",
                        help="also delete the Secrets its partitions use: the passphrases are gone for good")

    command("reindex", cmd_reindex, "index every SealedVolume by its TPM hash (Kubernetes: label volumes that "
                                    "other tools wrote, or whose TPMHash was edited by hand)")
    command("check", cmd_check, "report Secrets that are not exactly one partition's (shared or ambiguous names); "
                                "exit 1 if there is any")

    parser = subparsers.add_parser("recovery", help="recovery keys escrowed by nodes (reading one is audited)",
                                   description="recovery keys escrowed by nodes (reading one is audited)")
    recovery_commands = parser.add_subparsers(dest="recovery_command", metavar="{show,audit}")
    recovery_commands.required = True
    parser = recovery_commands.add_parser("show", parents=parents, help="print the escrowed recovery keys of a node",
                                          description="print the escrowed recovery keys of a node; each read is "
                                                      "recorded in the audit trail first (who, when, which)")
    parser.set_defaults(func=cmd_recovery_show)
    parser.add_argument("target", metavar="NAME|TPM_HASH")
    parser.add_argument("--partition", metavar="LABEL", help="only this partition (label, device name or UUID)")
    parser.add_argument("--reason", default="", help="why (a ticket, a sentence), recorded with the read")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser = recovery_commands.add_parser("audit", parents=parents, help="list the recorded reads of recovery keys")
    parser.set_defaults(func=cmd_recovery_audit)
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return subparsers


# ---------------------------------------------------------------------------


def _open(args, create=False):
    """The store; only ``add`` and ``import`` may create a missing SQLite store (a typo must not look empty)."""
    return open_store(store_url(args), create=create)


def _out(args):
    return getattr(args, "stdout", None) or sys.stdout


def _err(args):
    return getattr(args, "stderr", None) or sys.stderr


def _in(args):
    return getattr(args, "stdin", None) or sys.stdin


def _resolve(store, target):
    """A volume by name, or the first one of a TPM hash; KcryptError if none."""
    if is_tpm_hash(target.lower()):
        volume = store.find_volume(target.lower())
        if volume is None:
            raise KcryptError("no SealedVolume for TPM %s" % target)
        return volume
    volume = store.get_volume(target)
    if volume is None:
        raise KcryptError("no SealedVolume named %s" % target)
    return volume


def _print_docs(args, docs, output, single=False):
    out = _out(args)
    if output == "json":
        views = [reg.public_view(d) for d in docs]
        out.write(json.dumps(views[0] if single else views, indent=2, sort_keys=True) + "\n")
    elif docs:
        out.write(st.dump_yaml(docs))


def cmd_list(args):
    with _open(args) as store:
        volumes = store.list_volumes()
    if args.output != "table":
        _print_docs(args, volumes, args.output)
        return 0
    rows = [("NAME", "TPM HASH", "PARTITIONS", "QUARANTINED", "ENROLLED")]
    for volume in volumes:
        spec = volume["spec"]
        partitions = ",".join(p.get("label") or p.get("deviceName") or p.get("uuid") or "?" for p in spec.get("partitions") or [])
        rows.append((st.volume_name(volume), spec.get("TPMHash", ""), partitions or "-",
                     "yes" if spec.get("quarantined") else "no", (spec.get("attestation") or {}).get("enrolledAt", "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out(args).write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    return 0


def cmd_show(args):
    with _open(args) as store:
        _print_docs(args, [_resolve(store, args.target)], args.output, single=True)
    return 0


def read_passphrase(source, stdin=None, stderr=None):
    """The passphrase bytes from FILE or '-' (stdin; prompted twice on a terminal). Never from argv."""
    stdin = stdin or sys.stdin
    if source == "-":
        if hasattr(stdin, "isatty") and stdin.isatty():
            first = getpass.getpass("Passphrase: ", stream=stderr)
            if first != getpass.getpass("Passphrase (again): ", stream=stderr):
                raise KcryptError("the passphrases do not match")
            return first.encode("utf-8")
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
        return data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise KcryptError("cannot read the passphrase file %s: %s" % (source, exc.strerror))


def cmd_add(args):
    passphrase = read_passphrase(args.passphrase_file, _in(args), _err(args)) if args.passphrase_file else None
    wishes = [reg.parse_partition_spec(spec) for spec in args.partition]
    for wish in wishes:
        wish.passphrase = passphrase
    with _open(args, create=True) as store:
        plan, stored = reg.plan_and_apply(store, lambda: reg.plan_registration(
            store, args.tpm_hash, wishes, name=args.name, quarantined=True if args.quarantined else None,
            update_passphrase=reg.UPDATE_ALWAYS if args.update_passphrase else reg.UPDATE_ON_CREATE,
            merge_partitions=True))
        stored = stored or store.get_volume(st.volume_name(plan.after))
    out = _out(args)
    out.write("%s SealedVolume %s for TPM %s\n" % ("created" if plan.before is None else ("updated" if plan.changed else "unchanged"),
                                                   st.volume_name(stored), stored["spec"]["TPMHash"]))
    for action in plan.secrets:
        out.write("Secret %s (key %s): %s\n" % (action.name, action.path, action.action))
    return 0


def _referenced_secrets(store, volumes):
    secrets, seen = [], set()
    for volume in volumes:
        for partition in volume["spec"].get("partitions") or []:
            for namer in (None, clean_kube_name):  # the server's name, then the legacy one
                name = secret_ref(st.volume_name(volume), partition)[0] if namer is None else \
                    secret_ref(st.volume_name(volume), partition, namer=namer)[0]
                if name in seen:
                    break
                secret = store.get_secret(name)
                if secret is not None:
                    seen.add(name)
                    secrets.append(secret)
                    break
    return secrets


def cmd_export(args):
    with _open(args) as store:
        volumes = store.list_volumes()
        docs = volumes + (_referenced_secrets(store, volumes) if args.include_secrets else [])
    text = st.dump_yaml(docs) if docs else ""
    if args.output == "-":
        _out(args).write(text)
    else:
        write_private_file(args.output, text)
    return 0


def write_private_file(path, text):
    """Write ``text`` to ``path`` as a new file of mode 0600, replacing what was there atomically.

    Never through an existing file: opening it would keep its mode (a 0644 file would hold the
    passphrases readable for everyone) and its other hard links. A symlink or anything that is not a
    regular file is refused, so the output cannot be redirected somewhere else.
    """
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise KcryptError("cannot write %s: %s" % (path, exc.strerror)) from None
    if current is not None and not stat.S_ISREG(current.st_mode):
        raise KcryptError("refusing to write the export to %s: it is not a regular file (a symlink, device or "
                          "directory); give a new file name, or - for stdout" % path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)  # created 0600
    except OSError as exc:
        raise KcryptError("cannot write %s: %s" % (path, exc.strerror)) from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise KcryptError("cannot write %s: %s" % (path, exc.strerror)) from None


def cmd_import(args):
    if args.file == "-":
        text = _in(args).read()
    else:
        try:
            with open(args.file) as handle:
                text = handle.read()
        except OSError as exc:
            raise KcryptError("cannot read %s: %s" % (args.file, exc.strerror))
    out, failed = _out(args), 0
    with _open(args, create=True) as store:
        volumes, secrets = st.load_yaml(text, namespace=store.namespace)
        refused = _ambiguous_imports(store, volumes, secrets)
        if refused:  # checked before anything is written
            for name, reason in sorted(refused.items()):
                _err(args).write("Error: SealedVolume %s: %s\n" % (name, reason))
            raise KcryptError("nothing imported: a Secret must belong to exactly one partition of one SealedVolume; "
                              "give the partitions above their own secret.name")
        for secret in secrets:
            name = secret["metadata"]["name"]
            for key, value in secret["data"].items():
                if value.endswith(b"\n"):
                    _err(args).write("Warning: Secret %s key %s ends with a newline; a passphrase typed or piped into "
                                     "cryptsetup stops before it\n" % (name, key))
            try:
                store.create_secret(secret)
                out.write("Secret %s: created\n" % name)
            except st.AlreadyExists:
                out.write("Secret %s: exists, kept\n" % name)
        for volume in volumes:
            name = st.volume_name(volume)
            tpm_hash = volume["spec"].get("TPMHash", "")
            owners = [st.volume_name(v) for v in store.volumes_for(tpm_hash) if st.volume_name(v) != name] if tpm_hash else []
            if owners:
                _err(args).write("Error: SealedVolume %s: TPM %s is already registered as %s; not imported\n" % (name, tpm_hash, owners[0]))
                failed += 1
                continue
            try:
                store.create_volume(volume)
                out.write("SealedVolume %s: created\n" % name)
            except st.AlreadyExists:
                if not args.replace:
                    out.write("SealedVolume %s: exists, kept (use --replace)\n" % name)
                    continue
                current = store.get_volume(name)
                volume["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                store.update_volume(volume)
                out.write("SealedVolume %s: replaced\n" % name)
    return 1 if failed else 0


def _ambiguous_imports(store, volumes, secrets):
    """{imported volume name: why} for imported volumes whose partitions would share a Secret with another
    partition (of the store or of the import), or use a derived name labelled for someone else."""
    imported = {st.volume_name(v) for v in volumes}
    everything = [v for v in store.list_volumes() if st.volume_name(v) not in imported] + list(volumes)
    incoming = {s["metadata"]["name"]: s for s in secrets}

    def get_secret(name):
        return incoming.get(name) or store.get_secret(name)

    refused = {}
    for involved, text in ownership.problems(everything, get_secret):
        for name in involved:
            if name in imported:
                refused.setdefault(name, text)
    return refused


def cmd_check(args):
    with _open(args) as store:
        found = ownership.problems(store.list_volumes(), store.get_secret)
    out = _out(args)
    for _volumes, text in found:
        out.write("%s\n" % text)
    if found:
        _err(args).write("Error: %d Secret(s) are not exactly one partition's; give each partition its own secret.name "
                         "(kcrypt-challenger import --replace, kubectl edit, or kairos.kcrypt.kairos_sealedvolume)\n" % len(found))
        return 1
    out.write("every Secret reference belongs to exactly one partition\n")
    return 0


def _set_quarantine(args, value):
    with _open(args) as store:
        for _attempt in range(5):
            volume = _resolve(store, args.target)
            if bool(volume["spec"].get("quarantined")) == value:
                break
            if value:
                volume["spec"]["quarantined"] = True
            else:
                volume["spec"].pop("quarantined", None)
            try:
                store.update_volume(volume)
                break
            except st.Conflict:
                continue
        else:
            raise KcryptError("SealedVolume %s kept changing; try again" % st.volume_name(volume))
    _out(args).write("SealedVolume %s: %s\n" % (st.volume_name(volume), "quarantined" if value else "not quarantined"))
    return 0


def cmd_quarantine(args):
    return _set_quarantine(args, True)


def cmd_unquarantine(args):
    return _set_quarantine(args, False)


def cmd_delete(args):
    with _open(args) as store:
        volume = _resolve(store, args.target)
        secrets = _referenced_secrets(store, [volume]) if args.purge_secrets else []
        store.delete_volume(st.volume_name(volume))
        _out(args).write("SealedVolume %s: deleted\n" % st.volume_name(volume))
        for secret in secrets:
            store.delete_secret(secret["metadata"]["name"])
            _out(args).write("Secret %s: deleted\n" % secret["metadata"]["name"])
    return 0


def cmd_reindex(args):
    """Write back every volume the store's lookup index misses (the embedded store has none to fix)."""
    fixed = 0
    with _open(args) as store:
        for volume in store.list_volumes():
            if not store.needs_index(volume):
                continue
            try:
                store.update_volume(volume)
            except st.Conflict:
                _out(args).write("SealedVolume %s changed meanwhile: run reindex again\n" % st.volume_name(volume))
                continue
            fixed += 1
            _out(args).write("SealedVolume %s: indexed\n" % st.volume_name(volume))
    _out(args).write("%d SealedVolume(s) indexed\n" % fixed)
    return 0


def cmd_recovery_show(args):
    with _open(args) as store:
        found = recovery.reveal(store, args.target, recovery.local_actor("kcrypt-challenger recovery show"),
                                partition=args.partition, reason=args.reason)
    out = _out(args)
    if args.output == "json":
        views = [dict(item, recovery_key=item["recovery_key"].decode("utf-8", "replace") if item["recovery_key"] else None)
                 for item in found]
        out.write(json.dumps(views, indent=2, sort_keys=True) + "\n")
    else:
        for item in found:
            if item["escrowed"]:
                out.write("SealedVolume %s partition %s (escrowed %s): %s\n" % (
                    item["sealedvolume"], item["partition"], item["escrowed_at"] or "-",
                    item["recovery_key"].decode("utf-8", "replace")))
            else:
                _err(args).write("SealedVolume %s partition %s: no recovery key escrowed\n" % (item["sealedvolume"], item["partition"]))
    return 0 if any(item["escrowed"] for item in found) else 1


def cmd_recovery_audit(args):
    with _open(args) as store:
        events = store.audit_events()
    out = _out(args)
    if args.output == "json":
        out.write(json.dumps(events, indent=2, sort_keys=True) + "\n")
        return 0
    for event in events:
        out.write("%s %s SealedVolume %s partition %s (Secret %s) by %s%s\n" % (
            event["time"], event["action"], event["sealedvolume"], event["partition"], event["secret"], event["actor"],
            (": " + event["reason"]) if event.get("reason") else ""))
    return 0


def cmd_pcr_window(args):
    """One JSON object: the TPM's volume, its PCR values and windows (registration.pcr_window_report), what changed."""
    relearn_to = {}
    for item in args.to:
        index, sep, value = item.partition("=")
        if not sep:
            raise KcryptError("--to takes PCR=HEX, not %r" % item)
        relearn_to[index] = value
    with _open(args) as store:
        skipped = {}
        if args.action == "status":
            volume = store.find_volume(reg.validate_tpm_hash(args.tpm_hash))
            if volume is None:
                raise KcryptError("TPM %s is not registered" % args.tpm_hash)
            changed = False
        else:
            if args.action == "open":
                plan, skipped = reg.plan_pcr_window(store, args.tpm_hash, args.pcr, args.until, relearn_to)
            else:
                if args.until or args.to:
                    raise KcryptError("close takes only --pcr")
                plan, skipped = reg.plan_pcr_window(store, args.tpm_hash, close_pcrs=args.pcr or "all")
            changed = plan.changed
            volume = plan.after
            if changed and not args.dry_run:
                volume = reg.apply_plan(store, plan)
    pcr_values = ((volume["spec"].get("attestation") or {}).get("pcrValues") or {})
    _out(args).write(json.dumps({
        "volume": st.volume_name(volume), "tpm_hash": volume["spec"]["TPMHash"], "changed": changed,
        "pcrs": pcr_values.get("pcrs") or {}, "windows": reg.pcr_window_report(volume), "skipped": skipped,
    }, indent=2, sort_keys=True) + "\n")
    return 0
