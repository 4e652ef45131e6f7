# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the challenger for tests: in a background thread (fast) or as the real CLI process.

``ChallengerThread`` serves a Challenger on 127.0.0.1 on its own event loop in a
daemon thread; ``ChallengerProcess`` runs ``bin/kcrypt-challenger serve`` and waits
for /healthz. Both stop what they started, also when the test fails.
``soft_attest`` drives one newest-protocol exchange with a SoftTPM over a raw
websocket-client connection, for tests that need to send exactly chosen frames.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import websocket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import server
from support.process import stop as stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ChallengerThread:
    def __init__(self, challenger, ssl_context=None, loop_factory=None):
        self.challenger = challenger
        self.ssl_context = ssl_context
        self.loop_factory = loop_factory or asyncio.new_event_loop
        self.port = None
        self._loop = None
        self._stop = None
        self._thread = None
        self._error = None

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.ssl_context else "http", self.port)

    @property
    def ws_url(self):
        return self.url.replace("http", "ws", 1)

    def start(self):
        started = threading.Event()

        def run():
            self._loop = self.loop_factory()
            asyncio.set_event_loop(self._loop)
            self._stop = asyncio.Event()

            def on_started(port):
                self.port = port
                started.set()

            try:
                self._loop.run_until_complete(
                    server.serve_forever(self.challenger, "127.0.0.1", 0, self.ssl_context, on_started, self._stop)
                )
            except BaseException as error:  # reported to the test by start()
                self._error = error
                started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="challenger", daemon=True)
        self._thread.start()
        if not started.wait(10) or self._error is not None:
            raise RuntimeError("challenger did not start: %r" % (self._error,))
        return self

    def stop(self):
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ChallengerProcess:
    """``kcrypt-challenger serve`` as a subprocess (the real entry point)."""

    def __init__(self, args, port, env=None, log_path=None, tls=False, preexec_fn=None):
        self.args = list(args)
        self.port = port
        self.env = env
        self.log_path = log_path
        self.tls = tls
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. a lower open-file limit)
        self.process = None

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    # Startup is ~0.7 s on a quiet machine, but it creates the store with fsync'd writes: in CI, next to
    # other workers' in-place encryptions on loop devices, that has taken more than 15 s.
    def start(self, timeout=60):
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger")] + self.args,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=self.preexec_fn,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("kcrypt-challenger exited with %s; see %s" % (self.process.returncode, self.log_path))
            try:
                context = ssl._create_unverified_context() if self.tls else None  # only probing liveness
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=context) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("kcrypt-challenger did not answer /healthz within %ss%s" % (timeout, self._log_tail()))

    def _log_tail(self, lines=10):
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as handle:
            return "; its log ends with:\n" + "".join(handle.readlines()[-lines:])

    def stop(self):
        stop_process(self.process)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def connect(ws_url, path=protocol.ATTESTATION_PATH, headers=None, timeout=10):
    header = ["%s: %s" % item for item in (headers or {"label": "COS_PERSISTENT", "name": "", "uuid": ""}).items()]
    return websocket.create_connection(ws_url + path, header=header, timeout=timeout, suppress_origin=True)


def soft_attest(ws_url, soft_tpm, label="COS_PERSISTENT", nonce=True, defer=False, headers=None):
    """One newest-protocol exchange; returns the final response dict (passphrase or error)."""
    headers = headers or {"label": label, "name": "", "uuid": ""}
    ws = connect(ws_url, headers=headers)
    try:
        ws.send(protocol.write_json(soft_tpm.init_message(defer)))
        challenge = protocol.load_json_object(ws.recv(), "challenge")
        if "challenge" not in challenge:
            return challenge
        ws.send(protocol.write_json(soft_tpm.proof_message(challenge, nonce=nonce)))
        return protocol.load_json_object(ws.recv(), "response")
    finally:
        ws.close()
