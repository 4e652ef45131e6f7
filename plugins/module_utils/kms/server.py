# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger: a Kairos-compatible KMS speaking both wire protocols (spec §2, §3.1).

Private to the collection. Endpoints, all on one port:

* ``/tpm-attestation`` — newest protocol (WebSocket, four JSON messages);
* ``/getPass`` and ``/postPass`` — legacy protocol (Bearer TPM token, binary frames);
* ``/recovery-escrow`` — ours: a node stores the recovery key of one of its partitions after the
  newest protocol's TPM proof (kms/recovery.py; nothing serves a recovery key back);
* ``/healthz`` (process alive), ``/readyz`` (store reachable), ``/metrics`` (Prometheus).

``protocols`` chooses which of the two protocols are served (both by default, for mixed
fleets); the endpoints of a disabled one answer HTTP 404 with the reason, as a server of
the other generation would (checklist 50). ``/recovery-escrow`` counts as the attestation
protocol's (it is its TPM proof).

Why aiohttp: one well-kept library gives HTTP/1.1, WebSocket (RFC 6455, with
C-accelerated parsing and masking), TLS through the standard ``ssl`` module and
plain HTTP on the same asyncio loop, so thousands of nodes waiting on a slow
TPM cost a coroutine each, not a thread. ``websockets`` would need a second
server for the HTTP endpoints; a threaded WSGI stack would need a thread per
connection.

What this adds to upstream's server (each is in README's Compatibility table):

* every read has a timeout (``read_timeout``) and every frame a size limit
  (``max_message_size``): a silent or flooding client gets an error and is closed;
* the activation secret is compared in constant time;
* quotes are checked against the activation secret as nonce (``nonce_mode``:
  ``off`` = upstream HEAD, ``when-supported`` = a quote that carries qualifying data
  must carry the secret, the default and compatible with HEAD clients,
  ``required`` = every quote must; a client signals support simply by sending such
  a quote, which upstream servers ignore);
* a store failure closes the WebSocket with code 1011 instead of sending an
  ``error`` message, so upstream clients retry instead of giving up
  ("attestation failed" is never retried by them);
* one audit log line per attestation (TPM hash, partition, protocol, outcome,
  duration; never a passphrase) and Prometheus metrics.

Policy calls: the policy and store are synchronous. With the embedded SQLite
store they are called directly on the event loop (measured: a thread hand-off
costs more CPU than the SQLite work itself); with a networked store (Kubernetes)
they run in a thread pool so one slow API call does not stall other nodes
(``store_calls``: ``inline`` | ``thread``; docs/challenger.md has the figures).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import ssl
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.metrics import (
    OUTCOME_BAD_REQUEST,
    OUTCOME_DISCONNECTED,
    OUTCOME_ERROR,
    OUTCOME_REJECTED,
    OUTCOME_SUCCESS,
    OUTCOME_TIMEOUT,
    PROTOCOL_ATTESTATION,
    PROTOCOL_LEGACY_GET,
    PROTOCOL_LEGACY_POST,
    PROTOCOL_RECOVERY_ESCROW,
    Metrics,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import PolicyRejection

aiohttp = optional_import("aiohttp")
web = optional_import("aiohttp.web")

ATTESTATION_PATH = messages.ATTESTATION_PATH
GET_PASS_PATH = messages.GET_PASS_PATH
POST_PASS_PATH = messages.POST_PASS_PATH
RECOVERY_ESCROW_PATH = messages.RECOVERY_ESCROW_PATH

DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024  # real messages are < 4 KiB
MAX_HEADER_SIZE = 32 * 1024  # a legacy Bearer token with an EK certificate is ~6 KiB
STORE_CALLS = ("inline", "thread")
CLOSE_INTERNAL_ERROR = 1011
PROTOCOL_NAMES = ("attestation", "legacy")  # what --protocols may list

log = logging.getLogger("kcrypt.challenger")
audit_log = logging.getLogger("kcrypt.audit")


class _Abort(Exception):
    """Ends one exchange: what to tell the node, and how to account for it."""

    def __init__(self, outcome, detail, message=None, close_code=None):
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.message = message  # frame to send before closing, or None
        self.close_code = close_code


class _AuditedExchange:
    """One WebSocket exchange of any protocol: counted in flight while it runs; its end (done,
    aborted, connection lost, server stopping) becomes an outcome, the socket is closed with what the
    node must be told, and one audit line is written."""

    def __init__(self, server, request, protocol_name, session=None):
        self.server, self.request, self.protocol_name, self.session = server, request, protocol_name, session
        self.started = time.monotonic()
        self.ws = None
        self.peer = request.remote
        self.partition = PartitionRef.from_headers(request.headers)
        self.tpm_hash = ""  # set by the handler once known (legacy), or read from the session
        self.outcome, self.detail, self.extra = OUTCOME_SUCCESS, "", ""

    async def __aenter__(self):
        self.ws = await self.server._upgrade(self.request)
        self.server.metrics.in_flight += 1
        return self

    async def __aexit__(self, exc_type, error, traceback):
        abort, handled = None, True
        if isinstance(error, _Abort):
            abort, self.outcome, self.detail = error, error.outcome, error.detail
        elif isinstance(error, ConnectionError):
            self.outcome, self.detail = OUTCOME_DISCONNECTED, "connection lost: %s" % (error or type(error).__name__)
        elif isinstance(error, asyncio.CancelledError):  # server shutdown: account for it, let it through
            self.outcome, self.detail, handled = OUTCOME_DISCONNECTED, "cancelled (server stopping)", False
        elif error is not None:  # a bug: account for it, let it through (aiohttp logs the traceback)
            self.outcome, self.detail, handled = OUTCOME_ERROR, "internal error: %s" % type(error).__name__, False
        self.server.metrics.in_flight -= 1
        await self.server._finish(self.ws, abort)
        tpm_hash = self.session.tpm_hash if self.session is not None else self.tpm_hash
        self.server._audit(self.protocol_name, self.started, self.outcome, tpm_hash, self.partition,
                           self.detail, self.peer, self.extra)
        return handled


def _json_error(text):
    return messages.write_json({"error": text})


def _legacy_error(text):
    return messages.legacy_payload(error=text)


class Challenger:
    """The challenger's request handlers over a policy (policy.Policy or anything with its methods).

    ``ready_check``: a callable raising when the store cannot serve (``store.ping``).
    ``metrics``: a Metrics (a worker's slot of shared ones); default: this process's own.
    """

    def __init__(self, policy, nonce_mode=attestation.NONCE_WHEN_SUPPORTED, read_timeout=DEFAULT_READ_TIMEOUT,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE, store_calls="inline", ready_check=None, store_threads=8,
                 metrics=None, protocols=PROTOCOL_NAMES):
        require("aiohttp", "to run the challenger")
        self.protocols = parse_protocols(protocols)
        if nonce_mode not in attestation.NONCE_MODES:
            raise KcryptError("nonce must be one of %s, not %r" % (", ".join(attestation.NONCE_MODES), nonce_mode))
        if store_calls not in STORE_CALLS:
            raise KcryptError("store_calls must be one of %s, not %r" % (", ".join(STORE_CALLS), store_calls))
        if not read_timeout or read_timeout <= 0:
            raise KcryptError("read_timeout must be a positive number of seconds")
        if not max_message_size or max_message_size < 4096:
            raise KcryptError("max_message_size must be at least 4096 bytes")
        self.policy = policy
        self.nonce_mode = nonce_mode
        self.read_timeout = float(read_timeout)
        self.max_message_size = int(max_message_size)
        self.ready_check = ready_check
        self.metrics = metrics if metrics is not None else Metrics()
        self._executor = None
        if store_calls == "thread":
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=store_threads, thread_name_prefix="kcrypt-store")

    def _protocol_handlers(self):
        """path -> handler of the node endpoints; a disabled protocol's paths get handle_disabled.

        ``/recovery-escrow`` belongs to the attestation protocol: it runs the same TPM proof (and parses
        the same TPM structures), so a KMS that does not serve ``/tpm-attestation`` does not serve it either.
        """
        handlers = {}
        for path, name, handler in ((ATTESTATION_PATH, "attestation", self.handle_attestation),
                                    (RECOVERY_ESCROW_PATH, "attestation", self.handle_recovery_escrow),
                                    (GET_PASS_PATH, "legacy", self.handle_get_pass),
                                    (POST_PASS_PATH, "legacy", self.handle_post_pass)):
            handlers[path] = handler if name in self.protocols else functools.partial(self.handle_disabled, name)
        return handlers

    def application(self):
        app = web.Application()
        for path, handler in self._protocol_handlers().items():
            app.router.add_get(path, handler)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_get("/metrics", self.handle_metrics)
        # Last: a legacy node whose challenger_server ends in "/" asks for "//getPass" (upstream's ServeMux
        # answers that with a redirect the WebSocket dialer cannot follow, kairos#1248). Serve it.
        app.router.add_get("/{path:.*}", self.handle_repeated_slashes)
        app.on_cleanup.append(self._cleanup)
        return app

    async def handle_repeated_slashes(self, request):
        path = re.sub("/{2,}", "/", request.path)
        handler = self._protocol_handlers().get(path)
        if handler is None or path == request.path:
            raise web.HTTPNotFound()
        return await handler(request)

    async def handle_disabled(self, name, request):
        """An endpoint of a protocol this server does not serve: 404, as a server of the other generation answers."""
        raise web.HTTPNotFound(text="%s: the %s protocol is disabled on this KMS, which serves %s (kcrypt-challenger "
                                    "--protocols %s)\n" % (request.path, name, " and ".join(self.protocols), ",".join(self.protocols)))

    async def _cleanup(self, _app):
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- plumbing -------------------------------------------------------------

    async def _store(self, function, *args, **kwargs):
        """Run a policy/store call inline or in the thread pool (see the module docstring)."""
        if self._executor is None:
            return function(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args, **kwargs))

    async def _upgrade(self, request):
        ws = web.WebSocketResponse(max_msg_size=self.max_message_size, compress=False, timeout=self.read_timeout)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="%s expects a WebSocket upgrade (this is a kcrypt challenger endpoint)\n" % request.path)
        await ws.prepare(request)
        return ws

    async def _read(self, ws, what, stage_prefix, reply):
        """One frame's data, or _Abort: a timeout, an oversized frame, or the node hanging up.

        ``reply(text)`` makes the error frame of the protocol in use.
        """
        try:
            msg = await ws.receive(timeout=self.read_timeout)
        except asyncio.TimeoutError:
            detail = "%sno %s within %gs" % (stage_prefix, what, self.read_timeout)
            raise _Abort(OUTCOME_TIMEOUT, detail, message=reply(detail)) from None
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return msg.data
        if msg.type == aiohttp.WSMsgType.ERROR:
            # aiohttp has closed the socket already (code 1009 for a frame over max_message_size).
            raise _Abort(OUTCOME_DISCONNECTED, "%s%s: %s" % (stage_prefix, what, msg.data))
        raise _Abort(OUTCOME_DISCONNECTED, "%sthe node closed the connection before sending the %s" % (stage_prefix, what))

    async def _finish(self, ws, abort):
        if ws.closed:
            return
        try:
            if abort is not None and abort.message is not None:
                if isinstance(abort.message, bytes):
                    await ws.send_bytes(abort.message)
                else:
                    await ws.send_str(abort.message)
            if abort is not None and abort.close_code:
                await ws.close(code=abort.close_code, message=abort.detail.encode("utf-8")[:120])
            else:
                await ws.close()
        except (ConnectionError, RuntimeError):
            pass  # the node is gone; nothing left to tell it

    def _audit(self, protocol_name, started, outcome, tpm_hash, partition, detail, peer, extra=""):
        seconds = time.monotonic() - started
        self.metrics.observe(protocol_name, outcome, seconds)
        level = logging.INFO if outcome in (OUTCOME_SUCCESS, OUTCOME_REJECTED) else logging.WARNING
        if outcome == OUTCOME_ERROR:
            level = logging.ERROR
        if audit_log.isEnabledFor(level):
            audit_log.log(
                level,
                "attestation protocol=%s outcome=%s tpm_hash=%s partition=%r duration_ms=%.1f peer=%s%s%s",
                protocol_name, outcome, tpm_hash or "-", partition.describe() if partition else "-",
                seconds * 1000.0, peer or "-", extra, (" detail=%r" % detail) if detail else "",
            )

    def _internal_error(self, stage, error):
        log.error("%s failed: %s", stage, error, exc_info=not isinstance(error, KcryptError))
        detail = "KMS temporarily unavailable (%s); retry" % (error if isinstance(error, KcryptError) else type(error).__name__)
        return _Abort(OUTCOME_ERROR, detail, close_code=CLOSE_INTERNAL_ERROR)

    # -- newest protocol (spec §2.A) -------------------------------------------

    async def _prove(self, exchange, session):
        """Messages 1 to 3 of the newest protocol: init, challenge, proof. Returns (VerifiedAttestation, proof frame)."""
        ws = exchange.ws
        init = await self._read(ws, "attestation init", "WebSocket read: reading attestation init: ", _json_error)
        try:
            challenge = session.challenge(init)
        except attestation.StageError as error:
            raise _Abort(OUTCOME_BAD_REQUEST, str(error), message=_json_error(str(error))) from None
        await ws.send_str(messages.write_json(challenge))
        proof = await self._read(ws, "proof", "Proof read: reading proof: ", _json_error)
        try:
            verified = session.verify(proof)
        except attestation.StageError as error:
            kind = OUTCOME_REJECTED if error.rejection else OUTCOME_BAD_REQUEST
            raise _Abort(kind, str(error), message=_json_error(str(error))) from None
        exchange.extra = " nonce=%s" % ("bound" if verified.nonce_bound else "none")
        return verified, proof

    async def handle_attestation(self, request):
        session = attestation.AttestationSession(self.nonce_mode)
        async with _AuditedExchange(self, request, PROTOCOL_ATTESTATION, session=session) as exchange:
            ws = exchange.ws
            verified, _proof = await self._prove(exchange, session)
            try:
                passphrase = await self._store(
                    self.policy.issue_passphrase, verified.tpm_hash, verified.ek_pem, verified.pcrs, exchange.partition,
                    defer_pcr_enrollment=verified.defer_pcr_enrollment,
                )
            except PolicyRejection as error:
                text = "%s: %s" % (attestation.STAGE_VERIFY, error)
                raise _Abort(OUTCOME_REJECTED, text, message=_json_error(text)) from None
            except Exception as error:  # the store failed: close with 1011 so the node retries
                raise self._internal_error("issuing a passphrase for TPM %s" % verified.tpm_hash, error) from None
            if not passphrase:
                raise self._internal_error("issuing a passphrase", KcryptError("the store returned an empty passphrase"))
            await ws.send_str(messages.write_json(messages.response_message(passphrase=passphrase)))
        return exchange.ws

    # -- recovery-key escrow (ours) ------------------------------------------------

    async def handle_recovery_escrow(self, request):
        """The newest protocol's proof, the quote always bound to the activation secret (only our clients
        call this endpoint, and they always bind it), then the recovery key of one partition of the
        TPM's own SealedVolume is stored. A failed proof or policy check stores nothing."""
        session = attestation.AttestationSession(attestation.NONCE_REQUIRED)
        async with _AuditedExchange(self, request, PROTOCOL_RECOVERY_ESCROW, session=session) as exchange:
            verified, proof = await self._prove(exchange, session)
            try:
                key = messages.parse_escrow_key(messages.load_json_object(proof, "recovery escrow"))
            except messages.ProtocolError as error:
                raise _Abort(OUTCOME_BAD_REQUEST, str(error), message=_json_error(str(error))) from None
            try:
                name = await self._store(self.policy.escrow_recovery_key, verified.tpm_hash, verified.ek_pem,
                                         verified.pcrs, exchange.partition, key)
            except PolicyRejection as error:
                text = "%s: %s" % (attestation.STAGE_VERIFY, error)
                raise _Abort(OUTCOME_REJECTED, text, message=_json_error(text)) from None
            except Exception as error:  # the store failed: close with 1011 so the node retries
                raise self._internal_error("escrowing a recovery key of TPM %s" % verified.tpm_hash, error) from None
            exchange.extra += " secret=%s" % name
            await exchange.ws.send_str(messages.write_json(messages.escrow_response()))
        return exchange.ws

    # -- legacy protocol (spec §2.B) ---------------------------------------------

    async def _legacy_auth(self, request, ws):
        """tpm-helpers AuthRequest: token → challenge frame → answer. Returns the TPM hash."""
        try:
            auth = attestation.LegacyAuth(request.headers.get("Authorization", ""))
        except messages.ProtocolError as error:
            raise _Abort(OUTCOME_BAD_REQUEST, str(error), message=_legacy_error(str(error))) from None
        await ws.send_bytes(auth.challenge_frame())
        answer = await self._read(ws, "challenge response", "", _legacy_error)
        try:
            auth.check_answer(answer)
        except attestation.Rejection as error:
            text = "TPM authentication failed: %s" % error
            raise _Abort(OUTCOME_REJECTED, text, message=_legacy_error(text)) from None
        return auth.tpm_hash

    async def handle_get_pass(self, request):
        async with _AuditedExchange(self, request, PROTOCOL_LEGACY_GET) as exchange:
            ws = exchange.ws
            exchange.tpm_hash = tpm_hash = await self._legacy_auth(request, ws)
            try:
                payload = await self._store(self.policy.legacy_get_pass, tpm_hash, exchange.partition)
            except Exception as error:
                raise self._internal_error("looking up TPM %s" % tpm_hash, error) from None
            if payload.get("error"):
                exchange.outcome, exchange.detail = OUTCOME_REJECTED, payload["error"]
            await ws.send_bytes(messages.legacy_payload(
                passphrase=payload.get("passphrase", ""), error=payload.get("error", ""),
                generated_by=payload.get("generated_by", ""),
            ))
        return exchange.ws

    async def handle_post_pass(self, request):
        async with _AuditedExchange(self, request, PROTOCOL_LEGACY_POST) as exchange:
            ws = exchange.ws
            exchange.tpm_hash = tpm_hash = await self._legacy_auth(request, ws)
            frame = await self._read(ws, "passphrase payload", "", _legacy_error)
            try:
                payload = messages.parse_legacy_payload(frame)
            except messages.ProtocolError as error:
                raise _Abort(OUTCOME_BAD_REQUEST, str(error), message=_legacy_error(str(error))) from None
            try:
                created = await self._store(self.policy.legacy_post_pass, tpm_hash, exchange.partition, payload)
            except PolicyRejection as error:
                raise _Abort(OUTCOME_REJECTED, str(error), message=_legacy_error(str(error))) from None
            except Exception as error:
                raise self._internal_error("storing the passphrase of TPM %s" % tpm_hash, error) from None
            exchange.extra = " stored=%s" % ("new" if created else "kept-existing")
        return exchange.ws

    # -- operations ------------------------------------------------------------

    async def handle_healthz(self, _request):
        return web.Response(text="ok\n")

    async def handle_readyz(self, _request):
        if self.ready_check is not None:
            try:
                await self._store(self.ready_check)
            except Exception as error:  # any failure means "not ready"; the text says why
                return web.Response(status=503, text="not ready: %s\n" % error)
        return web.Response(text="ok\n")

    async def handle_metrics(self, _request):
        return web.Response(body=self.metrics.render().encode("utf-8"),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def parse_protocols(value):
    """``protocols``: a list or comma-separated text of PROTOCOL_NAMES, at least one; returned in that order."""
    names = value.replace(",", " ").split() if isinstance(value, str) else list(value or ())
    unknown = [n for n in names if n not in PROTOCOL_NAMES]
    if unknown or not names:
        raise KcryptError("protocols must list one or both of %s (comma-separated), not %r" % (", ".join(PROTOCOL_NAMES), value))
    return tuple(n for n in PROTOCOL_NAMES if n in names)


def tls_context(cert_file, key_file):
    """Server TLS from PEM files (TLS 1.2+). Raises KcryptError naming the file on failure."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise KcryptError("cannot load the TLS certificate %s / key %s: %s" % (cert_file, key_file, error)) from None
    return context


async def start(challenger, host, port, ssl_context=None, reuse_port=False):
    """Start serving; returns (runner, bound port). Stop with ``await runner.cleanup()``.

    ``reuse_port``: bind with SO_REUSEPORT, so several worker processes share the port and the kernel
    spreads new connections over them.
    """
    runner = web.AppRunner(
        challenger.application(), access_log=None, handle_signals=False,
        max_field_size=MAX_HEADER_SIZE, max_line_size=MAX_HEADER_SIZE,
        keepalive_timeout=challenger.read_timeout, shutdown_timeout=5.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error)) from None
    addresses = runner.addresses
    return runner, (addresses[0][1] if addresses else port)


async def serve_forever(challenger, host, port, ssl_context=None, on_started=None, stop=None, reuse_port=False):
    """Serve until ``stop`` (an asyncio.Event) is set; ``on_started(port)`` runs once listening."""
    runner, bound = await start(challenger, host, port, ssl_context, reuse_port)
    try:
        if on_started is not None:
            on_started(bound)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()
