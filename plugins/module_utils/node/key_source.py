# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where a partition's LUKS key comes from: the TPM (offline NV blob), the KMS, or the caller.

Private to the collection: the API may change without notice.

Every source offers two calls:

- ``existing_key(partition)``: the key if it already exists, without creating one
  (used to test an encrypted partition, in check mode too). For ``tpm`` it only
  reads NV; for ``kms`` it asks the KMS, exactly as a booting node does.
- ``key(partition)``: the key, created on first use (``tpm``: a new NV blob;
  ``kms``: the KMS enrols the TPM / generates the secret).

Keys are bytes and never appear in messages or reprs. ``secrets`` lists every key
handed out, and ``on_secret(callback)`` tells the caller of each one as it is handed out,
so callers can redact them (Ansible ``no_log_values``).
"""

from __future__ import annotations

import os

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import builder, kairos_config, kms_client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM, parse_nv_index, parse_persistent_handle, parse_tpm_layout

KEY_SOURCES = ("tpm", "kms", "passphrase", "auto")


def partition_ref(device, label):
    """What the KMS is told about a partition (spec §2.A headers): its label, kernel name and GPT UUID."""
    return PartitionRef(label=label or device.kairos_label, device_name=device.name, uuid=device.partuuid)


class KeySource:
    name = ""
    # The TPM this source attests or seals with ("" = the default device), also where the node's
    # TPM hash is read (kairos_luks_encrypt returns it, so provisioning needs no second TPM read).
    tpm_device = ""
    # Whether the source cannot work without the TPM (the passphrase source can).
    needs_tpm = True
    # Whether keys are machine-generated high-entropy secrets: then a cheap PBKDF costs nothing
    # in security and saves seconds at every boot (see docs/node.md, "PBKDF").
    generated = True

    def __init__(self):
        self.secrets = []
        self._watchers = []

    def on_secret(self, callback):
        """Call ``callback(key)`` for every key handed out so far and every one handed out later."""
        self._watchers.append(callback)
        for key in self.secrets:
            callback(key)

    def handed_out(self, key):
        """Record a key that leaves this source (or is made for it, such as a re-key's new key); returns it."""
        if key is not None and key not in self.secrets:
            self.secrets.append(key)
            for callback in self._watchers:
                callback(key)
        return key

    def describe(self):
        raise NotImplementedError

    def preflight(self):
        """Fail now, before anything changes, if keys cannot be had (no TPM, unreadable NV blob)."""

    def existing_key(self, device, label=""):
        raise NotImplementedError

    def key(self, device, label=""):
        raise NotImplementedError


class PassphraseKeySource(KeySource):
    """A passphrase given by the caller (Ansible ``no_log`` option, or a file/stdin for the CLI)."""

    name = "passphrase"
    generated = False
    needs_tpm = False

    def __init__(self, passphrase, tpm_device=""):
        super().__init__()
        self.tpm_device = tpm_device or ""
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not passphrase:
            raise KcryptError("key_source=passphrase needs a non-empty passphrase")
        self._passphrase = self.handed_out(passphrase)

    def describe(self):
        return "the given passphrase"

    def existing_key(self, device, label=""):
        return self._passphrase

    def key(self, device, label=""):
        return self._passphrase


class TpmKeySource(KeySource):
    """Offline mode (spec §6.4): one passphrase for all partitions, RSA-encrypted in TPM NV.

    Byte-compatible with Kairos NV blobs; ``c_index`` is honoured on encrypt and decrypt.
    """

    name = "tpm"

    def __init__(self, tpm_device="", nv_index=None, c_index=None, layout=None):
        super().__init__()
        self.tpm_device = tpm_device or ""
        self.nv_index = parse_nv_index(nv_index)
        self.c_index = parse_persistent_handle(c_index)
        self.layout = parse_tpm_layout(layout)  # only used when the key or the index is created
        self._passphrase = None
        self.created = False

    def describe(self):
        return "the TPM (NV index 0x%x, key 0x%x)" % (self.nv_index, self.c_index)

    def existing_key(self, device=None, label=""):
        if self._passphrase is None:
            with TPM(self.tpm_device) as tpm:
                self._passphrase = blob.read_nv_passphrase(tpm, self.nv_index, self.c_index)
        return self.handed_out(self._passphrase)

    def preflight(self):
        self.existing_key()

    def key(self, device=None, label=""):
        if self._passphrase is None:
            with TPM(self.tpm_device) as tpm:
                self._passphrase, self.created = blob.nv_passphrase(tpm, self.nv_index, self.c_index, self.layout)
        return self.handed_out(self._passphrase)


class KmsKeySource(KeySource):
    """Online mode: the passphrase comes from a kcrypt challenger after TPM attestation (client.py)."""

    name = "kms"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tpm_device = config.tpm_device or ""
        self._cache = {}

    def describe(self):
        server = getattr(self.config, "challenger_server", "") or "the KMS"
        return "the KMS at %s" % server

    def _fetch(self, device, label):
        ref = partition_ref(device, label)
        if ref not in self._cache:
            self._cache[ref] = kms_client.get_passphrase(self.config, ref)
        return self.handed_out(self._cache[ref])

    def existing_key(self, device, label=""):
        return self._fetch(device, label)

    def key(self, device, label=""):
        return self._fetch(device, label)


def read_passphrase_file(path, stdin=None):
    """A passphrase from a file (``-`` = stdin), used whole: no newline is stripped, as cryptsetup --key-file."""
    if path == "-":
        stream = stdin if stdin is not None else os.fdopen(os.dup(0), "rb")
        with stream:
            return stream.read()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise KcryptError("cannot read the passphrase file %s: %s" % (path, error.strerror)) from None


def build(params, config_dirs=None, cmdline_path=None, at_boot=False, warn=None):
    """A key source from module options / CLI flags of the same names.

    ``key_source`` (tpm | kms | passphrase | auto), ``passphrase``, ``tpm_device``, ``nv_index``,
    ``c_index``, ``challenger_server``, ``certificate`` (PEM text or file), ``mdns``, ``mdns_interfaces``,
    ``kms_protocol`` (attestation | legacy), ``kms_attempts``, ``kms_retry_delay``, ``tpm_layout``
    (go-tpm | tpmk: how a missing ``c_index`` key and a new NV index are created). Unset (None)
    options keep the defaults of KcryptSettings. ``auto`` reads the node's Kairos config
    (``config_dirs`` and ``cmdline_path`` default to Kairos' locations) and chooses like Kairos:
    kms when it names a challenger server or turns on mDNS, else tpm; explicit options win over
    the config. ``cmdline_path`` also tells the KMS client whether this is a LiveCD boot.
    ``at_boot`` (``kcrypt unlock-all``): a broken config file or config_url is reported to
    ``warn`` and skipped, as Kairos does at boot, instead of failing.
    """
    params = {key: value for key, value in params.items() if builder.is_set(value)}
    kind = params.get("key_source") or "tpm"
    if kind not in KEY_SOURCES:
        raise KcryptError("key_source must be one of %s, not %r" % (", ".join(KEY_SOURCES), kind))
    if kind == "passphrase":
        return PassphraseKeySource(params.get("passphrase"), params.get("tpm_device"))
    if params.get("passphrase"):
        raise KcryptError("passphrase is only used with key_source=passphrase (key_source is %s)" % kind)
    base, overrides, settings = _settings(params, kind, config_dirs, cmdline_path, at_boot, warn)
    if kind == "auto":
        kind = "kms" if settings.remote else "tpm"
    if kind == "tpm":
        return TpmKeySource(settings.tpm_device, settings.nv_index, settings.c_index, settings.tpm_layout)
    if not settings.challenger_server:
        raise KcryptError("key_source=kms needs challenger_server (with mdns, a *.local URL)")
    return KmsKeySource(_client_config(params, base, overrides, cmdline_path))


def kms_client_config(params, config_dirs=None, cmdline_path=None, purpose="key_source=kms"):
    """The KMS client configuration of the same options whatever the key source (the recovery-key escrow).

    With ``key_source=auto`` the node's Kairos config fills what the options leave unset.
    """
    params = {key: value for key, value in params.items() if builder.is_set(value)}
    base, overrides, settings = _settings(params, params.get("key_source") or "tpm", config_dirs, cmdline_path)
    if not settings.challenger_server:
        raise KcryptError("%s needs challenger_server (with mdns, a *.local URL)" % purpose)
    return _client_config(params, base, overrides, cmdline_path)


def _settings(params, kind, config_dirs, cmdline_path, at_boot=False, warn=None):
    """(Kairos settings, overrides from the options, the two combined)."""
    if kind == "auto":
        base = kairos_config.read_settings(config_dirs, cmdline_path, at_boot=at_boot, warn=warn)
    else:
        base = kairos_config.KcryptSettings()
    overrides = _overrides(params)
    return base, overrides, builder.apply_overrides(base, overrides)


def _client_config(params, base, overrides, cmdline_path):
    return builder.client_config(base, overrides, attempts=params.get("kms_attempts", builder.DEFAULT_ATTEMPTS),
                                 retry_delay=params.get("kms_retry_delay"), cmdline_path=cmdline_path)


def _overrides(params):
    """Module options / CLI flags as KcryptSettings overrides (handles parsed, options renamed)."""
    overrides = {
        "challenger_server": params.get("challenger_server"),
        "mdns": params.get("mdns"),
        "certificate": params.get("certificate"),
        "mdns_interfaces": tuple(params.get("mdns_interfaces") or ()),
        "protocol": params.get("kms_protocol"),
        "tpm_device": params.get("tpm_device"),
        "tpm_layout": parse_tpm_layout(params["tpm_layout"]) if params.get("tpm_layout") else None,
    }
    if params.get("nv_index") is not None:
        overrides["nv_index"] = parse_nv_index(params["nv_index"])
    if params.get("c_index") is not None:
        overrides["c_index"] = parse_persistent_handle(params["c_index"])
    return overrides
