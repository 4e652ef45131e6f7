# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-challenger``: run the KMS, and (through store_admin) administer its store.

Private to the collection.

    kcrypt-challenger serve --listen 0.0.0.0:8082 --store sqlite:///var/lib/kcrypt-challenger/kms.db \\
        [--tls-cert F --tls-key F] [--enrollment tofu|registered-only] [--nonce off|when-supported|required] \\
        [--workers N|auto] \\
        [--mdns-host kms.local --mdns-interface 192.168.1.10] [--config /etc/kcrypt-challenger/config.yaml]

``kcrypt-challenger`` with no arguments serves with the settings of the config
file. Command-line flags override the file; the file overrides the defaults. The
file is YAML with the flag names as keys (``listen``, ``store``, ``tls_cert``,
``tls_key``, ``enrollment``, ``nonce``, ``read_timeout``, ``max_message_size``,
``store_calls``, ``workers``, ``mdns_host``, ``mdns_interfaces``, ``mdns_address``,
``log_level``); it is looked up at ``--config``, ``$KCRYPT_CHALLENGER_CONFIG``,
then /etc/kcrypt-challenger/config.yaml (absent is fine unless named explicitly).

Admin subcommands: when ``store_admin.py`` exists, ``store_admin.add_subcommands(
subparsers, common)`` adds them; ``common`` is a parent parser with ``--config`` and
``--store``, each subcommand sets ``func(args) -> exit code`` and opens the store
with :func:`open_store_from_args`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import multiprocessing
import os
import signal
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.deps import optional_import
from ansible_collections.kairos.kcrypt.plugins.module_utils.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils import protocol

yaml = optional_import("yaml")

PROG = "kcrypt-challenger"
ENV_CONFIG = "KCRYPT_CHALLENGER_CONFIG"
DEFAULT_CONFIG = "/etc/kcrypt-challenger/config.yaml"
DEFAULTS = {
    "listen": "0.0.0.0:8082",  # upstream's --challenger-bind-address default is :8082
    "store": "sqlite:///var/lib/kcrypt-challenger/kms.db",
    "tls_cert": "",
    "tls_key": "",
    "enrollment": "tofu",
    "nonce": protocol.NONCE_WHEN_SUPPORTED,
    "read_timeout": 10.0,
    "max_message_size": 64 * 1024,
    "store_calls": "auto",
    "workers": 1,
    "mdns_host": "",
    "mdns_interfaces": [],
    "mdns_address": "",
    "log_level": "info",
}
SETTING_TYPES = {"read_timeout": float, "max_message_size": int}
ENROLLMENT_MODES = ("tofu", "registered-only")
MAX_WORKERS = 64
GC_YOUNG_THRESHOLD = 100000
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("kcrypt.challenger")


def _common_parser():
    # SUPPRESS: a subcommand's copy of these options must not reset a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", help="YAML settings file (default: $%s, then %s if present)" % (ENV_CONFIG, DEFAULT_CONFIG))
    common.add_argument("--store", help="store URL: sqlite:///PATH/kms.db (default %s) or kubernetes://?namespace=NS" % DEFAULTS["store"])
    return common


def _add_serve_arguments(parser):
    parser.add_argument("--listen", help="HOST:PORT to listen on (default %s; port 0 picks a free one)" % DEFAULTS["listen"])
    parser.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate (chain) to serve HTTPS/WSS; needs --tls-key")
    parser.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    parser.add_argument("--enrollment", choices=ENROLLMENT_MODES,
                        help="tofu: enrol unknown TPMs on first contact (default); registered-only: serve registered TPMs only")
    parser.add_argument("--nonce", choices=protocol.NONCE_MODES,
                        help="quote freshness: off (upstream HEAD), when-supported (default: check quotes that carry "
                             "the activation secret), required (reject unbound quotes, i.e. upstream HEAD clients)")
    parser.add_argument("--read-timeout", dest="read_timeout", type=float, help="seconds to wait for each node message (default 10)")
    parser.add_argument("--max-message-size", dest="max_message_size", type=int, help="largest WebSocket message in bytes (default 65536)")
    parser.add_argument("--store-calls", dest="store_calls", choices=("auto", "inline", "thread"),
                        help="run store calls on the event loop (inline) or a thread pool; auto: inline for SQLite")
    parser.add_argument("--workers", help="server processes sharing the port (SO_REUSEPORT), or auto: one per CPU "
                                          "(default 1; more serve a burst of nodes on every core)")
    parser.add_argument("--mdns-host", dest="mdns_host", help="announce the KMS on mDNS as this .local name (_kcrypt._tcp)")
    parser.add_argument("--mdns-interface", dest="mdns_interfaces", action="append",
                        help="interface name or IPv4 address to announce on (repeatable; required with --mdns-host)")
    parser.add_argument("--mdns-address", dest="mdns_address", help="IPv4 address for the A record (default: the interface's)")
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, help="default info (one audit line per attestation)")


def build_parser():
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Kairos-compatible key management server (KMS) for TPM-backed LUKS unlocking.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = subparsers.add_parser("serve", parents=[common], help="run the KMS (the default command)",
                                  description="Serve /tpm-attestation, /getPass, /postPass, /healthz, /readyz and /metrics.")
    _add_serve_arguments(serve)
    serve.set_defaults(func=serve_command)
    try:
        from ansible_collections.kairos.kcrypt.plugins.module_utils import store_admin
    except ImportError:
        store_admin = None
    if store_admin is not None:
        store_admin.add_subcommands(subparsers, common)
    parser.commands = tuple(subparsers.choices)
    return parser


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
    if isinstance(result["mdns_interfaces"], str):
        result["mdns_interfaces"] = [i for i in result["mdns_interfaces"].replace(",", " ").split() if i]
    result["workers"] = parse_workers(result["workers"])
    if result["enrollment"] not in ENROLLMENT_MODES:
        raise KcryptError("enrollment must be one of %s, not %r" % (", ".join(ENROLLMENT_MODES), result["enrollment"]))
    if result["nonce"] not in protocol.NONCE_MODES:
        raise KcryptError("nonce must be one of %s, not %r" % (", ".join(protocol.NONCE_MODES), result["nonce"]))
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


def open_store_from_args(args, **options):
    from ansible_collections.kairos.kcrypt.plugins.module_utils.store import open_store

    return open_store(store_url(args), **options)


def serve_command(args):
    from ansible_collections.kairos.kcrypt.plugins.module_utils import server
    from ansible_collections.kairos.kcrypt.plugins.module_utils.store import open_store

    config = settings(args)
    workers = config["workers"]
    logging.basicConfig(level=getattr(logging, config["log_level"].upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + ("%(processName)s " if workers > 1 else "") + "%(name)s: %(message)s")
    # Opened once here even with workers: it creates the database, the schema and the key file, and a
    # store that cannot be opened fails the start with one clear error.
    store = open_store(config["store"])
    ssl_context = server.tls_context(config["tls_cert"], config["tls_key"]) if config["tls_cert"] else None
    _tune_garbage_collector()
    if workers == 1:
        try:
            asyncio.run(_serve(_challenger(config, store), config, ssl_context, on_ready=functools.partial(_announce, config, ssl_context)))
        finally:
            store.close()
            log.info("stopped")
        return 0
    store.close()  # a connection must not cross fork(): every worker opens its own
    return _serve_workers(config, ssl_context, workers)


def _tune_garbage_collector():
    """Keep the cyclic garbage collector out of bursts: with the default thresholds it ran ~300 times
    per 4000 attestations, with full collections of 14-24 ms that land in the middle of a burst (the
    p99 of the server's share of 500 nodes at once went from 255-266 ms to 217-244 ms without them).
    Everything loaded so far (modules, settings) is frozen, never scanned again and shared
    copy-on-write with the workers; young objects are collected every 100000 allocations instead of 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def _serve_workers(config, ssl_context, workers):
    from ansible_collections.kairos.kcrypt.plugins.module_utils import server, worker_pool
    from ansible_collections.kairos.kcrypt.plugins.module_utils.store import open_store

    multiprocessing.current_process().name = "supervisor"
    shared_metrics = server.Metrics.shared_array(workers)

    def serve(index, port, ready):
        store = open_store(config["store"])
        try:
            challenger = _challenger(config, store, server.Metrics(shared_metrics, index))
            asyncio.run(_serve(challenger, dict(config, port=port), ssl_context, on_ready=lambda _port: ready(), reuse_port=True))
        finally:
            store.close()
        return 0

    announcer = []
    try:
        return worker_pool.run(workers, config["host"], config["port"], serve,
                               on_ready=lambda port: announcer.append(_announce(config, ssl_context, port, workers)))
    finally:
        for item in announcer:
            if item is not None:
                item.stop()
        log.info("stopped")


def _challenger(config, store, metrics=None):
    from ansible_collections.kairos.kcrypt.plugins.module_utils import policy, server

    return server.Challenger(
        policy.Policy(store, enrollment=config["enrollment"]),
        nonce_mode=config["nonce"], read_timeout=config["read_timeout"],
        max_message_size=config["max_message_size"], store_calls=_store_calls(config), ready_check=store.ping, metrics=metrics,
    )


def _store_calls(config):
    """``auto``: SQLite calls inline on the event loop (cheaper than a thread hand-off), others in a thread pool."""
    if config["store_calls"] != "auto":
        return config["store_calls"]
    return "inline" if config["store"].startswith(("sqlite:", "/")) else "thread"


def _announce(config, ssl_context, port, workers=1):
    """Log where the server listens and start the mDNS announcement if asked; returns the announcer or None."""
    scheme = "https" if ssl_context else "http"
    host = "[%s]" % config["host"] if ":" in config["host"] else config["host"]
    log.info("listening on %s://%s:%d (store %s, enrollment %s, nonce %s, store calls %s, workers %d)", scheme, host, port,
             config["store"], config["enrollment"], config["nonce"], _store_calls(config), workers)
    if not config["mdns_host"]:
        return None
    from ansible_collections.kairos.kcrypt.plugins.module_utils import mdns

    announcer = mdns.Announcer(host_name=config["mdns_host"], port=port, addresses=config["mdns_address"] or None,
                               interfaces=config["mdns_interfaces"]).start()
    log.info("announcing %s on mDNS (_kcrypt._tcp) on %s", config["mdns_host"], ", ".join(config["mdns_interfaces"]))
    return announcer


async def _serve(challenger, config, ssl_context, on_ready=None, reuse_port=False):
    """Serve until SIGTERM/SIGINT; ``on_ready(port)`` runs once listening and may return an announcer to stop."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils import server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started = []

    def on_started(port):
        if on_ready is not None:
            started.append(on_ready(port))

    try:
        await server.serve_forever(challenger, config["host"], config["port"], ssl_context, on_started, stop, reuse_port)
    finally:
        for announcer in started:
            if announcer is not None:
                announcer.stop()


def main(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not set(argv) & set(parser.commands) and not set(argv) & {"-h", "--help"}:
        argv = ["serve"] + argv  # no subcommand: serve (with the config file's settings)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KcryptError as error:
        sys.stderr.write("Error: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        return 130
