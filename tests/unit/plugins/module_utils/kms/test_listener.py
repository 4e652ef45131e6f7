# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""listener.py on loopback: the limits' arithmetic, per-client and per-worker connection limits, the TLS
handshake deadline, masked frames only (RFC 6455 5.1), and the log filter that keeps floods out of the log.

The server is the real Challenger over a stub policy (as in test_server.py); connections are raw sockets
(tests/support/raw_ws.py), so each test sends exactly the bytes of the attack it reproduces.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import urllib.request

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import listener, log_limits, server
from support import raw_ws
from support.challenger import ChallengerThread
from support.tls import make_pki


class NoPolicy:
    """A policy no test here should reach."""

    def __getattr__(self, name):
        raise AssertionError("the policy was consulted: %s" % name)


def _kms(limits=None, **settings):
    return ChallengerThread(server.Challenger(NoPolicy(), limits=limits, **settings))


def _limits(**kwargs):
    values = {"max_connections": 64, "worker_exchanges": 64, "worker_connections": 64, "per_client": 0}
    values.update(kwargs)
    return listener.ConnectionLimits(**values)


# -- the arithmetic ----------------------------------------------------------------------------


def test_default_limits_follow_the_open_file_limit():
    small = listener.connection_limits(1024)  # a soft limit nobody raised
    assert small.worker_connections == 1024 - listener.FD_RESERVE
    assert small.worker_exchanges == small.max_connections == (1024 - listener.FD_RESERVE) * 3 // 4
    assert small.per_client == small.max_connections // 4
    big = listener.connection_limits(65536, workers=2)  # LimitNOFILE=65536, two workers
    assert big.worker_exchanges == listener.DEFAULT_WORKER_EXCHANGES  # bounded by memory, not by descriptors
    assert big.max_connections == 2 * listener.DEFAULT_WORKER_EXCHANGES
    assert big.per_client == big.max_connections // 4 // 2  # each worker enforces its half


def test_explicit_limits_and_their_errors():
    limits = listener.connection_limits(65536, workers=4, max_connections=100, max_connections_per_client=0)
    assert (limits.max_connections, limits.worker_exchanges, limits.per_client) == (100, 100, 0)
    assert listener.connection_limits(65536, workers=3, max_connections=100, max_connections_per_client=10).per_client == 4
    with pytest.raises(KcryptError, match="max_connections must be at least 1"):
        listener.connection_limits(1024, max_connections=0)
    with pytest.raises(KcryptError, match="max_connections_per_client must be 0"):
        listener.connection_limits(1024, max_connections_per_client=-1)


def test_raising_the_open_files_limit_reaches_the_hard_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        now, before = listener.raise_open_files_limit()
        assert before == min(256, hard)
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else now)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- per client, per worker ----------------------------------------------------------------------


def _metric(kms, name, source="127.0.0.3"):
    """Lines of /metrics starting with ``name``, asked from ``source`` (not an address a test holds at its limit)."""
    with raw_ws.RawSocket(kms.port, source=source) as sock:
        sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = sock.read_http()[2].decode()
    return [line for line in text.splitlines() if line.startswith(name)]


def test_one_address_cannot_take_every_connection():
    """19,800 WebSockets from one address (issue 14.7): an address holds at most per_client connections."""
    with _kms(_limits(per_client=3)) as kms:
        held = [raw_ws.RawSocket(kms.port) for dummy in range(3)]
        try:
            with raw_ws.RawSocket(kms.port) as extra:
                assert extra.closed_by_server(5)  # closed at accept
            with raw_ws.RawSocket(kms.port, source="127.0.0.2") as other:  # another client is served
                other.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert other.read_http()[0] == 200
            time.sleep(0.2)  # its slot is released
            refused = _metric(kms, 'kcrypt_connections_refused_total{reason="per_client"}')
            opened = _metric(kms, "kcrypt_connections_open ")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)  # the server sees the three closes
        with raw_ws.RawSocket(kms.port) as again:  # the slots came back
            again.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.read_http()[0] == 200
    assert refused == ['kcrypt_connections_refused_total{reason="per_client"} 1']
    assert opened == ["kcrypt_connections_open 4"]  # the 3 held and the /metrics request


def test_at_the_worker_connection_limit_new_connections_wait_in_the_backlog():
    """No accept() beyond the limit, so no EMFILE: the next connection is served as soon as one closes."""
    with _kms(_limits(worker_connections=4), request_timeout=30.0) as kms:
        held = [raw_ws.RawSocket(kms.port) for dummy in range(4)]
        waiting = raw_ws.RawSocket(kms.port)  # the kernel completes the TCP handshake; the server does not accept
        try:
            waiting.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            waiting.sock.settimeout(1.0)
            with pytest.raises(socket.timeout):
                waiting.sock.recv(1)
            held.pop().close()
            waiting.sock.settimeout(5.0)
            started = time.monotonic()
            assert waiting.read_http()[0] == 200
            assert time.monotonic() - started < 3
        finally:
            waiting.close()
            for sock in held:
                sock.close()


def test_a_tls_client_that_never_says_hello_is_dropped_at_the_request_timeout(tmp_path):
    """asyncio's default TLS handshake timeout is 60 s (issue 14.7); ours is request_timeout."""
    pki = make_pki(str(tmp_path))
    context = server.tls_context(pki["server.pem"], pki["server.key"])
    with ChallengerThread(server.Challenger(NoPolicy(), request_timeout=1.0), ssl_context=context) as kms:
        with raw_ws.RawSocket(kms.port) as silent:
            started = time.monotonic()
            assert silent.closed_by_server(10)
            assert 0.8 < time.monotonic() - started < 4
        client = ssl.create_default_context(cafile=pki["ca.pem"])
        assert urllib.request.urlopen(kms.url + "/healthz", timeout=5, context=client).status == 200


def test_an_idle_connection_is_dropped_at_the_request_timeout():
    with _kms(request_timeout=1.0) as kms, raw_ws.RawSocket(kms.port) as sock:
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a request that never ends (slowloris)
        started = time.monotonic()
        assert sock.closed_by_server(10)
        assert 0.8 < time.monotonic() - started < 4


# -- masked frames only -----------------------------------------------------------------------------


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-the-101", "in-the-same-packet-as-the-request"])
def test_an_unmasked_client_frame_closes_with_1002(pipelined, caplog):
    init = raw_ws.frame(raw_ws.OP_TEXT, b'{"ek_public": "AAAA"}', masked=False)
    with _kms(first_message_timeout=5.0) as kms, raw_ws.RawSocket(kms.port) as sock, caplog.at_level(logging.INFO, logger="kcrypt.audit"):
        if pipelined:
            assert sock.upgrade(pipelined=init)[0] == 101
        else:
            assert sock.upgrade()[0] == 101
            sock.send(init)
        frames = sock.read_until_close()
        time.sleep(0.1)
    assert frames and frames[-1][0] == raw_ws.OP_CLOSE and raw_ws.close_code(frames[-1][1]) == 1002
    assert not [f for f in frames if f[0] == raw_ws.OP_TEXT]  # the frame was never parsed as an init
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kcrypt.audit"]
    assert "outcome=bad_request" in line and "unmasked WebSocket frame" in line


def test_masked_frames_are_walked_across_any_split():
    """The header walk sees frames cut anywhere (here: byte by byte) and never looks into payloads."""
    fed = []

    class Reader:
        def feed_data(self, data):
            fed.append(data)
            return False, b""

    class Connection:
        frame_error = ""

    stream = (raw_ws.frame(raw_ws.OP_TEXT, b"\x00" * 70000)  # 64-bit length; an unmasked-looking payload
              + raw_ws.frame(raw_ws.OP_PING, b"p") + raw_ws.frame(raw_ws.OP_BINARY, b"x" * 300))
    walker = listener._MaskedFramesOnly(Reader(), Connection())
    for index in range(len(stream)):
        assert walker.feed_data(stream[index:index + 1]) == (False, b"")
    assert b"".join(fed) == stream
    bad = listener._MaskedFramesOnly(Reader(), Connection())
    assert bad.feed_data(raw_ws.frame(raw_ws.OP_TEXT, b"ok") + raw_ws.frame(raw_ws.OP_TEXT, b"x", masked=False)) == (True, b"")


# -- the log stays small -------------------------------------------------------------------------------


def test_repeat_filter_passes_a_burst_then_reports_what_it_held_back():
    now = [0.0]
    repeat = log_limits.RepeatFilter(burst=3, window=10.0, clock=lambda: now[0])
    records = [logging.LogRecord("kcrypt.challenger", logging.ERROR, __file__, 1, "accept failed: %s", ("EMFILE",), None)
               for dummy in range(10)]
    assert [repeat.filter(r) for r in records] == [True] * 3 + [False] * 7
    other = logging.LogRecord("kcrypt.challenger", logging.ERROR, __file__, 1, "another message", (), None)
    assert repeat.filter(other)  # counted apart
    audit = [logging.LogRecord("kcrypt.audit", logging.WARNING, __file__, 1, "attestation %s", ("x",), None) for dummy in range(20)]
    assert all(repeat.filter(r) for r in audit)  # one audit line per exchange, always
    now[0] = 10.5
    later = logging.LogRecord("kcrypt.challenger", logging.ERROR, __file__, 1, "accept failed: %s", ("EMFILE",), None)
    assert repeat.filter(later)
    assert later.getMessage() == "accept failed: EMFILE (and 7 more like it in the previous 10s, not logged)"


def test_http_error_logger_keeps_tracebacks_of_real_errors(caplog):
    from aiohttp import http_exceptions

    adapter = log_limits.HttpErrorLogger(logging.getLogger("aiohttp.server"))
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        adapter.exception("Error handling request from %s", "10.0.0.1", exc_info=http_exceptions.BadStatusLine(b"\x16\x03"))
        try:
            raise RuntimeError("a bug in a handler")
        except RuntimeError as error:
            adapter.exception("Error handling request from %s", "10.0.0.2", exc_info=error)
    first, second = caplog.records
    assert first.levelno == logging.WARNING and not first.exc_info
    assert first.getMessage().startswith("malformed HTTP request from 10.0.0.1 refused (400): 400, message:")
    assert second.levelno == logging.ERROR and second.exc_info
