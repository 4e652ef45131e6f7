# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-challenger``: run the KMS, and (through store_admin) administer its store.

Private to the collection.

    kcrypt-challenger serve --listen 0.0.0.0:8082 --store sqlite:///var/lib/kcrypt-challenger/kms.db \\
        [--tls-cert F --tls-key F] [--enrollment tofu|registered-only] [--nonce off|when-supported|required] \\
        [--protocols attestation,legacy] [--max-partitions-per-tpm N] [--workers N|auto] \\
        [--mdns-host kms.local --mdns-interface 192.168.1.10] [--config /etc/kcrypt-challenger/config.yaml]

``kcrypt-challenger`` with no arguments serves with the settings of the config
file. Command-line flags override the file; the file overrides the defaults. The
file is YAML with the flag names as keys (``listen``, ``store``, ``tls_cert``,
``tls_key``, ``enrollment``, ``nonce``, ``protocols``, ``max_partitions_per_tpm``,
``read_timeout``, ``max_message_size``,
``store_calls``, ``workers``, ``mdns_host``, ``mdns_interfaces``, ``mdns_address``,
``log_level``); it is looked up at ``--config``, ``$KCRYPT_CHALLENGER_CONFIG``,
then /etc/kcrypt-challenger/config.yaml (absent is fine unless named explicitly).

Admin subcommands (list, show, add, export, import, quarantine, ...) are in
``cli/challenger_admin.py``; settings and the store URL in ``kms/settings.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import multiprocessing
import signal
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger_admin
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import server, worker_pool
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.attestation import NONCE_MODES
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.metrics import Metrics
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import ENROLLMENT_MODES, Policy
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.settings import (
    DEFAULT_CONFIG,
    DEFAULTS,
    ENV_CONFIG,
    LOG_LEVELS,
    settings,
    store_calls,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store

PROG = "kcrypt-challenger"
GC_YOUNG_THRESHOLD = 100000
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
    parser.add_argument("--nonce", choices=NONCE_MODES,
                        help="quote freshness: off (upstream HEAD), when-supported (default: check quotes that carry "
                             "the activation secret), required (reject unbound quotes, i.e. upstream HEAD clients)")
    parser.add_argument("--protocols", help="which Kairos protocols to serve: attestation (/tpm-attestation, v0.12+ nodes), "
                                            "legacy (/getPass, /postPass: older nodes, no boot-state check) or both "
                                            "(default attestation,legacy); a disabled one answers HTTP 404")
    parser.add_argument("--max-partitions-per-tpm", dest="max_partitions_per_tpm",
                        help="partitions a TPM may enrol on its own (default %d); registrations are not limited"
                             % DEFAULTS["max_partitions_per_tpm"])
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
    challenger_admin.add_subcommands(subparsers, common)
    parser.commands = tuple(subparsers.choices)
    return parser


def serve_command(args):
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
    multiprocessing.current_process().name = "supervisor"
    shared_metrics = Metrics.shared_array(workers)

    def serve(index, port, ready):
        store = open_store(config["store"])
        try:
            challenger = _challenger(config, store, Metrics(shared_metrics, index))
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
    return server.Challenger(
        Policy(store, enrollment=config["enrollment"], max_partitions_per_tpm=config["max_partitions_per_tpm"]),
        nonce_mode=config["nonce"], read_timeout=config["read_timeout"],
        max_message_size=config["max_message_size"], store_calls=store_calls(config), ready_check=store.ping, metrics=metrics,
        protocols=config["protocols"],
    )


def _announce(config, ssl_context, port, workers=1):
    """Log where the server listens and start the mDNS announcement if asked; returns the announcer or None."""
    scheme = "https" if ssl_context else "http"
    host = "[%s]" % config["host"] if ":" in config["host"] else config["host"]
    log.info("listening on %s://%s:%d (store %s, protocols %s, enrollment %s, nonce %s, store calls %s, workers %d)", scheme,
             host, port, config["store"], ",".join(config["protocols"]), config["enrollment"], config["nonce"],
             store_calls(config), workers)
    if not config["mdns_host"]:
        return None
    announcer = mdns.Announcer(host_name=config["mdns_host"], port=port, addresses=config["mdns_address"] or None,
                               interfaces=config["mdns_interfaces"]).start()
    log.info("announcing %s on mDNS (_kcrypt._tcp) on %s", config["mdns_host"], ", ".join(config["mdns_interfaces"]))
    return announcer


async def _serve(challenger, config, ssl_context, on_ready=None, reuse_port=False):
    """Serve until SIGTERM/SIGINT; ``on_ready(port)`` runs once listening and may return an announcer to stop."""
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


def main(argv=None, stdin=None, stdout=None, stderr=None):
    """Run a subcommand (``serve`` when none is named); returns the exit code.

    ``stdin``/``stdout``/``stderr`` default to the process's (tests pass their own).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not set(argv) & set(parser.commands) and not set(argv) & {"-h", "--help"}:
        argv = ["serve"] + argv  # no subcommand: serve (with the config file's settings)
    args = parser.parse_args(argv)
    args.stdin, args.stdout, args.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        return args.func(args) or 0
    except KcryptError as error:
        args.stderr.write("Error: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        return 130
