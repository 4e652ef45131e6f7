# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A mutation fuzzer for the challenger's endpoints, over raw sockets (tests/support/raw_ws.py).

Every case starts from what a real node sends (a SoftTPM's init, proof, legacy token, answer and payload)
and breaks one thing, at one layer: the HTTP upgrade, the WebSocket framing, the JSON, the base64, or the
TPM structures inside it. Each case is one connection; its observation is what the server answered (HTTP
status, frames, close code). ``Campaign.run`` returns counts that tests assert on and bench/fuzz.py prints.

Deterministic for a seed: a failure report names the seed and the case number, and ``Campaign.case(n)``
replays it.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import json
import random
import socket
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from support import raw_ws

ENDPOINTS = ("attestation", "legacy-get", "legacy-post", "http")
# What a server may end a connection with when the store works: normal, protocol error, invalid UTF-8,
# policy violation, too big. 1011 ("KMS temporarily unavailable") only when the store fails: never here.
ALLOWED_CLOSE_CODES = {1000, 1002, 1007, 1008, 1009}
INTERESTING_BYTES = b"\x00\xff\x7f\x80\"\\{}[]:,\n\r\t \xc3\xa9\xe2\x80\xa8"
INTERESTING_JSON = [None, True, False, 0, -1, 2 ** 63, 2 ** 64 + 1, 1e308, -0.0, "", "A", "\u00b2", "\u0661", "\ud7ff",
                    "=" * 4, "AAAA", "A" * 5000, [], {}, [[[]]], {"a": {"b": {}}}, "\u0000", 7, "07", "24"]


class Observation:
    """What the server did with one case."""

    __slots__ = ("status", "frames", "close_code", "error")

    def __init__(self, status=None, frames=(), error=""):
        self.status = status
        self.frames = list(frames)
        closes = [payload for opcode, payload in self.frames if opcode == raw_ws.OP_CLOSE]
        self.close_code = raw_ws.close_code(closes[-1]) if closes and len(closes[-1]) >= 2 else None
        self.error = error

    def texts(self):
        return [payload for opcode, payload in self.frames if opcode in (raw_ws.OP_TEXT, raw_ws.OP_BINARY)]

    def problems(self):
        """What this observation breaks of the server's promises (empty when fine)."""
        found = []
        if self.status is not None and self.status >= 500:
            found.append("HTTP %d" % self.status)
        if self.close_code is not None and self.close_code not in ALLOWED_CLOSE_CODES:
            found.append("close code %d" % self.close_code)
        for text in self.texts():
            if b"internal error" in text or b"Traceback" in text:
                found.append("internal error text: %r" % text[:200])
        return found


class Mutator:
    """Byte-, JSON- and TPM-structure-level mutations, drawn from one random.Random."""

    def __init__(self, rng):
        self.rng = rng

    def bytes(self, data):
        rng, data = self.rng, bytearray(data)
        if not data:
            return bytes(rng.choice([b"{", b"\x00", b"[" * 100]))
        kind = rng.randrange(8)
        position = rng.randrange(len(data))
        if kind == 0:
            data[position] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[position] = rng.choice(INTERESTING_BYTES)
        elif kind == 2:
            del data[position:position + rng.randint(1, 64)]
        elif kind == 3:
            chunk = data[position:position + rng.randint(1, 64)]
            data[position:position] = chunk * rng.randint(1, 8)
        elif kind == 4:
            del data[position:]
        elif kind == 5:
            data[position:position] = b"[" * rng.choice([2, 70, 5000, 60000])
        elif kind == 6:
            data[position:position] = bytes(rng.getrandbits(8) for dummy in range(rng.randint(1, 32)))
        else:
            for dummy in range(rng.randint(2, 10)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
        return bytes(data)

    def json_value(self, depth=0):
        rng = self.rng
        if depth < 2 and rng.random() < 0.2:
            return {self.key(): self.json_value(depth + 1) for dummy in range(rng.randint(0, 3))}
        if depth < 2 and rng.random() < 0.2:
            return [self.json_value(depth + 1) for dummy in range(rng.randint(0, 3))]
        if rng.random() < 0.3:
            return base64.b64encode(bytes(rng.getrandbits(8) for dummy in range(rng.choice([0, 1, 16, 32, 256, 600])))).decode()
        return rng.choice(INTERESTING_JSON)

    def key(self):
        return self.rng.choice(["ek_public", "ak_params", "Public", "CreateData", "secret", "pcr_quote", "quote", "pcrs",
                                "EK", "AK", "Secret", "passphrase", "EC", "defer_pcr_enrollment", "x", "", "\u00e9", "0", "7"])

    def json(self, obj):
        """A copy of ``obj`` with one value replaced, removed, added, or a base64 field's bytes mutated."""
        obj = json.loads(json.dumps(obj))
        paths = list(_paths(obj))
        rng = self.rng
        if not paths or rng.random() < 0.1:
            obj[self.key()] = self.json_value()
            return obj
        path = rng.choice(paths)
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        value = parent[last]
        choice = rng.randrange(5)
        if choice == 0 and isinstance(value, str):
            parent[last] = self._mutate_base64(value)
        elif choice == 1 and isinstance(parent, dict):
            del parent[last]
        elif choice == 2 and isinstance(parent, dict):
            parent[last.upper() if rng.random() < 0.5 else last + "x"] = parent.pop(last)
        else:
            parent[last] = self.json_value()
        return obj

    def _mutate_base64(self, text):
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            return self.bytes(text.encode()).decode("latin-1")
        if self.rng.random() < 0.8:  # the TPM structure / DER inside, still valid base64
            return base64.b64encode(self.bytes(raw)).decode()
        return self.bytes(text.encode()).decode("latin-1")

    def text(self, obj):
        """A JSON frame: a mutated object, or the valid one's bytes mutated."""
        if self.rng.random() < 0.6:
            return protocol.write_json(self.json(obj)).encode("utf-8", "surrogatepass")
        return self.bytes(protocol.write_json(obj).encode())

    def frame(self, payload):
        """A client frame carrying ``payload`` with its framing broken, or a well-formed one."""
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return raw_ws.frame(raw_ws.OP_TEXT, payload, masked=False)
        if kind == 1:
            return raw_ws.frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xF]), payload)
        if kind == 2:
            return raw_ws.frame(raw_ws.OP_TEXT, payload, rsv=rng.randint(1, 7))
        if kind == 3:
            half = len(payload) // 2
            return raw_ws.frame(raw_ws.OP_TEXT, payload[:half], fin=False) + raw_ws.frame(raw_ws.OP_CONTINUATION, payload[half:])
        if kind == 4:
            return raw_ws.frame(raw_ws.OP_PING, payload[:rng.choice([0, 125, 126, 200])])
        if kind == 5:
            code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
            return raw_ws.frame(raw_ws.OP_CLOSE, code.to_bytes(2, "big") + rng.choice([b"", b"\xff\xfe", b"bye"]))
        if kind == 6:  # a length that promises more than comes
            head = raw_ws.frame(raw_ws.OP_TEXT, payload)
            return head[:1] + bytes([0x80 | 127]) + (2 ** 62).to_bytes(8, "big") + head[2:6]
        if kind == 7:
            return raw_ws.frame(raw_ws.OP_BINARY, payload)
        return raw_ws.frame(raw_ws.OP_TEXT, payload)

    def upgrade(self, path, headers):
        """The upgrade request with one header or line broken."""
        request = raw_ws.upgrade_request(path, headers)
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            return self.bytes(request[:-4]) + b"\r\n\r\n"
        if kind == 1:
            return request.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: " + bytes([rng.choice(b"\xc3\xa9\x00 =")]))
        if kind == 2:
            return request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: " + rng.choice([b"7", b"", b"\xff", b"13, 8"]))
        if kind == 3:
            return request[:-2] + b"X-" + bytes(rng.getrandbits(8) | 0x20 for dummy in range(8)) + b": " + b"v" * rng.choice([1, 9000, 40000]) + b"\r\n\r\n"
        if kind == 4:
            return request.replace(b"GET", rng.choice([b"POST", b"G\x00T", b"get", b"PRI"]), 1)
        return request.replace(b"HTTP/1.1", rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b"HTTP/1.1\x00"]), 1)


def _paths(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield prefix + (key,)
        if isinstance(value, (dict, list)):
            yield from _paths(value, prefix + (key,))


class Campaign:
    """Fuzz cases against a challenger on 127.0.0.1:``port``; ``node`` is an enrolled SoftTPM."""

    def __init__(self, port, node, seed=0, timeout=10.0, linger=0.5, parallel=16):
        """``linger``: how long a case waits for the server to close after its last frame (a server waiting for
        more data is not a finding: the unit tests cover its deadlines); ``parallel``: cases in flight at once."""
        self.port, self.node, self.seed, self.timeout, self.linger, self.parallel = port, node, seed, timeout, linger, parallel
        self.init = json.loads(protocol.write_json(node.init_message()))
        self.token_body = json.loads(base64.b64decode(node.legacy_token()[len(protocol.BEARER_PREFIX):]))

    def case(self, endpoint, number):
        """Observation of case ``number`` of ``endpoint`` (the same bytes for the same seed)."""
        rng = random.Random("%s/%s/%d" % (self.seed, endpoint, number))
        return getattr(self, "_" + endpoint.replace("-", "_"))(Mutator(rng), rng)

    def run(self, cases_per_endpoint, endpoints=ENDPOINTS, on_case=None):
        """Run every case; returns a Counter of outcomes and a list of (endpoint, number, problems)."""
        outcomes, failures = collections.Counter(), []
        work = [(endpoint, number) for endpoint in endpoints for number in range(cases_per_endpoint)]
        with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            for (endpoint, number), observation in zip(work, pool.map(lambda item: self.case(*item), work)):
                outcomes[(endpoint, _outcome(observation))] += 1
                problems = observation.problems()
                if problems:
                    failures.append((endpoint, number, problems))
                if on_case is not None:
                    on_case(endpoint, number, observation)
        return outcomes, failures

    # -- one connection ---------------------------------------------------------------------

    def _connect(self):
        return raw_ws.RawSocket(self.port, timeout=self.timeout)

    def _exchange(self, request, steps):
        """Send ``request``; if upgraded, run ``steps(sock)`` (which sends frames), then read until close."""
        try:
            with self._connect() as sock:
                sock.send(request)
                try:
                    status, _headers, _body = sock.read_http()
                except (EOFError, ConnectionError, socket.timeout) as error:
                    return Observation(error="no HTTP response: %s" % error)
                if status != 101:
                    return Observation(status)
                frames = []
                try:
                    steps(sock, frames)
                except (ConnectionError, BrokenPipeError, EOFError, socket.timeout):
                    pass
                sock.sock.settimeout(self.linger)
                frames += sock.read_until_close()
                return Observation(status, frames)
        except (ConnectionError, socket.timeout) as error:
            return Observation(error=str(error))

    # -- the endpoints ------------------------------------------------------------------------

    def _attestation(self, mutator, rng):
        headers = {"label": "COS_PERSISTENT", "name": "", "uuid": ""}
        if rng.random() < 0.5:  # a broken init
            payload = mutator.text(self.init)
            return self._exchange(raw_ws.upgrade_request(protocol.ATTESTATION_PATH, headers),
                                  lambda sock, frames: sock.send(mutator.frame(payload)))

        def steps(sock, frames):  # a valid init, a broken proof
            sock.send(raw_ws.frame(raw_ws.OP_TEXT, protocol.write_json(self.init)))
            opcode, challenge = sock.read_frame()
            frames.append((opcode, challenge))
            proof = self.node.proof_message(json.loads(challenge))
            sock.send(mutator.frame(mutator.text(proof)))

        return self._exchange(raw_ws.upgrade_request(protocol.ATTESTATION_PATH, headers), steps)

    def _token(self, mutator, rng):
        kind = rng.randrange(3)
        if kind == 0:  # the JSON (and the TPM structures inside it)
            body = protocol.go_json(mutator.json(self.token_body)).encode("utf-8", "surrogatepass")
            return protocol.BEARER_PREFIX + base64.b64encode(body).decode()
        if kind == 1:  # the base64 text
            return protocol.BEARER_PREFIX + mutator.bytes(self.node.legacy_token()[len(protocol.BEARER_PREFIX):].encode()).decode("latin-1")
        return rng.choice(["", "Bearer", "Bearer TPM", "bearer tpm" + self.node.legacy_token()[10:], "Basic eA=="])

    def _legacy_get(self, mutator, rng):
        return self._legacy(protocol.GET_PASS_PATH, mutator, rng, payload=False)

    def _legacy_post(self, mutator, rng):
        return self._legacy(protocol.POST_PASS_PATH, mutator, rng, payload=True)

    def _legacy(self, path, mutator, rng, payload):
        headers = {"label": "COS_PERSISTENT", "name": "", "uuid": ""}
        kind = rng.randrange(3 if payload else 2)
        if kind == 0:  # a broken token: the server must close without a payload
            token = self._token(mutator, rng)
            request = raw_ws.upgrade_request(path, dict(headers, Authorization=token.encode("latin-1", "replace").decode("latin-1")))
            return self._exchange(request, lambda sock, frames: None)

        def steps(sock, frames):
            opcode, challenge = sock.read_frame()
            frames.append((opcode, challenge))
            answer = self.node.legacy_answer(challenge)
            if kind == 1:  # a broken answer
                sock.send(mutator.frame(mutator.text(json.loads(answer))))
                return
            sock.send(raw_ws.frame(raw_ws.OP_BINARY, answer))  # a broken /postPass payload
            valid = {"passphrase": "QUJD", "error": "", "generated_by": "tpm"}
            sock.send(mutator.frame(mutator.text(valid)))

        return self._exchange(raw_ws.upgrade_request(path, dict(headers, Authorization=self.node.legacy_token())), steps)

    def _http(self, mutator, rng):
        path = rng.choice([protocol.ATTESTATION_PATH, protocol.GET_PASS_PATH, "/healthz", "/metrics", "//getPass", "/x"])
        request = mutator.upgrade(path, {"label": "COS_PERSISTENT"})
        return self._exchange(request, lambda sock, frames: sock.send(mutator.frame(b"{}")))


def _outcome(observation):
    if observation.status is None:
        return "no-response"
    if observation.status != 101:
        return "http-%d" % observation.status
    if observation.close_code is not None:
        return "close-%d" % observation.close_code
    return "closed" if not observation.texts() else "frames"


def rss_kb(pid):
    """VmRSS of ``pid`` in kB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def store_snapshot(db_path):
    """Every row of the SQLite store (documents, resource versions, encrypted secrets) to compare before/after."""
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        return (conn.execute("SELECT name, tpm_hash, resource_version, document FROM sealed_volumes ORDER BY name").fetchall(),
                conn.execute("SELECT name, resource_version, metadata, nonce, ciphertext FROM secrets ORDER BY name").fetchall())


def elapsed_since(started):
    return time.monotonic() - started
