# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the challenger accepts connections: the file-descriptor budget, per-client limits, TLS deadline.

Private to the collection. Used by kms/server.py.

asyncio's accept loop (``loop.create_server``) takes every connection the kernel offers: at the
process's open-file limit each failed ``accept()`` is logged with a traceback (47,000 of them in 10 s,
issue 14.6), a TLS client that never sends its ClientHello holds its descriptor for 60 s, and nothing
stops one address from taking every descriptor. The challenger accepts connections itself:

* every connection is counted from ``accept()`` on, before TLS. A worker holds at most
  ``ConnectionLimits.worker_connections`` (its open-file limit minus a reserve for the store, the log,
  TLS and the event loop); at that limit it stops accepting, and new connections wait in the kernel's
  listen backlog until one closes. ``EMFILE`` therefore does not happen; if it does anyway (``ENFILE``:
  the whole system is out of files), accepting pauses with a back-off and one log line per pause;
* one client address holds at most ``per_client`` connections in a worker; more are closed at once;
* the TLS handshake must finish within ``request_timeout``, and the HTTP request must arrive within
  ``request_timeout`` after it (aiohttp's keep-alive timer, which starts when the connection is made);
* after a WebSocket upgrade every client frame must be masked (RFC 6455 §5.1, which aiohttp's reader
  does not enforce): an unmasked frame ends the connection with close code 1002.

How the limits are chosen is ``connection_limits``; docs/challenger.md has the sizing rule.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import socket
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

web_protocol = optional_import("aiohttp.web_protocol")

log = logging.getLogger("kcrypt.challenger")

# Descriptors a worker keeps for itself: the SQLite store (database, WAL, shared memory, key file),
# the log, the event loop, pipes to the supervisor, mDNS, the Kubernetes client's connection pool.
FD_RESERVE = 64
# A worker serves at most this many WebSocket exchanges unless told otherwise: an exchange costs ~20 KB
# of memory (19,800 held WebSockets took ~400 MB, issue 14.7), so 4096 stay under 100 MB.
DEFAULT_WORKER_EXCHANGES = 4096
ACCEPT_BATCH = 128  # connections taken per wake-up, as asyncio does (backlog-sized batches)
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # pause of the accept loop when the system is out of descriptors
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# The client gave up between the kernel's handshake and accept(): nothing to do.
GONE_ERRNOS = (errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET, errno.EPERM)


def raise_open_files_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit (what systemd's LimitNOFILE= or the container runtime
    allows). Returns (limit now, limit before)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # bounded by the kernel's fs.nr_open anyway
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep what we have; the limits below are derived from it
    return open_files_limit(), soft


def open_files_limit():
    """The soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class ConnectionLimits:
    """What one challenger (all its workers) and each worker hold at most.

    ``max_connections``: WebSocket exchanges in flight, all workers together (beyond: HTTP 503);
    ``worker_exchanges``: exchanges in flight in one worker (beyond: HTTP 503);
    ``worker_connections``: TCP connections one worker holds, any state (beyond: it stops accepting);
    ``per_client``: TCP connections one client address holds in one worker (beyond: closed; 0 = no limit).
    """

    max_connections: int
    worker_exchanges: int
    worker_connections: int
    per_client: int


def connection_limits(open_files, workers=1, max_connections=None, max_connections_per_client=None):
    """The limits for ``workers`` processes with ``open_files`` descriptors each.

    ``max_connections`` (total exchanges) defaults to ``workers`` × min(4096, ¾ of a worker's
    connections): the quarter left over is for connections that have not sent their request yet,
    health probes and 503 answers. ``max_connections_per_client`` (per address, all workers) defaults to
    a quarter of ``max_connections``, so one address cannot take the whole cap; 0 turns it off (a proxy
    or NAT in front, where every node arrives from one address). Each worker enforces its share of it.
    """
    worker_connections = max(16, int(open_files) - FD_RESERVE)
    worker_exchanges = max(1, min(DEFAULT_WORKER_EXCHANGES, worker_connections * 3 // 4))
    total = worker_exchanges * workers if max_connections is None else int(max_connections)
    if total < 1:
        raise KcryptError("max_connections must be at least 1, not %d" % total)
    worker_exchanges = min(worker_exchanges, total)
    per_client = max(1, total // 4) if max_connections_per_client is None else int(max_connections_per_client)
    if per_client < 0:
        raise KcryptError("max_connections_per_client must be 0 (no limit) or more, not %d" % per_client)
    per_client_in_a_worker = min(worker_connections, int(math.ceil(per_client / float(workers)))) if per_client else 0
    return ConnectionLimits(total, worker_exchanges, worker_connections, per_client_in_a_worker)


def client_address(address):
    """The address a peer is counted under: the IP without port; IPv4-mapped IPv6 as plain IPv4."""
    host = address[0] if isinstance(address, tuple) and address else str(address)
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class _Slot:
    """One accepted connection's place in the counts; released exactly once, whichever way it ends."""

    __slots__ = ("_listener", "peer", "_released")

    def __init__(self, listener, peer):
        self._listener, self.peer, self._released = listener, peer, False

    def release(self):
        if not self._released:
            self._released = True
            self._listener._release(self.peer)


# The smallest frame aiohttp's WebSocket reader refuses as a protocol error (FIN + RSV2, opcode 0, masked,
# empty): fed to it after an unmasked client frame, so aiohttp closes with 1002 and reports the error.
_PROTOCOL_ERROR_FRAME = b"\xa0\x80\x00\x00\x00\x00"
UNMASKED_FRAME = "the client sent an unmasked WebSocket frame (RFC 6455 section 5.1 requires closing)"


class _MaskedFramesOnly:
    """aiohttp's WebSocket reader, after a check that every client frame is masked.

    Walks the frame headers only (payloads are skipped), so it costs a few operations per frame.
    """

    __slots__ = ("_reader", "_connection", "_header", "_skip", "_failed")

    def __init__(self, reader, connection):
        self._reader, self._connection = reader, connection
        self._header, self._skip, self._failed = b"", 0, False

    def feed_eof(self):
        self._reader.feed_eof()

    def feed_data(self, data):
        if self._failed:
            return True, b""
        if not self._all_masked(data):
            self._failed = True
            self._connection.frame_error = UNMASKED_FRAME
            self._reader.feed_data(_PROTOCOL_ERROR_FRAME)
            return True, b""
        return self._reader.feed_data(data)

    def _all_masked(self, data):
        position, end = 0, len(data)
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            header = self._header + data[position:position + 14]  # 14 bytes: the longest frame header
            if len(header) < 2:
                self._header = header
                return True
            if not header[1] & 0x80:
                return False
            length = header[1] & 0x7F
            extended = 2 if length == 126 else 8 if length == 127 else 0
            size = 2 + extended + 4
            if len(header) < size:
                self._header = header  # the rest of this chunk: the header continues in the next one
                return True
            if extended:
                length = int.from_bytes(header[2:2 + extended], "big")
            position += size - len(self._header)
            self._header, self._skip = b"", length
        return True


if web_protocol is not None:

    class _Connection(web_protocol.RequestHandler):
        """aiohttp's HTTP connection, counted by its listener and with masked WebSocket frames only."""

        __slots__ = ("_slot", "frame_error")

        def __init__(self, slot, manager, **options):
            super().__init__(manager, **options)
            self._slot = slot
            self.frame_error = ""

        def connection_lost(self, exc):
            try:
                super().connection_lost(exc)
            finally:
                self._slot.release()

        def set_parser(self, parser, *args, **kwargs):
            super().set_parser(_MaskedFramesOnly(parser, self), *args, **kwargs)


class Listener:
    """Accepts connections for an aiohttp ``AppRunner`` within ``limits`` (see the module docstring).

    ``options`` are the keyword arguments of aiohttp's connection handler (the ones given to the runner).
    ``metrics`` (a Metrics) counts open connections and refusals.
    """

    def __init__(self, runner, options, limits, request_timeout, ssl_context=None, metrics=None):
        self.runner, self.options, self.limits = runner, dict(options), limits
        self.request_timeout, self.ssl_context, self.metrics = float(request_timeout), ssl_context, metrics
        self.open = 0
        self._per_client = {}
        self._sockets = []
        self._reading = False
        self._pending = set()  # connections in their TLS handshake
        self._backoff = 0.0
        self._resume_handle = None
        self._loop = None

    async def start(self, host, port, reuse_port=False, backlog=1024):
        """Listen on every address of ``host`` (one port for all); returns the port."""
        self._loop = asyncio.get_running_loop()
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as error:
            raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error)) from None
        seen = set()
        try:
            for family, kind, proto, _name, address in infos:
                if (family, address[0]) in seen:
                    continue
                seen.add((family, address[0]))
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(self._sockets) > 1:  # port 0: every address on the first one's port
                    address = (address[0], self._sockets[0].getsockname()[1]) + tuple(address[2:])
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError as error:
            self._close_sockets()
            raise KcryptError("cannot listen on %s:%s: %s" % (host, port, error.strerror or error)) from None
        self._resume()
        return self._sockets[0].getsockname()[1]

    async def stop(self):
        """Stop accepting and drop connections still in their TLS handshake (the runner closes the rest)."""
        self._pause()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self._close_sockets()
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _close_sockets(self):
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    # -- the accept loop ---------------------------------------------------------

    def _resume(self):
        self._resume_handle = None
        if not self._reading and self._sockets and self.open < self.limits.worker_connections:
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)
            self._reading = True

    def _pause(self):
        if self._reading:
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())
            self._reading = False

    def _accept(self, sock):
        for dummy in range(ACCEPT_BATCH):
            if self.open >= self.limits.worker_connections:
                self._pause()  # the kernel's backlog holds new connections until one of ours closes
                return
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                self._backoff = 0.0
                return
            except OSError as error:
                if error.errno in GONE_ERRNOS:
                    continue
                self._back_off(error)
                return
            peer = client_address(address)
            if self.limits.per_client and self._per_client.get(peer, 0) >= self.limits.per_client:
                conn.close()
                if self.metrics is not None:
                    self.metrics.refused("per_client")
                log.warning("refused a connection from %s: it holds %d (max_connections_per_client per worker)",
                            peer, self.limits.per_client)
                continue
            self._admit(conn, peer)

    def _back_off(self, error):
        """accept() failed for want of resources: pause, then try again, doubling the pause up to BACKOFF_MAX."""
        self._pause()
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 or BACKOFF_FIRST)
        kind = "out of file descriptors" if error.errno in RESOURCE_ERRNOS else "failing"
        log.error("accepting connections is %s (%s, %d connections open); pausing %.1fs",
                  kind, error.strerror or error, self.open, self._backoff)
        self._resume_handle = self._loop.call_later(self._backoff, self._resume)

    def _admit(self, conn, peer):
        self.open += 1
        self._per_client[peer] = self._per_client.get(peer, 0) + 1
        if self.metrics is not None:
            self.metrics.open_connections = self.open
        slot = _Slot(self, peer)
        try:
            conn.setblocking(False)
        except OSError:
            conn.close()
            slot.release()
            return
        task = self._loop.create_task(self._serve(conn, slot))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve(self, conn, slot):
        server, options, loop = self.runner.server, self.options, self._loop

        def protocol():
            return _Connection(slot, server, loop=loop, **options)

        try:
            await loop.connect_accepted_socket(
                protocol, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.request_timeout if self.ssl_context is not None else None,
            )
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            log.info("connection from %s dropped before its request: %s", slot.peer, _describe(error))
            conn.close()
            slot.release()
        except asyncio.CancelledError:
            conn.close()
            slot.release()
            raise
        except Exception:  # a bug; the connection's place must not leak with it
            log.exception("setting up the connection from %s failed", slot.peer)
            conn.close()
            slot.release()

    def _release(self, peer):
        self.open -= 1
        count = self._per_client.get(peer, 0) - 1
        if count > 0:
            self._per_client[peer] = count
        else:
            self._per_client.pop(peer, None)
        if self.metrics is not None:
            self.metrics.open_connections = self.open
        if not self._reading and self._resume_handle is None and self._sockets:
            self._resume()


def _describe(error):
    if isinstance(error, asyncio.TimeoutError):
        return "no TLS handshake within the request timeout"
    return str(error) or type(error).__name__
