# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-challenger``: run the KMS, and (through store_admin) administer its store.

Private to the collection.

    kcrypt-challenger serve --listen 0.0.0.0:8082 --store sqlite:///var/lib/kcrypt-challenger/kms.db \\
        [--tls-cert F --tls-key F] [--enrollment tofu|registered-only] [--nonce off|when-supported|required] \\
        [--protocols attestation,legacy] [--max-partitions-per-tpm N] \\
        [--ek-certificate off|verify-if-present|require --ek-ca PATH ...] [--workers N|auto] \\
        [--max-connections N|auto] [--max-connections-per-client N|auto] \\
        [--mdns-host kms.local --mdns-interface 192.168.1.10] [--config /etc/kcrypt-challenger/config.yaml]

``kcrypt-challenger`` with no arguments serves with the settings of the config
file. Command-line flags override the file; the file overrides the defaults. The
file is YAML with the flag names as keys (``listen``, ``store``, ``tls_cert``,
``tls_key``, ``enrollment``, ``nonce``, ``protocols``, ``max_partitions_per_tpm``, ``ek_certificate``,
``ek_ca`` (a path or a list), ``request_timeout``, ``first_message_timeout``, ``read_timeout``,
``exchange_timeout``, ``max_message_size``, ``max_connections``, ``max_connections_per_client``,
``store_calls``, ``workers``, ``mdns_host``, ``mdns_interfaces``, ``mdns_address``, ``log_level``); it is
looked up at ``--config``, ``$KCRYPT_CHALLENGER_CONFIG``,
then /etc/kcrypt-challenger/config.yaml (absent is fine unless named explicitly).

Admin subcommands (list, show, add, export, import, quarantine, ...) are in
``cli/challenger_admin.py``; settings and the store URL in ``kms/settings.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import multiprocessing
import signal
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger_admin
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import server, worker_pool
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.attestation import NONCE_MODES
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.listener import connection_limits, raise_open_files_limit
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.log_limits import RepeatFilter
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.memory import GarbageCollectorPacer, tune_garbage_collector
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.ek_certificate import MODES as EK_CERTIFICATE_MODES, EKCertificatePolicy
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
    parser.add_argument("--ek-certificate", dest="ek_certificate", choices=EK_CERTIFICATE_MODES,
                        help="which unknown TPMs may enrol: off (default, any TPM), verify-if-present (an EK certificate "
                             "a TPM sends must chain to --ek-ca), require (only TPMs whose EK certificate does); "
                             "registered TPMs are always served")
    parser.add_argument("--ek-ca", dest="ek_ca", action="append",
                        help="PEM/DER file or directory of TPM manufacturer CA certificates to trust (repeatable)")
    parser.add_argument("--request-timeout", dest="request_timeout", type=float,
                        help="seconds for the TLS handshake and then for the HTTP request (default 10)")
    parser.add_argument("--first-message-timeout", dest="first_message_timeout", type=float,
                        help="seconds to wait for a node's first message, while its TPM may be creating keys (default 120)")
    parser.add_argument("--read-timeout", dest="read_timeout", type=float, help="seconds to wait for each later node message (default 10)")
    parser.add_argument("--exchange-timeout", dest="exchange_timeout", type=float,
                        help="seconds a whole exchange may take from the upgrade (default 150)")
    parser.add_argument("--max-message-size", dest="max_message_size", type=int, help="largest WebSocket message in bytes (default 65536)")
    parser.add_argument("--max-connections", dest="max_connections",
                        help="exchanges in progress at once, all workers together; more are answered 503 with Retry-After "
                             "(default auto: from the open-file limit, at most 4096 per worker)")
    parser.add_argument("--max-connections-per-client", dest="max_connections_per_client",
                        help="connections one client address may hold (default auto: a quarter of max-connections; "
                             "0: no limit, for a proxy or NAT in front of the KMS)")
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
    for handler in logging.getLogger().handlers:  # an attacker must not be able to flood the log (issue 14.6)
        handler.addFilter(RepeatFilter())
    config["limits"] = _connection_limits(config)
    # Opened once here even with workers: it creates the database, the schema and the key file, and a
    # store that cannot be opened fails the start with one clear error.
    # The trusted CAs are read once: a wrong path stops the start, before anything listens.
    config["ek_policy"] = EKCertificatePolicy.from_settings(config["ek_certificate"], config["ek_ca"])
    store = open_store(config["store"])
    ssl_context = server.tls_context(config["tls_cert"], config["tls_key"]) if config["tls_cert"] else None
    tune_garbage_collector()
    if workers == 1:
        try:
            asyncio.run(_serve(_challenger(config, store), config, ssl_context, on_ready=functools.partial(_announce, config, ssl_context)))
        finally:
            store.close()
            log.info("stopped")
        return 0
    store.close()  # a connection must not cross fork(): every worker opens its own
    return _serve_workers(config, ssl_context, workers)


def _connection_limits(config):
    """Raise the open-file limit as far as allowed (systemd's LimitNOFILE=, the supervisor, the container
    runtime set the hard limit) and derive the connection limits from it; logs both."""
    open_files, before = raise_open_files_limit()
    limits = connection_limits(open_files, config["workers"], config["max_connections"], config["max_connections_per_client"])
    log.info("open files: %d per process%s; max_connections %d (%d per worker), %d connections per worker, %s",
             open_files, "" if open_files == before else " (raised from %d)" % before, limits.max_connections,
             limits.worker_exchanges, limits.worker_connections,
             ("%d per client address per worker" % limits.per_client) if limits.per_client else "no per-client limit")
    if limits.worker_exchanges * config["workers"] < limits.max_connections:
        log.warning("max_connections %d is more than %d worker(s) can hold with %d open files each; each serves at most %d "
                    "(raise LimitNOFILE or add workers)", limits.max_connections, config["workers"], open_files,
                    limits.worker_exchanges)
    return limits


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
        Policy(store, enrollment=config["enrollment"], max_partitions_per_tpm=config["max_partitions_per_tpm"],
               ek_certificates=config.get("ek_policy")),
        nonce_mode=config["nonce"], request_timeout=config["request_timeout"],
        first_message_timeout=config["first_message_timeout"], read_timeout=config["read_timeout"],
        exchange_timeout=config["exchange_timeout"], max_message_size=config["max_message_size"],
        store_calls=store_calls(config), ready_check=store.ping, metrics=metrics, limits=config["limits"],
        protocols=config["protocols"],
    )


def _announce(config, ssl_context, port, workers=1):
    """Log where the server listens and start the mDNS announcement if asked; returns the announcer or None."""
    scheme = "https" if ssl_context else "http"
    host = "[%s]" % config["host"] if ":" in config["host"] else config["host"]
    ek_policy = config.get("ek_policy")
    log.info("listening on %s://%s:%d (store %s, protocols %s, enrollment %s, ek certificate %s, nonce %s, store calls %s, "
             "workers %d)", scheme, host, port, config["store"], ",".join(config["protocols"]), config["enrollment"],
             "%s with %d trusted CA(s)" % (ek_policy.mode, len(ek_policy.trusted)) if ek_policy and ek_policy.enabled else "off",
             config["nonce"], store_calls(config), workers)
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

    collector = loop.create_task(GarbageCollectorPacer().run())
    try:
        await server.serve_forever(challenger, config["host"], config["port"], ssl_context, on_started, stop, reuse_port)
    finally:
        collector.cancel()
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
