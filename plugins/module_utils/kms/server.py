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

* every connection has a budget (docs/challenger.md, "Connection budget"): ``request_timeout`` for the
  TLS handshake and the HTTP request, ``first_message_timeout`` for the node's first message (long
  enough for a slow TPM to create its keys), ``read_timeout`` for each later one, ``exchange_timeout``
  for the whole exchange (pings do not extend any of them), ``max_message_size`` per frame; a silent or
  flooding client gets an error and is closed;
* at most ``max_connections`` exchanges run at once (all workers together); beyond that an upgrade is
  answered ``503`` with ``Retry-After`` before any work, while ``/healthz``, ``/readyz`` and ``/metrics``
  keep answering; connections are accepted by kms/listener.py, which keeps them within the process's
  open-file limit and one client address's share;
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
import base64
import binascii
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
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.listener import Listener, connection_limits, open_files_limit
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.log_limits import HttpErrorLogger
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
    REFUSED_MAX_CONNECTIONS,
    Metrics,
)
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.volume_attestation import PolicyRejection

aiohttp = optional_import("aiohttp")
web = optional_import("aiohttp.web")

ATTESTATION_PATH = messages.ATTESTATION_PATH
GET_PASS_PATH = messages.GET_PASS_PATH
POST_PASS_PATH = messages.POST_PASS_PATH
RECOVERY_ESCROW_PATH = messages.RECOVERY_ESCROW_PATH

# The connection budget (docs/challenger.md). The node's first message can wait for its TPM to create keys:
# upstream clients open the WebSocket, then create the AK (and, without an EK certificate, the EK), each
# an RSA-2048 key generation. That takes seconds on most TPMs and up to 1-2 minutes on some discrete ones
# (Linux allows 300 s per key-creation command, TPM2_DURATION_LONG_LONG); 120 s covers one such key, and
# the AK is kept for the client's next attempt. Later messages need signatures and decryptions only.
DEFAULT_REQUEST_TIMEOUT = 10.0  # TLS handshake, then the HTTP request (the upgrade): clients send at once
DEFAULT_FIRST_MESSAGE_TIMEOUT = 120.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_EXCHANGE_TIMEOUT = 150.0  # first message + a later one + store calls, from the upgrade
CLOSE_TIMEOUT = 2.0  # how long a closing handshake waits for the node's close frame
MAX_CONTROL_FRAMES = 16  # pings and pongs a node may send during one exchange (a real one sends none)
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024  # real messages are < 4 KiB
MAX_HEADER_SIZE = 32 * 1024  # a legacy Bearer token with an EK certificate is ~6 KiB
STORE_CALLS = ("inline", "thread")
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
RETRY_AFTER = 1  # seconds, in the 503 of a busy KMS (upstream clients retry after 1 s anyway)
BUSY = "KMS busy: too many exchanges in progress (max_connections); retry after %d s\n" % RETRY_AFTER
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
        self.deadline = 0.0  # loop time by which the whole exchange ends (set at the upgrade)
        self.control_frames = 0

    async def __aenter__(self):
        """Counted in flight from here (the handler admitted it just before, with no await in between)."""
        server = self.server
        server.metrics.in_flight += 1
        try:
            self.ws = await server._upgrade(self.request)
        except web.HTTPBadRequest as refusal:
            server.metrics.in_flight -= 1
            server._audit(self.protocol_name, self.started, OUTCOME_BAD_REQUEST, "", self.partition,
                          "WebSocket handshake refused: %s" % refusal.text.strip(), self.peer)
            raise
        except BaseException:
            server.metrics.in_flight -= 1
            raise
        self.deadline = asyncio.get_running_loop().time() + server.exchange_timeout
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


def _close_reason(text):
    """A close frame's reason: at most 123 bytes of valid UTF-8 (RFC 6455 5.5.1)."""
    return text.encode("utf-8")[:120].decode("utf-8", "ignore").encode("utf-8")


def _json_error(text):
    return messages.write_json({"error": text})


def _legacy_error(text):
    return messages.legacy_payload(error=text)


class Challenger:
    """The challenger's request handlers over a policy (policy.Policy or anything with its methods).

    ``ready_check``: a callable raising when the store cannot serve (``store.ping``).
    ``metrics``: a Metrics (a worker's slot of shared ones); default: this process's own.
    ``limits``: listener.ConnectionLimits; default: derived from this process's open-file limit.
    The timeouts are the connection budget (module constants; docs/challenger.md).
    """

    def __init__(self, policy, nonce_mode=attestation.NONCE_WHEN_SUPPORTED, read_timeout=DEFAULT_READ_TIMEOUT,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE, store_calls="inline", ready_check=None, store_threads=8,
                 metrics=None, protocols=PROTOCOL_NAMES, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 first_message_timeout=DEFAULT_FIRST_MESSAGE_TIMEOUT, exchange_timeout=DEFAULT_EXCHANGE_TIMEOUT, limits=None):
        require("aiohttp", "to run the challenger")
        self.protocols = parse_protocols(protocols)
        if nonce_mode not in attestation.NONCE_MODES:
            raise KcryptError("nonce must be one of %s, not %r" % (", ".join(attestation.NONCE_MODES), nonce_mode))
        if store_calls not in STORE_CALLS:
            raise KcryptError("store_calls must be one of %s, not %r" % (", ".join(STORE_CALLS), store_calls))
        for name, value in (("read_timeout", read_timeout), ("request_timeout", request_timeout),
                            ("first_message_timeout", first_message_timeout), ("exchange_timeout", exchange_timeout)):
            if not value or value <= 0:
                raise KcryptError("%s must be a positive number of seconds" % name)
        if exchange_timeout < first_message_timeout:
            raise KcryptError("exchange_timeout (%gs) must be at least first_message_timeout (%gs)" % (exchange_timeout, first_message_timeout))
        if not max_message_size or max_message_size < 4096:
            raise KcryptError("max_message_size must be at least 4096 bytes")
        self.policy = policy
        self.nonce_mode = nonce_mode
        self.read_timeout = float(read_timeout)
        self.request_timeout = float(request_timeout)
        self.first_message_timeout = float(first_message_timeout)
        self.exchange_timeout = float(exchange_timeout)
        self.limits = limits if limits is not None else connection_limits(open_files_limit())
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

    def _admit(self, request):
        """None when an exchange may start; otherwise the answer of a busy KMS, given before the upgrade:
        503 with Retry-After, which every WebSocket client reports as a failed handshake and retries."""
        metrics, limits = self.metrics, self.limits
        if metrics.in_flight < limits.worker_exchanges and metrics.in_flight_total() < limits.max_connections:
            return None
        metrics.refused(REFUSED_MAX_CONNECTIONS)
        log.warning("KMS busy: refused an exchange from %s with 503 (%d in flight, max_connections %d)",
                    request.remote, metrics.in_flight_total(), limits.max_connections)
        response = web.Response(status=503, text=BUSY, headers={"Retry-After": str(RETRY_AFTER)})
        response.force_close()  # free the connection at once
        return response

    async def _upgrade(self, request):
        refusal = _handshake_refusal(request)
        if refusal:
            raise web.HTTPBadRequest(text=refusal + "\n")
        ws = web.WebSocketResponse(max_msg_size=self.max_message_size, compress=False, autoping=False, timeout=CLOSE_TIMEOUT)
        try:
            await ws.prepare(request)
        except (web.HTTPBadRequest, UnicodeError, ValueError):  # aiohttp's own checks, in case they differ from ours
            raise web.HTTPBadRequest(text="%s expects a WebSocket upgrade (this is a kcrypt challenger endpoint)\n" % request.path) from None
        return ws

    async def _read(self, exchange, what, stage_prefix, reply, first=False):
        """One frame's data, or _Abort: a timeout, an oversized or malformed frame, or the node hanging up.

        The wait ends at a deadline that pings do not move: ``first_message_timeout`` for the node's first
        message, ``read_timeout`` for later ones, and never after the exchange's own deadline. ``reply(text)``
        makes the error frame of the protocol in use (None: close without one).
        """
        ws, loop = exchange.ws, asyncio.get_running_loop()
        timeout = self.first_message_timeout if first else self.read_timeout
        deadline = min(loop.time() + timeout, exchange.deadline)
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError()
                msg = await ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                if deadline < exchange.deadline:
                    detail = "%sno %s within %gs" % (stage_prefix, what, timeout)
                else:
                    detail = "%sno %s before the end of the exchange (%gs after the upgrade)" % (stage_prefix, what, self.exchange_timeout)
                if reply is None:
                    raise _Abort(OUTCOME_TIMEOUT, detail, close_code=CLOSE_POLICY_VIOLATION) from None
                raise _Abort(OUTCOME_TIMEOUT, detail, message=reply(detail)) from None
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                return msg.data
            if msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                exchange.control_frames += 1
                if exchange.control_frames > MAX_CONTROL_FRAMES:
                    raise _Abort(OUTCOME_BAD_REQUEST, "%smore than %d control frames" % (stage_prefix, MAX_CONTROL_FRAMES),
                                 close_code=CLOSE_POLICY_VIOLATION)
                if msg.type == aiohttp.WSMsgType.PING:
                    await ws.pong(msg.data)
                continue
            if msg.type == aiohttp.WSMsgType.ERROR:
                frame_error = getattr(exchange.request.protocol, "frame_error", "")
                if frame_error:  # listener.py found an unmasked frame; aiohttp closed with 1002
                    raise _Abort(OUTCOME_BAD_REQUEST, "%s%s: %s" % (stage_prefix, what, frame_error))
                # aiohttp has closed the socket already (1009 for a frame over max_message_size, 1002 for a bad frame).
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
                await ws.close(code=abort.close_code, message=_close_reason(abort.detail))
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
        init = await self._read(exchange, "attestation init", "WebSocket read: reading attestation init: ", _json_error, first=True)
        try:
            challenge = session.challenge(init)
        except attestation.StageError as error:
            raise _Abort(OUTCOME_BAD_REQUEST, str(error), message=_json_error(str(error))) from None
        await ws.send_str(messages.write_json(challenge))
        proof = await self._read(exchange, "proof", "Proof read: reading proof: ", _json_error)
        try:
            verified = session.verify(proof)
        except attestation.StageError as error:
            kind = OUTCOME_REJECTED if error.rejection else OUTCOME_BAD_REQUEST
            raise _Abort(kind, str(error), message=_json_error(str(error))) from None
        exchange.extra = " nonce=%s" % ("bound" if verified.nonce_bound else "none")
        return verified, proof

    async def handle_attestation(self, request):
        busy = self._admit(request)
        if busy is not None:
            return busy
        session = attestation.AttestationSession(self.nonce_mode)
        async with _AuditedExchange(self, request, PROTOCOL_ATTESTATION, session=session) as exchange:
            ws = exchange.ws
            verified, dummy = await self._prove(exchange, session)
            try:
                passphrase = await self._store(
                    self.policy.issue_passphrase, verified.tpm_hash, verified.ek_pem, verified.pcrs, exchange.partition,
                    defer_pcr_enrollment=verified.defer_pcr_enrollment, ek_certificate=verified.ek_certificate,
                    ek_chain=verified.ek_chain,
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
        TPM's own SealedVolume is stored. A failed proof or policy check stores nothing. Admission (503 when
        busy), the connection budget and the policy (EK, PCRs with their windows, quarantine) are
        /tpm-attestation's."""
        busy = self._admit(request)
        if busy is not None:
            return busy
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

    async def _legacy_auth(self, request, exchange):
        """tpm-helpers AuthRequest: token → challenge frame → answer. Returns the TPM hash.

        A refusal here closes the connection (1008, the reason in the close frame, the log and the audit)
        without a payload, as upstream's /getPass does: tpm-helpers' ``Connection`` decodes the first frame
        as a ``Challenge`` and dereferences its ``EC``, so an ``{"error": ...}`` frame would crash a legacy
        Go client instead of letting it retry.
        """
        try:
            auth = attestation.LegacyAuth(request.headers.get("Authorization", ""))
        except messages.ProtocolError as error:
            raise _Abort(OUTCOME_BAD_REQUEST, str(error), close_code=CLOSE_POLICY_VIOLATION) from None
        exchange.tpm_hash = auth.tpm_hash  # audited from here on, also when the answer is refused
        await exchange.ws.send_bytes(auth.challenge_frame())
        answer = await self._read(exchange, "challenge response", "TPM authentication failed: ", None, first=True)
        try:
            auth.check_answer(answer)
        except attestation.Rejection as error:
            raise _Abort(OUTCOME_REJECTED, "TPM authentication failed: %s" % error, close_code=CLOSE_POLICY_VIOLATION) from None
        return auth.tpm_hash

    async def handle_get_pass(self, request):
        busy = self._admit(request)
        if busy is not None:
            return busy
        async with _AuditedExchange(self, request, PROTOCOL_LEGACY_GET) as exchange:
            ws = exchange.ws
            tpm_hash = await self._legacy_auth(request, exchange)
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
        busy = self._admit(request)
        if busy is not None:
            return busy
        async with _AuditedExchange(self, request, PROTOCOL_LEGACY_POST) as exchange:
            tpm_hash = await self._legacy_auth(request, exchange)
            frame = await self._read(exchange, "passphrase payload", "", _legacy_error)
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


class Running:
    """A started challenger: ``port`` it listens on; ``await stop()`` ends it."""

    def __init__(self, runner, listener, port):
        self.runner, self.listener, self.port = runner, listener, port

    async def stop(self):
        await self.listener.stop()
        await self.runner.cleanup()


async def start(challenger, host, port, ssl_context=None, reuse_port=False):
    """Start serving; returns a Running.

    ``challenger``: a Challenger, or anything with its ``application()`` (the recording peers of the tests);
    its ``request_timeout``, ``limits`` and ``metrics`` are used when it has them.
    ``reuse_port``: bind with SO_REUSEPORT, so several worker processes share the port and the kernel
    spreads new connections over them.
    """
    request_timeout = getattr(challenger, "request_timeout", DEFAULT_REQUEST_TIMEOUT)
    limits = getattr(challenger, "limits", None) or connection_limits(open_files_limit())
    options = {
        "access_log": None,
        "max_field_size": MAX_HEADER_SIZE,
        "max_line_size": MAX_HEADER_SIZE,
        "keepalive_timeout": request_timeout,  # also closes a connection that sends no request
        "logger": HttpErrorLogger(logging.getLogger("aiohttp.server")),
    }
    runner = web.AppRunner(challenger.application(), handle_signals=False, shutdown_timeout=5.0, **options)
    await runner.setup()
    listener = Listener(runner, options, limits, request_timeout, ssl_context, getattr(challenger, "metrics", None))
    try:
        bound = await listener.start(host, port, reuse_port=reuse_port)
    except BaseException:
        await runner.cleanup()
        raise
    return Running(runner, listener, bound)


async def serve_forever(challenger, host, port, ssl_context=None, on_started=None, stop=None, reuse_port=False):
    """Serve until ``stop`` (an asyncio.Event) is set; ``on_started(port)`` runs once listening."""
    running = await start(challenger, host, port, ssl_context, reuse_port)
    try:
        if on_started is not None:
            on_started(running.port)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await running.stop()


def _handshake_refusal(request):
    """Why ``request`` is not a WebSocket opening handshake we accept (RFC 6455 4.2.1), or "".

    Checked here rather than by aiohttp: it answers a non-ASCII Sec-WebSocket-Key with HTTP 500, and puts the
    Upgrade, Connection and Sec-WebSocket-Version values in its 400 text, where a non-UTF-8 byte makes it a
    500 as well (both found by fuzzing). Our texts are fixed.
    """
    headers = request.headers
    if headers.get("Upgrade", "").strip().lower() != "websocket" or \
            "upgrade" not in [token.strip().lower() for token in headers.get("Connection", "").split(",")]:
        return "%s expects a WebSocket upgrade (this is a kcrypt challenger endpoint)" % request.path
    if headers.get("Sec-WebSocket-Version", "") not in ("13", "8", "7"):
        return "unsupported Sec-WebSocket-Version: 13 is required"
    key = headers.get("Sec-WebSocket-Key", "")
    if len(key) != 24 or not key.isascii():
        return "invalid Sec-WebSocket-Key: RFC 6455 requires the base64 of 16 bytes"
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return "invalid Sec-WebSocket-Key: RFC 6455 requires the base64 of 16 bytes"
    except (binascii.Error, ValueError):
        return "invalid Sec-WebSocket-Key: RFC 6455 requires the base64 of 16 bytes"
    return ""
