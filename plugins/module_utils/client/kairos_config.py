# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node's kcrypt settings, read like Kairos does (spec §5.1-5.2, checklist 36-39).

Private to the collection. Sources, later ones winning (kairos-sdk v0.25.2 collector ``Scan``):

1. YAML files under ``/oem``, ``/sysroot/oem``, ``/run/cos/oem`` (in that order, each
   walked in lexical order): only ``*.yaml``/``*.yml`` files of at most 1 MiB whose first
   10 lines contain a ``#cloud-config`` (or legacy ``#kairos-config``/``#node-config``)
   line; other files are skipped, as upstream does.
2. ``/proc/cmdline``: ``a.b.c=value`` tokens become nested keys, a bare token is ``true``,
   ``true``/``false`` become booleans (``kcrypt.challenger.challenger_server=http://...``).
   The Kairos-owned stanzas ``kairos.config=KEY=VALUE`` (dot notation, numeric segments are
   list indices, values stay strings), ``kairos.config_url=URL`` and the legacy
   ``cos.setup=`` (``KEY=VALUE``, or else a URL) are merged on top of the generic tokens.
3. ``config_url``: a top-level ``config_url`` in any of these sources pulls in a remote
   ``#cloud-config`` that overrides the source it came from, recursively (collector
   ``Configs.Merge`` → ``MergeConfigURL``). Each source is merged with its remote configs
   before the next source is merged on top.

Maps are merged deeply, lists united, scalars replaced (collector ``DeepMerge``).

Problems (a malformed YAML file, a remote config that cannot be fetched or parsed, a type
clash under ``kcrypt``) are errors naming the file or URL, because silently ignoring them
could turn a remote-KMS node into an offline one. At boot (``at_boot=True``: plugin mode,
``kcrypt unlock-all --key-source auto``) they are reported through ``warn`` and the source
is skipped, as upstream carries on: one broken unrelated file must not block the unlock.

Deliberate differences from upstream (docs/discovery.md): upstream never says that a
config_url failed (it merges nothing), fetches without a timeout and follows config_url
chains without limit; we give every fetch a timeout, stop after ``MAX_CONFIG_URL_DEPTH``
hops or a loop, and refuse a remote config over 1 MiB. A config_url with ``{{ }}`` template
markers (rendered by upstream from the machine's DMI data) is reported and not fetched. A
command-line token upstream's parser cannot place makes upstream drop the whole command
line; we drop only that token. ``mdns: "true"`` (a string, as ``kairos.config=`` gives it)
counts as true, where upstream ignores a non-boolean ``mdns``.

Keys (``kcrypt.challenger.*``): ``challenger_server``, ``mdns``, ``certificate`` (PEM text),
and our extensions ``mdns_interfaces`` and ``protocol``. ``nv_index``, ``c_index`` and
``tpm_device`` are read from top-level ``kcrypt.*`` (newest SDK) and from
``kcrypt.challenger.*`` (legacy client, agent cmdline injection); the top-level value wins.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import build_opener

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

# config_url fetching. Upstream: 3 attempts 1 s apart, no timeout. Ours: the same attempts, each
# bounded, and one budget for all fetches of one read so an unreachable server delays a boot by at
# most ~a minute instead of forever.
CONFIG_URL_KEY = "config_url"
FETCH_TIMEOUT = 10.0  # seconds per attempt
FETCH_ATTEMPTS = 3
FETCH_RETRY_DELAY = 1.0
FETCH_BUDGET = 60.0  # seconds for every config_url of one read
MAX_CONFIG_URL_DEPTH = 10
CONFIG_URL_SCHEMES = ("http", "https")

# kairos-sdk machine.KairosOwnedPrefixes: handled by the stanza parser, skipped by the generic one.
KAIROS_CONFIG = "kairos.config="
KAIROS_CONFIG_URL = "kairos.config_url="
COS_SETUP = "cos.setup="
KAIROS_OWNED_PREFIXES = (KAIROS_CONFIG, KAIROS_CONFIG_URL, COS_SETUP)


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
    mdns_interfaces: tuple = ()  # empty: $KCRYPT_MDNS_INTERFACES, then every interface (see mdns.py)
    protocol: str = ""  # empty: the caller's default ("attestation", or the plugin payload's generation)
    tpm_layout: str = ""  # how a missing c_index key / new NV index is created (device.TPM_LAYOUTS); option only
    sources: tuple = field(default=(), compare=False)  # files, "cmdline" and URLs that were merged

    @property
    def remote(self):
        """Upstream's encryptor choice: remote KMS iff a server is set or mDNS is on (checklist 39)."""
        return bool(self.challenger_server) or self.mdns

    def with_overrides(self, **changes):
        """A copy with the given non-None fields replaced."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


class _Reader:
    """One read of the config: where problems go, and the time left for fetching config_urls."""

    def __init__(self, log=None, at_boot=False, warn=None, fetch_timeout=FETCH_TIMEOUT,
                 fetch_budget=FETCH_BUDGET, retry_delay=FETCH_RETRY_DELAY):
        self.log = log or (lambda message: None)
        self.at_boot = at_boot
        self.warn = warn or self.log
        self.fetch_timeout = fetch_timeout
        self.retry_delay = retry_delay
        self.deadline = time.monotonic() + fetch_budget

    def problem(self, message):
        """Strict: ConfigError. At boot: warn and let the caller skip the source, as upstream carries on."""
        if not self.at_boot:
            raise ConfigError(message)
        self.warn("%s; skipped (the node boots on the rest of its config, as Kairos does)" % message)


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


def parse_yaml_config(text, where):
    """The mapping a ``#cloud-config`` document holds. Raises ConfigError naming ``where``."""
    require("yaml", "to read Kairos config files")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        place = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            place = " at line %d, column %d" % (mark.line + 1, mark.column + 1)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError("%s is not valid YAML%s: %s" % (where, place, problem)) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError("%s must hold a mapping (key: value), not a %s" % (where, type(values).__name__))
    return values


def parse_file(path):
    """The mapping in ``path``, or None when it lacks a cloud-config header. Raises ConfigError if malformed."""
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
    return parse_yaml_config(text, "Kairos config file %s" % path)


# -- kernel command line --------------------------------------------------------------------

_SPACE, _DOUBLE, _SINGLE, _ESCAPE, _COMMENT = " \t\r\n", '"', "'", "\\", "#"


def split_cmdline(text):
    """Tokens as google/shlex ``Split`` gives them (the tokenizer kairos-sdk uses).

    Quotes and backslashes work as in a shell; a ``#`` that starts a token comments out the
    rest of the line; on an unclosed quote or a trailing backslash, the tokens before it.
    """
    tokens, index, length = [], 0, len(text)
    while index < length:
        char = text[index]
        if char in _SPACE:
            index += 1
            continue
        if char == _COMMENT:
            newline = text.find("\n", index)
            index = length if newline < 0 else newline + 1
            continue
        value, state = [], "word"
        while True:
            if index >= length:
                if state != "word":
                    return tokens  # unclosed quote or dangling escape: Go's Split stops with an error
                break
            char = text[index]
            index += 1
            if state == "word":
                if char in _SPACE:
                    break
                if char == _DOUBLE:
                    state = "double"
                elif char == _SINGLE:
                    state = "single"
                elif char == _ESCAPE:
                    state = "escape"
                else:
                    value.append(char)
            elif state == "escape":
                value.append(char)
                state = "word"
            elif state == "double":
                if char == _DOUBLE:
                    state = "word"
                elif char == _ESCAPE:
                    state = "double-escape"
                else:
                    value.append(char)
            elif state == "double-escape":
                value.append(char)
                state = "double"
            elif char == _SINGLE:  # single quotes
                state = "word"
            else:
                value.append(char)
        tokens.append("".join(value))
    return tokens


def _generic_value(value):
    # unstructured.ToYAML: exactly "true"/"false" become booleans, everything else stays a string
    if value in ("true", "false"):
        return value == "true"
    return value


def _set_path(values, path, value):
    """values[path[0]]...[path[-1]] = value, creating maps; False when a scalar is in the way."""
    node = values
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                return False
            child = node[part] = {}
        node = child
    node[path[-1]] = value
    return True


def parse_generic_cmdline(tokens, log=None):
    """The generic ``KEY=VALUE`` tokens (kairos-sdk ``DotStringToYAML``) as a nested mapping."""
    log = log or (lambda message: None)
    flat = {}
    for token in tokens:
        if token.startswith(KAIROS_OWNED_PREFIXES):
            continue
        key, sep, value = token.partition("=")
        flat[key.strip('"')] = value.strip('"') if sep else "true"  # later tokens win, as in upstream's map
    values = {}
    for key, value in flat.items():
        # upstream's jq path: a key with a dash is quoted whole, so its dots do not nest
        path = [key] if "-" in key else key.split(".")
        if not key or "" in path:
            continue
        if not _set_path(values, path, _generic_value(value)):
            log("kernel command line: %s=%s ignored: %s holds a value, not keys" % (key, value, path[0]))
    return values


def _set_dot_index_path(node, path, value):
    """kairos-sdk setDotIndexPath: numeric segments are list indices, others map keys."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if head.isdigit():
        items = list(node) if isinstance(node, list) else []
        index = int(head)
        while len(items) <= index:
            items.append(None)
        items[index] = _set_dot_index_path(items[index], rest, value)
        return items
    mapping = node if isinstance(node, dict) else {}
    mapping[head] = _set_dot_index_path(mapping.get(head), rest, value)
    return mapping


def _apply_config_stanza(root, payload):
    key, sep, value = payload.partition("=")
    value = value.strip('"') if sep else "true"  # a bare stanza sets the string "true"
    key = key.strip('"')
    if not key:
        return
    segments = key.split(".")
    root[segments[0]] = _set_dot_index_path(root.get(segments[0]), segments[1:], value)


def parse_kairos_cmdline(tokens):
    """The Kairos-owned stanzas (kairos-sdk ``KairosCmdlineYAMLFromString``) as a mapping."""
    root = {}
    for token in tokens:
        if token.startswith(KAIROS_CONFIG_URL):
            url = token[len(KAIROS_CONFIG_URL):].strip('"')
            if url:
                root[CONFIG_URL_KEY] = url
        elif token.startswith(KAIROS_CONFIG):
            payload = token[len(KAIROS_CONFIG):]
            if payload:
                _apply_config_stanza(root, payload)
        elif token.startswith(COS_SETUP):
            payload = token[len(COS_SETUP):]
            if "=" in payload:
                _apply_config_stanza(root, payload)
            elif payload:
                root[CONFIG_URL_KEY] = payload.strip('"')
    return root


def parse_cmdline(text, log=None):
    """Kernel command line → mapping, as kairos-sdk's collector ``ParseCmdLine``: the generic
    dotted tokens, with the Kairos-owned stanzas merged on top (they win on a collision)."""
    tokens = split_cmdline(text)
    return _merge(parse_generic_cmdline(tokens, log), parse_kairos_cmdline(tokens))


# -- merging -------------------------------------------------------------------------------


class _TypeClash(Exception):
    def __init__(self, path, old, new):
        super().__init__()
        self.path, self.old, self.new = path, old, new


def _merge(base, new, path=(), strict_under=None):
    """kairos-sdk DeepMerge: maps merged, lists united, scalars replaced, null resets.

    Upstream fails the whole read on a type clash (map against scalar); we raise _TypeClash
    only under ``strict_under`` (``kcrypt``), and elsewhere let the later value win, so an
    unrelated setting cannot stop the node.
    """
    if base is None:
        return new
    if new is None:  # null resets to the zero value of what was there ("" for a string)
        return type(base)() if isinstance(base, (dict, list, str, bool, int, float)) else None
    if isinstance(base, dict) != isinstance(new, dict) or isinstance(base, list) != isinstance(new, list):
        if strict_under is not None and path[:1] == (strict_under,):
            raise _TypeClash(path, base, new)
        return new
    if isinstance(base, dict):
        merged = dict(base)
        for key, value in new.items():
            merged[key] = _merge(merged.get(key), value, path + (str(key),), strict_under)
        return merged
    if isinstance(base, list):
        if base and isinstance(base[0], dict):
            return base + new
        return base + [item for item in new if item not in base]
    return new


def deep_merge(base, new, source, path=()):
    """Merge ``new`` (from ``source``) over ``base``; a type clash under ``kcrypt`` is a ConfigError naming ``source``."""
    try:
        return _merge(base, new, path, strict_under="kcrypt")
    except _TypeClash as clash:
        raise ConfigError("%s sets %s to a %s, but an earlier file made it a %s" % (
            source, ".".join(clash.path), type(clash.new).__name__, type(clash.old).__name__)) from None


# -- config_url ----------------------------------------------------------------------------


def config_url_of(values):
    """The top-level ``config_url`` when it is a non-empty string (collector ``ConfigURL``)."""
    url = values.get(CONFIG_URL_KEY)
    return url if isinstance(url, str) and url else ""


def fetch_config_url(url, timeout=FETCH_TIMEOUT, attempts=FETCH_ATTEMPTS, retry_delay=FETCH_RETRY_DELAY, deadline=None):
    """The text at ``url`` (http/https, 200, at most 1 MiB), tried ``attempts`` times. Raises ConfigError saying why not."""
    if "{{" in url or "}}" in url:
        raise ConfigError("config_url %s is a template ({{ }}), which only Kairos' own tools render; "
                          "put the rendered URL in the config" % url)
    if urlsplit(url).scheme.lower() not in CONFIG_URL_SCHEMES:
        raise ConfigError("config_url %s cannot be fetched: only http:// and https:// URLs are supported" % url)
    reason = "no attempt made"
    for attempt in range(attempts):
        if attempt:
            time.sleep(retry_delay)
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left <= 0:
            reason = "the time for fetching config_urls ran out"
            break
        try:
            # build_opener().open is what urlopen does, without Ansible's fetch_url: this runs on nodes without ansible-core
            with build_opener().open(url, timeout=left) as response:  # nosec: the operator's own config URL
                if response.status != 200:
                    reason = "unexpected status %d" % response.status
                    continue
                body = response.read(MAX_FILE_SIZE + 1)
        except HTTPError as error:
            reason = "unexpected status %d" % error.code
            continue
        except (URLError, OSError, ValueError) as error:
            reason = str(getattr(error, "reason", None) or error)
            continue
        if len(body) > MAX_FILE_SIZE:
            raise ConfigError("config_url %s holds more than 1 MiB" % url)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config_url %s is not UTF-8 text" % url) from None
    raise ConfigError("config_url %s cannot be fetched after %d attempt(s) (timeout %gs each): %s"
                      % (url, attempts, timeout, reason))


def _with_remote(values, sources, reader, chain=()):
    """``values`` with the config its config_url names merged over it, recursively (MergeConfigURL)."""
    url = config_url_of(values)
    if not url:
        return values
    if url in chain:
        reader.problem("config_url %s comes back to itself (%s)" % (url, " -> ".join(chain + (url,))))
        return values
    if len(chain) >= MAX_CONFIG_URL_DEPTH:
        reader.problem("config_url %s is more than %d config_url hops deep" % (url, MAX_CONFIG_URL_DEPTH))
        return values
    reader.log("fetching config_url %s" % url)
    try:
        text = fetch_config_url(url, reader.fetch_timeout, retry_delay=reader.retry_delay, deadline=reader.deadline)
        if not has_valid_header(text):
            reader.warn("config_url %s has no #cloud-config header: ignored, as Kairos does" % url)
            return values
        remote = parse_yaml_config(text, "config_url %s" % url)
    except ConfigError as error:
        reader.problem(str(error))
        return values
    remote_sources = [url]
    remote = _with_remote(remote, remote_sources, reader, chain + (url,))
    try:
        merged = deep_merge(values, remote, "config_url %s" % url)
    except ConfigError as error:
        reader.problem(str(error))
        return values
    sources.extend(remote_sources)
    return merged


# -- reading --------------------------------------------------------------------------------


def _read_cmdline(cmdline_path, reader):
    try:
        with open(cmdline_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as error:
        reader.log("not reading the kernel command line %s: %s" % (cmdline_path, error))  # best effort, as upstream
        return None


def load_values(config_dirs=None, cmdline_path=None, log=None, at_boot=False, warn=None, **fetch):
    """(merged mapping, sources) from the config directories, the kernel command line and their config_urls.

    ``at_boot``: report problems through ``warn`` (default ``log``) and skip the source instead
    of raising ConfigError. ``fetch`` may set ``fetch_timeout``, ``fetch_budget`` and
    ``retry_delay`` for config_url.
    """
    reader = _Reader(log, at_boot, warn, **fetch)
    dirs = DEFAULT_CONFIG_DIRS if config_dirs is None else config_dirs
    configs = []  # (values, source, where)
    for path in config_files(dirs, reader.log):
        try:
            values = parse_file(path)
        except ConfigError as error:
            reader.problem(str(error))
            continue
        if values is None:
            reader.log("skipping %s because it has no valid header" % path)
            continue
        configs.append((values, path, path))
    cmdline_path = DEFAULT_CMDLINE if cmdline_path is None else cmdline_path
    if cmdline_path:
        cmdline = _read_cmdline(cmdline_path, reader)
        if cmdline is not None:
            configs.append((parse_cmdline(cmdline, reader.log), "cmdline", "kernel command line %s" % cmdline_path))
    merged, sources = {}, []
    for values, source, where in configs:
        own_sources = [source]
        values = _with_remote(values, own_sources, reader)
        try:
            merged = deep_merge(merged, values, where)
        except ConfigError as error:
            reader.problem(str(error))
            continue
        sources.extend(own_sources)
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


def read_settings(config_dirs=None, cmdline_path=None, log=None, at_boot=False, warn=None, **fetch):
    """The node's KcryptSettings, read from the Kairos config directories, the kernel command line
    and the config_urls they name.

    ``config_dirs`` and ``cmdline_path`` default to upstream's locations (tests point them
    elsewhere; an empty ``cmdline_path`` skips the command line). ``at_boot``: a broken source
    is reported through ``warn`` and skipped instead of raising ConfigError (see the module doc).
    """
    values, sources = load_values(config_dirs, cmdline_path, log, at_boot=at_boot, warn=warn, **fetch)
    return settings_from_values(values, sources)


# -- boot state (LiveCD detection, checklist 17) ------------------------------------

EFIVARS_DIR = "/sys/firmware/efi/efivars"
SYSTEMD_VENDOR = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
LOADER_DEVICE_PART_UUID = "LoaderDevicePartUUID-" + SYSTEMD_VENDOR  # set by systemd-boot when it ran from a disk
LOADER_ENTRY_SELECTED = "LoaderEntrySelected-" + SYSTEMD_VENDOR
IN_RAM = "kairos.ram"

# kairos-sdk state.Boot values
ACTIVE, PASSIVE, RECOVERY, LIVECD, AUTORESET, UNKNOWN = (
    "active_boot", "passive_boot", "recovery_boot", "livecd_boot", "autoreset_boot", "unknown")


def is_in_ram_boot(cmdline):
    """kairos-sdk ``state.DetectInRAM``: a ``kairos.ram``, ``kairos.ram=…`` or ``kairos.ram.<anything>`` token."""
    return any(token == IN_RAM or token.startswith((IN_RAM + "=", IN_RAM + ".")) for token in cmdline.split())


def _efivar(efivars_dir, name):
    try:
        with open(os.path.join(efivars_dir, name), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def efi_boot_from_install(efivars_dir=EFIVARS_DIR):
    """kairos-sdk ``EfiBootFromInstall``: the boot loader recorded the disk it ran from.

    Upstream counts any non-empty ``LoaderDevicePartUUID`` file (efivarfs shows 4 attribute
    bytes before the value, so even an empty value counts); a missing or unreadable one does not.
    """
    return bool(_efivar(efivars_dir, LOADER_DEVICE_PART_UUID))


def _uki_boot_state(efivars_dir):
    if not efi_boot_from_install(efivars_dir):
        return LIVECD
    entry = _efivar(efivars_dir, LOADER_ENTRY_SELECTED)
    if entry is None:
        return UNKNOWN
    # upstream drops control characters from the raw bytes (attributes, UTF-16 NULs)
    entry = "".join(char for char in entry.decode("latin-1") if ord(char) >= 0x20 and ord(char) != 0x7F)
    if not entry.endswith(".conf"):
        return UNKNOWN
    for prefix, state in (("active", ACTIVE), ("passive", PASSIVE), ("recovery", RECOVERY), ("statereset", AUTORESET)):
        if entry.startswith(prefix):
            return state
    return UNKNOWN


def boot_state(cmdline, efivars_dir=EFIVARS_DIR):
    """kairos-sdk ``detectBoot``: one of ACTIVE, PASSIVE, RECOVERY, LIVECD, AUTORESET, UNKNOWN.

    An in-RAM boot is active (even from a live medium); UKI (``rd.immucore.uki``) asks the
    boot loader's EFI variables; otherwise the command line decides, first match wins:
    reset, active, passive, recovery, live.
    """
    if is_in_ram_boot(cmdline):
        return ACTIVE
    if "rd.immucore.uki" in cmdline:
        return _uki_boot_state(efivars_dir)
    for markers, state in (
        (("kairos.reset",), AUTORESET),
        (("COS_ACTIVE",), ACTIVE),
        (("COS_PASSIVE",), PASSIVE),
        (("COS_RECOVERY", "COS_SYSTEM", "recovery-mode"), RECOVERY),
        (("live:LABEL", "live:CDLABEL", "netboot"), LIVECD),
    ):
        if any(marker in cmdline for marker in markers):
            return state
    return UNKNOWN


def is_livecd_boot(cmdline, efivars_dir=EFIVARS_DIR):
    """The node is installing from a LiveCD, its PCRs are not final yet (boot state ``livecd_boot``).

    Upstream clients then send ``defer_pcr_enrollment`` so the KMS learns the PCRs on
    the first boot of the installed system.
    """
    return boot_state(cmdline, efivars_dir) == LIVECD


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
