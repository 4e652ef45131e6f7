# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node's kcrypt settings, read like Kairos does (spec §5.1-5.2, checklist 36-39).

Private to the collection. Sources, later ones winning (kairos-sdk collector):

1. YAML files under ``/oem``, ``/sysroot/oem``, ``/run/cos/oem`` (in that order, each
   walked in lexical order): only ``*.yaml``/``*.yml`` files of at most 1 MiB whose first
   10 lines contain a ``#cloud-config`` (or legacy ``#kairos-config``/``#node-config``)
   line; other files are skipped, as upstream does.
2. ``/proc/cmdline``: ``a.b.c=value`` tokens become nested keys, a bare token is ``true``,
   ``true``/``false`` become booleans (``kcrypt.challenger.challenger_server=http://...``).

Maps are merged deeply, scalars replaced. Unlike upstream, a file with a header whose
YAML does not parse (or is not a mapping) is an error naming the file: silently ignoring
it could turn a remote-KMS node into an offline one.

Keys (``kcrypt.challenger.*``): ``challenger_server``, ``mdns``, ``certificate`` (PEM text),
and our extensions ``mdns_interfaces`` and ``protocol``. ``nv_index``, ``c_index`` and
``tpm_device`` are read from top-level ``kcrypt.*`` (newest SDK) and from
``kcrypt.challenger.*`` (legacy client, agent cmdline injection); the top-level value wins.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.client.kms_client import CLIENT_PROTOCOLS
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import DEFAULT_C_INDEX, DEFAULT_NV_INDEX, parse_nv_index, parse_persistent_handle

yaml = optional_import("yaml")

DEFAULT_CONFIG_DIRS = ("/oem", "/sysroot/oem", "/run/cos/oem")
DEFAULT_CMDLINE = "/proc/cmdline"
VALID_HEADERS = ("#cloud-config", "#kairos-config", "#node-config")
HEADER_LINES = 10
MAX_FILE_SIZE = 1024 * 1024


class ConfigError(KcryptError):
    """A Kairos config file or kernel command line setting is unusable."""


@dataclass(frozen=True)
class KcryptSettings:
    """What the node client needs from the Kairos config."""

    challenger_server: str = ""
    mdns: bool = False
    certificate: str = ""  # PEM text of an extra CA, added to the system trust store
    nv_index: int = DEFAULT_NV_INDEX
    c_index: int = DEFAULT_C_INDEX
    tpm_device: str = ""  # empty: $KCRYPT_TPM_DEVICE, /dev/tpmrm0, /dev/tpm0
    mdns_interfaces: tuple = ()  # empty: $KCRYPT_MDNS_INTERFACES, then 127.0.0.1 (see mdns.py)
    protocol: str = ""  # empty: the caller's default ("attestation", or the plugin payload's generation)
    sources: tuple = field(default=(), compare=False)  # files (and "cmdline") that were merged

    @property
    def remote(self):
        """Upstream's encryptor choice: remote KMS iff a server is set or mDNS is on (checklist 39)."""
        return bool(self.challenger_server) or self.mdns

    def with_overrides(self, **changes):
        """A copy with the given non-None fields replaced."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


def has_valid_header(text):
    """Upstream's HasValidHeader: a header line among the first 10 lines (trailing space ignored).

    (Upstream's SplitN leaves line 10 glued to the rest of the file, so there a header on
    line 10 only counts in a 10-line file; we simply look at 10 lines.)
    """
    for line in text.split("\n", HEADER_LINES)[:HEADER_LINES]:
        line = line.rstrip()
        if line.startswith("#") and line in VALID_HEADERS:
            return True
    return False


def config_files(dirs, log=None):
    """Candidate files in upstream's order: each directory in turn, walked lexically."""
    log = log or (lambda message: None)
    found = []
    for directory in dirs:
        for root, subdirs, files in os.walk(directory):
            subdirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if not name.endswith((".yaml", ".yml")):
                    log("skipping %s (extension)" % path)
                    continue
                try:
                    size = os.path.getsize(path)
                except OSError as error:
                    log("skipping %s: %s" % (path, error))
                    continue
                if size > MAX_FILE_SIZE:
                    log("skipping %s: too big (>1MB)" % path)
                    continue
                found.append(path)
    return found


def parse_file(path):
    """The mapping in ``path``, or None when it lacks a cloud-config header. Raises ConfigError if malformed."""
    require("yaml", "to read Kairos config files")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ConfigError("cannot read Kairos config file %s: %s" % (path, error.strerror or error)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("Kairos config file %s is not UTF-8 text" % path) from None
    if not has_valid_header(text):
        return None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = " at line %d, column %d" % (mark.line + 1, mark.column + 1)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError("Kairos config file %s is not valid YAML%s: %s" % (path, where, problem)) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            "Kairos config file %s must hold a mapping (key: value), not a %s" % (path, type(values).__name__)
        )
    return values


def _cmdline_value(value):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return value


def parse_cmdline(text):
    """Kernel command line → nested mapping, like kairos-sdk's DotToYAML."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # unbalanced quote: Go's shlex gives up the same way; keep what splits
        tokens = text.split()
    values = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        key = key.strip('"')
        value = value.strip('"') if sep else "true"
        path = key.split(".")
        if not key or "" in path:
            continue
        node = values
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    break  # "a=1 a.b=2": a scalar cannot hold keys; upstream's jq drops it too
                child = node[part] = {}
            node = child
        else:
            node[path[-1]] = _cmdline_value(value)
    return values


def deep_merge(base, new, source, path=()):
    """kairos-sdk DeepMerge: maps merged, lists united, scalars replaced.

    A type clash (map against scalar) under ``kcrypt`` is an error naming ``source``;
    elsewhere the later value wins, so an unrelated setting cannot stop the node.
    """
    if base is None:
        return new
    if new is None:
        return type(base)() if isinstance(base, (dict, list)) else None
    if isinstance(base, dict) != isinstance(new, dict) or isinstance(base, list) != isinstance(new, list):
        if path and path[0] == "kcrypt":
            raise ConfigError(
                "%s sets %s to a %s, but an earlier file made it a %s"
                % (source, ".".join(path), type(new).__name__, type(base).__name__)
            )
        return new
    if isinstance(base, dict):
        merged = dict(base)
        for key, value in new.items():
            merged[key] = deep_merge(merged.get(key), value, source, path + (str(key),))
        return merged
    if isinstance(base, list):
        if base and isinstance(base[0], dict):
            return base + new
        return base + [item for item in new if item not in base]
    return new


def load_values(config_dirs=None, cmdline_path=None, log=None):
    """(merged mapping, sources) from the config directories and the kernel command line."""
    log = log or (lambda message: None)
    dirs = DEFAULT_CONFIG_DIRS if config_dirs is None else config_dirs
    merged, sources = {}, []
    for path in config_files(dirs, log):
        values = parse_file(path)
        if values is None:
            log("skipping %s because it has no valid header" % path)
            continue
        merged = deep_merge(merged, values, path)
        sources.append(path)
    cmdline_path = DEFAULT_CMDLINE if cmdline_path is None else cmdline_path
    if cmdline_path:
        try:
            with open(cmdline_path, encoding="utf-8", errors="replace") as handle:
                cmdline = handle.read()
        except OSError as error:
            log("not reading the kernel command line %s: %s" % (cmdline_path, error))  # best effort, as upstream
        else:
            merged = deep_merge(merged, parse_cmdline(cmdline), "kernel command line %s" % cmdline_path)
            sources.append("cmdline")
    return merged, sources


def _section(values, key, where):
    section = values.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError("%s must be a mapping, not %r" % (where, section))
    return section


def _string(section, key, where):
    value = section.get(key)
    if value is None:
        return ""
    if isinstance(value, (dict, list, bool)):
        raise ConfigError("%s.%s must be a string, not %r" % (where, key, value))
    return str(value)


def _boolean(section, key, where):
    value = section.get(key)
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError("%s.%s must be true or false, not %r" % (where, key, value))


def _first_set(*candidates):
    """The first (value, where) whose value is not empty."""
    for value, where in candidates:
        if value not in (None, ""):
            return value, where
    return None, None


def settings_from_values(values, sources=()):
    """KcryptSettings from a merged Kairos config mapping."""
    kcrypt = _section(values, "kcrypt", "kcrypt")
    challenger = _section(kcrypt, "challenger", "kcrypt.challenger")
    where = "kcrypt.challenger"

    def both(key):
        return _first_set((kcrypt.get(key), "kcrypt." + key), (challenger.get(key), "kcrypt.challenger." + key))

    nv_index, nv_where = both("nv_index")
    c_index, c_where = both("c_index")
    tpm_device, tpm_where = both("tpm_device")
    if isinstance(tpm_device, (dict, list, bool)):
        raise ConfigError("%s must be a device path or TCTI string, not %r" % (tpm_where, tpm_device))
    protocol = _string(challenger, "protocol", where).lower()
    if protocol and protocol not in CLIENT_PROTOCOLS:
        raise ConfigError("%s.protocol must be one of %s, not %r" % (where, ", ".join(CLIENT_PROTOCOLS), protocol))
    interfaces = challenger.get("mdns_interfaces") or ()
    if isinstance(interfaces, str):
        interfaces = interfaces.replace(",", " ").split()
    elif not isinstance(interfaces, (list, tuple)):
        raise ConfigError("%s.mdns_interfaces must be a list of interface names or IPv4 addresses" % where)
    return KcryptSettings(
        challenger_server=_string(challenger, "challenger_server", where).strip(),
        mdns=_boolean(challenger, "mdns", where),
        certificate=_string(challenger, "certificate", where),
        nv_index=parse_nv_index(nv_index, nv_where),
        c_index=parse_persistent_handle(c_index, c_where),
        tpm_device="" if tpm_device is None else str(tpm_device).strip(),
        mdns_interfaces=tuple(str(item) for item in interfaces),
        protocol=protocol,
        sources=tuple(sources),
    )


def read_settings(config_dirs=None, cmdline_path=None, log=None):
    """The node's KcryptSettings, read from the Kairos config directories and the kernel command line.

    ``config_dirs`` and ``cmdline_path`` default to upstream's locations (tests point them
    elsewhere; an empty ``cmdline_path`` skips the command line).
    """
    values, sources = load_values(config_dirs, cmdline_path, log)
    return settings_from_values(values, sources)


# -- boot state (LiveCD detection, checklist 17) ------------------------------------

EFIVARS_DIR = "/sys/firmware/efi/efivars"
LOADER_DEVICE_PART_UUID = "LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # set by systemd-boot from disk


def is_livecd_boot(cmdline, efivars_dir=EFIVARS_DIR):
    """kairos-sdk's boot state is ``livecd_boot``: the node is installing, its PCRs are not final yet.

    Upstream clients then send ``defer_pcr_enrollment`` so the KMS learns the PCRs on
    the first boot of the installed system. ``kairos.ram`` forces an active boot; UKI
    (``rd.immucore.uki``) is LiveCD when the boot loader did not record a disk partition;
    otherwise the cmdline decides, first match wins: reset, active, passive, recovery, live.
    """
    tokens = cmdline.split()
    if any(token == "kairos.ram" or token.startswith("kairos.ram=") for token in tokens):
        return False
    if "rd.immucore.uki" in cmdline:
        try:
            with open(os.path.join(efivars_dir, LOADER_DEVICE_PART_UUID), "rb") as handle:
                data = handle.read()
        except OSError:
            return True
        # efivarfs: 4 attribute bytes, then the value (a NUL-terminated UTF-16LE string)
        return not data[4:].decode("utf-16-le", "replace").strip("\x00").strip()
    for markers, livecd in (
        (("kairos.reset",), False),
        (("COS_ACTIVE",), False),
        (("COS_PASSIVE",), False),
        (("COS_RECOVERY", "COS_SYSTEM", "recovery-mode"), False),
        (("live:LABEL", "live:CDLABEL", "netboot"), True),
    ):
        if any(marker in cmdline for marker in markers):
            return livecd
    return False


def read_livecd_boot(cmdline_path=None, efivars_dir=EFIVARS_DIR):
    """is_livecd_boot for the running system (False when the command line cannot be read)."""
    cmdline_path = DEFAULT_CMDLINE if cmdline_path is None else cmdline_path
    if not cmdline_path:
        return False
    try:
        with open(cmdline_path, encoding="utf-8", errors="replace") as handle:
            return is_livecd_boot(handle.read(), efivars_dir)
    except OSError:
        return False
