# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Attestation benchmark: kcrypt-challenger (ws://, wss://) against Tang, on this machine.

    .venv/bin/python bench/attestation.py [--clients 50] [--rounds 20] [--burst 500] [--runs 3]
        [--scenarios floor,first,enrolled,burst,share,thread,wss,tang] [--client-processes N] [--workers N]

Each run starts fresh servers and measures, in this order (``--scenarios`` picks a subset; a
scenario on an enrolled challenger gets a fresh one and the enrolment, unmeasured, before it):

* ``floor``    aiohttp floor — the same four messages against a bare aiohttp handler (no
  crypto, no store, no logging): what the WebSocket exchange alone costs on this machine;
* ``first``    kcrypt ws://  first contact — every simulated node enrols (TOFU, SQLite writes);
* ``enrolled`` kcrypt ws://  enrolled — ``--clients`` nodes attest ``--rounds`` times each, closed loop;
* ``burst``    kcrypt ws://  burst — ``--burst`` enrolled nodes connect at the same moment, once each;
  twice: nonce-bound quotes, then quotes without nonce as upstream HEAD Kairos nodes send them;
* ``share``    kcrypt ws://  burst, server share — the server's part of a burst: ``--burst`` nodes connect
  and send their init at the same moment, then (unmeasured) do their TPM work, then send their proofs at
  the same moment; a node's figure is how long it waited for the KMS in the two waves. Real nodes do
  their TPM work on their own hardware, so this is the latency a KMS adds to a fleet booting at once
  (the ``burst`` rows include the simulated nodes' RSA work, which here shares the server's cores);
* ``thread``   kcrypt ws://  enrolled, thread — as "enrolled" with ``--store-calls thread``;
* ``wss``      kcrypt wss:// enrolled — as above over TLS terminated in the challenger process;
* ``tang``     tang recovery — ``--clients`` clevis-like clients, one McCallum-Relyea key
  recovery per connection (``POST /rec/<kid>``), tangd spawned per connection like
  Debian's tangd.socket (Accept=yes) does.

Nodes are software TPM identities (tests/support/soft_tpm.py: RSA-2048 EK and AK,
byte-exact go-attestation structures, nonce-bound quotes unless ``--head-quotes``);
the server cannot tell them from TPMs. They speak WebSocket through a small hand-written
client on asyncio streams (``WebSocket`` below), not aiohttp's: real nodes are separate
machines, and the aiohttp client's CPU per exchange would dominate the measurement on a
machine shared with the server. Clients run in their own process(es): the burst's nodes
are split over ``--client-processes`` (default: one per CPU) released at the same moment;
the closed loops use one client process, leaving the other core to the server.

Columns: attestations/s (wall); p50/p99 latency seen by the node (connect to passphrase;
for Tang, connect to answer); server CPU per attestation, read from the server process
(/proc/PID/task/*/schedstat, ns) plus its live children (``--workers`` processes; for Tang
the reaped tangd children); client CPU per attestation, the client process(es)' CPU time
during the measured phase only (not key loading or node setup). For a burst, a line gives
the lower bound the machine allows for its latency: (server + client CPU) × n / CPUs.
Server CPU per attestation is the stable figure; throughput and latency depend on what else
runs on the machine (printed: load average). Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _checkout  # noqa: E402

_checkout.setup()

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import attestation  # noqa: E402
from support import soft_tpm  # noqa: E402
from support.tls import make_pki  # noqa: E402
from support.process import children as child_pids, stop as stop_process  # noqa: E402
from support.ports import free_port  # noqa: E402

TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- server processes and their CPU time ---------------------------------------


def _threads_ns(pid):
    """CPU time of every thread of ``pid`` in ns (0 for a process that is gone)."""
    total = 0
    task_dir = "/proc/%d/task" % pid
    try:
        tids = os.listdir(task_dir)
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "schedstat")) as handle:
                total += int(handle.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total


def cpu_seconds(pid, children=False, live=False):
    """CPU time of ``pid``: all its threads (ns resolution), plus reaped children (ticks) if asked, plus
    the threads of its live children if asked (long-lived workers: one that ends between two readings
    would take its CPU time with it)."""
    total = _threads_ns(pid)
    if live:
        total += sum(_threads_ns(child) for child in child_pids(pid))
    seconds = total / 1e9
    if children:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        seconds += (int(fields[13]) + int(fields[14])) / CLK_TCK  # cutime, cstime
    return seconds


def wait_http(url, context=None, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not answer" % url)


class Process:
    def __init__(self, args, log_path):
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self):
        return self.popen.pid

    def stop(self):
        stop_process(self.popen)


def start_challenger(workdir, tls=None, extra=()):
    port = free_port()
    args = [sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger"), "serve", "--listen", "127.0.0.1:%d" % port,
            "--store", "sqlite://%s/kms.db" % workdir, "--log-level", "info"] + list(extra)
    context = None
    if tls:
        args += ["--tls-cert", tls["server.pem"], "--tls-key", tls["server.key"]]
        context = ssl.create_default_context(cafile=tls["ca.pem"])
    process = Process(args, os.path.join(workdir, "challenger.log"))
    scheme = "https" if tls else "http"
    wait_http("%s://127.0.0.1:%d/healthz" % (scheme, port), context)
    return process, "%s://127.0.0.1:%d" % (scheme.replace("http", "ws"), port)


TANG_LOOP = r"""
import os, signal, socket, sys
port, keys = int(sys.argv[1]), sys.argv[2]
devnull = os.open(os.devnull, os.O_WRONLY)


def reap(*_):  # collect finished tangd processes so their CPU time lands in our cutime/cstime
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


signal.signal(signal.SIGCHLD, reap)
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(1024)
while True:
    conn, _ = listener.accept()
    fd = conn.fileno()
    # What systemd does for tangd.socket (Accept=yes): one tangd per connection on stdin/stdout.
    os.posix_spawn(%(tangd)r, ["tangd", keys], {}, file_actions=[
        (os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
    conn.close()
""" % {"tangd": TANGD}


BARE_SERVER = r"""
import asyncio, sys
from aiohttp import web

CHALLENGE = '{"challenge":{"Credential":"%s","Secret":"%s"}}\n' % ("A" * 200, "A" * 344)
PASSPHRASE = '{"passphrase":"%s"}\n' % ("A" * 60)


async def exchange(request):  # the same four messages, no crypto, no store: aiohttp's floor
    ws = web.WebSocketResponse(compress=False, max_msg_size=65536)
    await ws.prepare(request)
    await ws.receive(timeout=10)
    await ws.send_str(CHALLENGE)
    await ws.receive(timeout=10)
    await ws.send_str(PASSPHRASE)
    await ws.close()
    return ws


app = web.Application()
app.router.add_get("/tpm-attestation", exchange)
app.router.add_get("/healthz", lambda request: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def start_bare(workdir):
    port = free_port()
    process = Process([sys.executable, "-c", BARE_SERVER, str(port)], os.path.join(workdir, "bare.log"))
    wait_http("http://127.0.0.1:%d/healthz" % port)
    return process, "ws://127.0.0.1:%d" % port


def start_tang(workdir):
    keys = os.path.join(workdir, "tang-keys")
    os.makedirs(keys)
    subprocess.run([TANGD_KEYGEN, keys], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    process = Process([sys.executable, "-c", TANG_LOOP, str(port), keys], os.path.join(workdir, "tang.log"))
    wait_http("http://127.0.0.1:%d/adv" % port)
    return process, "http://127.0.0.1:%d" % port


# -- simulated nodes (run in the client process) ---------------------------------


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_CLOSE = 0x1, 0x8


class Node:
    """A SoftTPM plus the precomputed init message and upgrade request; quotes cached when they need no nonce."""

    def __init__(self, ek_key, ak_key, nonce):
        self.tpm = soft_tpm.SoftTPM(ek_key, ak_key)
        self.init = protocol.write_json(self.tpm.init_message()).encode()
        self.nonce = nonce
        self._quote = None
        self._bare_proof = protocol.write_json({"secret": "A" * 44, "pcr_quote": {"quote": {"version": "2", "quote": "A" * 196,
                                                "signature": "A" * 352}, "pcrs": {"0": "A" * 44, "11": "A" * 44, "7": "A" * 44}}}).encode()
        self._seed = None
        self.request = self.accept = None

    def prepare(self, host, port):
        """The HTTP/1.1 upgrade request to ``host:port`` and the Sec-WebSocket-Accept it must be answered with."""
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.request = (b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                        b"label: COS_PERSISTENT\r\nname: vda5\r\nuuid: \r\n\r\n"
                        % (protocol.ATTESTATION_PATH.encode(), host.encode(), port, key))

    def bare_proof(self):
        """For the floor scenario: a fixed proof, after the same TPM work a real node does (so the server sees the
        same arrival pattern): one EK decryption and one quote signature."""
        if self._seed is None:
            _secret, encrypted = attestation.make_credential(self.tpm.ek_public, self.tpm.ak_name)
            self._seed = encrypted
        self.tpm.activate_credential(self._seed.credential, self._seed.secret)
        if self.nonce:
            self.tpm.quote(qualifying_data=b"n" * 32)
        return self._bare_proof

    def proof(self, challenge):
        ec = protocol.parse_challenge(challenge)
        secret = self.tpm.activate_credential(ec.credential, ec.secret)
        if self.nonce:
            quote, signature = self.tpm.quote(qualifying_data=secret)
        else:  # an upstream HEAD node: the quote does not depend on the exchange
            if self._quote is None:
                self._quote = self.tpm.quote()
            quote, signature = self._quote
        pcr_quote = protocol.PCRQuote(protocol.QUOTE_VERSION, quote, signature, self.tpm.pcr_values())
        return protocol.write_json(protocol.proof_message(secret, pcr_quote)).encode()


class WebSocket:
    """The client side of RFC 6455, just what the four-message exchange needs (masked text frames
    out; unfragmented text and close frames in).

    Hand-written on asyncio streams because it is the load generator: aiohttp's client costs more CPU
    per exchange than the server does, and on a 2-core machine shared with the server that cost,
    not the server, would set the figures."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host, port, node, ssl_context=None):
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        writer.write(node.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            writer.close()
            raise RuntimeError("upgrade refused: %r" % lines[0])
        accept = [value.strip() for name, _sep, value in (line.partition(b":") for line in lines[1:])
                  if name.strip().lower() == b"sec-websocket-accept"]
        if accept != [node.accept]:
            writer.close()
            raise RuntimeError("wrong Sec-WebSocket-Accept: %r" % accept)
        return cls(reader, writer)

    def send(self, payload, opcode=OP_TEXT):
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        keystream = (mask * (length // 4 + 1))[:length]  # one big-int XOR instead of a Python loop per byte
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(length, "big")
        self.writer.write(head + mask + masked)

    async def _frame(self):
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        if second & 0x80 or not first & 0x80:
            raise RuntimeError("unexpected frame from the server: masked or fragmented (0x%02x 0x%02x)" % (first, second))
        return first & 0x0F, await self.reader.readexactly(length)

    async def receive(self, what):
        """The next text frame as a JSON object; an error frame or anything else is a RuntimeError."""
        opcode, payload = await self._frame()
        if opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            raise RuntimeError("closed before the %s: code %s %r" % (what, code, payload[2:]))
        if opcode != OP_TEXT:
            raise RuntimeError("opcode %d instead of the %s: %r" % (opcode, what, payload[:200]))
        message = json.loads(payload)
        if "error" in message:
            raise RuntimeError("error instead of the %s: %r" % (what, message["error"]))
        return message

    async def close(self):
        """Close 1000, then read the server's close: it sends it right after the passphrase, so it is already
        here or on its way (the 1 s bound only guards against a server that never sends it). Reading it costs
        next to nothing and lets the socket end with a FIN: unread data in the receive buffer would make the
        kernel answer with a reset, which the server would see and a real node does not cause."""
        self.send(struct.pack("!H", 1000), OP_CLOSE)
        try:
            await asyncio.wait_for(self._frame(), 1.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, RuntimeError):
            pass
        self.writer.close()


async def attest(host, port, node, ssl_context, bare=False):
    """One attestation; its latency from connect to passphrase."""
    started = time.perf_counter()
    ws = await WebSocket.connect(host, port, node, ssl_context)
    try:
        ws.send(node.init)
        challenge = await ws.receive("challenge")
        ws.send(node.bare_proof() if bare else node.proof(challenge))
        answer = await ws.receive("passphrase")
        if "passphrase" not in answer:
            raise RuntimeError("no passphrase: %r" % sorted(answer))
        elapsed = time.perf_counter() - started
    except BaseException:
        ws.writer.close()
        raise
    await ws.close()
    return elapsed


# Tang client: McCallum-Relyea key recovery as clevis does it, on P-521 (tangd's default ECMR key).
P521 = 2 ** 521 - 1
P521_B = int("0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF109E156193951EC7E937B1652C0BD3BB1BF073"
             "573DF883D2C34F1EF451FD46B503F00", 16)


def _b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _point_add(a, b):
    (x1, y1), (x2, y2) = a, b
    if x1 == x2:
        if (y1 + y2) % P521 == 0:
            return None
        lam = (3 * x1 * x1 - 3) * pow(2 * y1, -1, P521) % P521
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, P521) % P521
    x3 = (lam * lam - x1 - x2) % P521
    return x3, (lam * (x1 - x3) - y1) % P521


class TangClient:
    """Provisioned once (like ``clevis encrypt tang``); ``recover`` is one ``clevis decrypt``'s exchange."""

    def __init__(self, url):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.ec = ec
        self.host, self.port = url.split("://")[1].split(":")
        adv = json.loads(urllib.request.urlopen(url + "/adv").read())
        keys = json.loads(_unb64u(adv["payload"]))["keys"]
        jwk = [k for k in keys if k.get("alg") == "ECMR"][0]
        canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
        self.kid = _b64u(hashlib.sha256(canonical.encode()).digest())
        self.server_key = ec.EllipticCurvePublicNumbers(int.from_bytes(_unb64u(jwk["x"]), "big"),
                                                        int.from_bytes(_unb64u(jwk["y"]), "big"), ec.SECP521R1()).public_key()
        client_key = ec.generate_private_key(ec.SECP521R1())
        numbers = client_key.public_key().public_numbers()
        self.client_point = (numbers.x, numbers.y)  # stored in the JWE header as epk
        self.expected_x = int.from_bytes(client_key.exchange(ec.ECDH(), self.server_key), "big")  # the key clevis derives

    async def recover(self, verify):
        started = time.perf_counter()
        ephemeral = self.ec.generate_private_key(self.ec.SECP521R1())
        numbers = ephemeral.public_key().public_numbers()
        x, y = _point_add(self.client_point, (numbers.x, numbers.y))
        body = json.dumps({"kty": "EC", "crv": "P-521", "x": _b64u(x.to_bytes(66, "big")), "y": _b64u(y.to_bytes(66, "big"))})
        request = ("POST /rec/%s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/jwk+json\r\nContent-Length: %d\r\n"
                   "Connection: close\r\n\r\n%s" % (self.kid, self.host, self.port, len(body), body)).encode()
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        writer.write(request)
        writer.write_eof()  # tangd serves requests until EOF on stdin; clevis sends just this one
        response = await reader.read()
        writer.close()
        head, _sep, payload = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("tang recovery failed: %r" % head[:80])
        elapsed = time.perf_counter() - started
        if verify:  # K = Y - e·S must be the key derived at provisioning (checked on a sample: costs ~1 ms)
            jwk = json.loads(payload)
            y_point = (int.from_bytes(_unb64u(jwk["x"]), "big"), int.from_bytes(_unb64u(jwk["y"]), "big"))
            es_x = int.from_bytes(ephemeral.exchange(self.ec.ECDH(), self.server_key), "big")
            es_y = pow((es_x ** 3 - 3 * es_x + P521_B) % P521, (P521 + 1) // 4, P521)
            candidates = [_point_add(y_point, (es_x, (-sign * es_y) % P521)) for sign in (1, -1)]
            if self.expected_x not in [c[0] for c in candidates if c]:
                raise RuntimeError("tang recovery returned the wrong key")
        return elapsed


async def closed_loop(job, rounds, clients, work):
    """``clients`` workers, each calling ``work(i)`` ``rounds`` times; returns latencies."""
    latencies = []

    async def worker(i):
        for r in range(rounds):
            latencies.append(await work(i * rounds + r))

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return latencies


async def released_together(work, items, barrier):
    """``work(item)`` for every item, all started at the same moment, across the client processes
    (``barrier``). Returns ([(seconds, result) per item], wall seconds, client CPU seconds) of the window."""
    gate = asyncio.Event()

    async def one(item):
        await gate.wait()
        started = time.perf_counter()
        result = await work(item)
        return time.perf_counter() - started, result

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    await asyncio.sleep(0.2)  # every task is parked at the gate
    if barrier is not None:  # every process has parked its tasks: all open the gate at once
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 60)
    started, cpu = time.perf_counter(), time.process_time()
    gate.set()
    answers = await asyncio.gather(*tasks)
    return answers, time.perf_counter() - started, time.process_time() - cpu


async def two_waves(host, port, nodes, context, barrier):
    """The server's share of a burst: every node connects and sends its init at the same moment (wave 1,
    until its challenge arrives); then, outside the measured windows, each node does its TPM work; then
    every node sends its proof at the same moment (wave 2, until its passphrase arrives). A node's figure
    is wave 1 + wave 2: how long it waited for the KMS. Real nodes do their TPM work on their own
    hardware (a discrete TPM takes 100 ms or more for it); here it would run on the server's two cores
    and queue behind other nodes' work, so it is kept out of both windows. Returns (latencies, 0, the
    two windows' wall seconds, client CPU seconds in them), as ``measured`` does."""

    async def connect_and_init(node):
        ws = await WebSocket.connect(host, port, node, context)
        ws.send(node.init)
        return ws, await ws.receive("challenge")

    async def prove(item):
        ws, proof = item
        ws.send(proof)
        answer = await ws.receive("passphrase")
        if "passphrase" not in answer:
            raise RuntimeError("no passphrase: %r" % sorted(answer))

    first, wall1, cpu1 = await released_together(connect_and_init, nodes, barrier)
    proofs = [(ws, node.proof(challenge)) for node, (_seconds, (ws, challenge)) in zip(nodes, first)]  # the TPM work
    second, wall2, cpu2 = await released_together(prove, proofs, barrier)
    for ws, _proof in proofs:
        await ws.close()
    return [a[0] + b[0] for a, b in zip(first, second)], 0.0, wall1 + wall2, cpu1 + cpu2


def client_process(job, results, barrier, part):
    """Runs in its own process: its ``part`` (index, count) of the scenario's nodes; puts (status, latencies,
    started, ended, CPU seconds of the measured phase) on ``results``. Burst parts meet at ``barrier``."""

    async def measured(work):
        started, cpu = time.perf_counter(), time.process_time()
        latencies = await work
        return latencies, started, time.perf_counter(), time.process_time() - cpu

    async def run():
        if job["kind"] == "tang":
            tang = TangClient(job["url"])
            return await measured(closed_loop(job, job["rounds"], job["clients"], lambda n: tang.recover(n % 50 == 0)))
        keys = soft_tpm.key_pool(job["identities"] + 1)
        nodes = [Node(k, keys[-1], job["nonce"]) for k in keys[: job["identities"]]]
        host, port = job["url"].split("://")[1].rsplit(":", 1)
        for node in nodes:
            node.prepare(host, int(port))
        context = ssl.create_default_context(cafile=job["ca"]) if job.get("ca") else None
        index, count = part
        mine = [nodes[i % len(nodes)] for i in range(index, job["clients"], count)]
        if job["kind"] == "burst":
            answers, wall, cpu = await released_together(lambda node: attest(host, int(port), node, context), mine, barrier)
            return [answer[1] for answer in answers], 0.0, wall, cpu
        if job["kind"] == "waves":
            return await two_waves(host, int(port), mine, context, barrier)
        bare = job["kind"] == "bare"
        return await measured(closed_loop(job, job["rounds"], job["clients"],
                                          lambda n: attest(host, int(port), nodes[n % len(nodes)], context, bare)))

    try:
        results.put(("ok",) + asyncio.run(run()))
    except Exception as error:  # reported by the parent
        if barrier is not None:
            barrier.abort()  # the other parts stop waiting
        results.put(("error", repr(error), 0, 0, 0))


def run_clients(job, processes=1):
    """Runs ``job`` in ``processes`` client processes; returns (latencies, wall seconds, client CPU seconds)."""
    results = multiprocessing.Queue()
    barrier = multiprocessing.Barrier(processes) if processes > 1 else None
    workers = [multiprocessing.Process(target=client_process, args=(job, results, barrier, (i, processes)))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    answers = []
    try:
        answers = [results.get(timeout=600) for _worker in workers]
    finally:
        for worker in workers:
            if len(answers) < len(workers):  # interrupted or a client hung: do not leave it behind
                worker.terminate()
            worker.join()
    errors = [answer[1] for answer in answers if answer[0] != "ok"]
    if errors:
        raise RuntimeError("client process failed: %s" % "; ".join(errors))
    latencies = [latency for answer in answers for latency in answer[1]]
    wall = max(answer[3] for answer in answers) - min(answer[2] for answer in answers)
    return latencies, wall, sum(answer[4] for answer in answers)


def measure(name, pid, job, children=False, live=False, processes=1):
    before = cpu_seconds(pid, children, live)
    latencies, wall, client_cpu = run_clients(job, processes)
    if children:
        time.sleep(0.3)  # the last tangd processes exit and get reaped
    cpu = cpu_seconds(pid, children, live) - before
    latencies = sorted(latencies)
    count = len(latencies)
    return {
        "scenario": name, "n": count, "per_s": count / wall,
        "p50_ms": latencies[count // 2] * 1000, "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1000,
        "max_ms": latencies[-1] * 1000, "cpu_ms": cpu / count * 1000, "client_cpu_ms": client_cpu / count * 1000,
    }


def enrol_all(job):
    """A job that makes every identity's first contact, so the measured loop sees enrolled nodes only."""
    clients = min(job["clients"], job["identities"])
    return dict(job, clients=clients, rounds=-(-job["identities"] // clients))


SCENARIOS = ("floor", "first", "enrolled", "burst", "share", "thread", "wss", "tang")


def one_run(args, workdir):
    rows = []
    want = args.scenarios
    pki = make_pki(workdir)
    workers = ["--workers", str(args.workers)] if args.workers > 1 else []
    if "floor" in want:
        process, url = start_bare(workdir)
        try:
            job = {"identities": args.identities, "nonce": not args.head_quotes, "kind": "bare", "url": url, "clients": args.clients}
            run_clients(dict(job, rounds=1))
            rows.append(measure("aiohttp bare exchange (floor)", process.pid, dict(job, rounds=args.rounds)))
        finally:
            process.stop()
    base = {"identities": args.identities, "nonce": not args.head_quotes, "ca": None}
    if want & {"first", "enrolled", "burst", "share"}:
        process, url = start_challenger(os.path.join(workdir, "ws"), extra=workers)
        try:
            enrol = enrol_all(dict(base, kind="loop", url=url, clients=args.clients))
            if "first" in want:
                rows.append(measure("kcrypt ws://  first contact", process.pid, enrol, live=True))
            else:
                run_clients(enrol)
            if "enrolled" in want:
                rows.append(measure("kcrypt ws://  enrolled", process.pid,
                                    dict(base, kind="loop", url=url, clients=args.clients, rounds=args.rounds), live=True))
            if "burst" in want:
                bursts = [("kcrypt ws://  burst %d (HEAD quotes)" % args.burst, False)]
                if not args.head_quotes:
                    bursts.insert(0, ("kcrypt ws://  burst %d" % args.burst, True))
                for name, nonce in bursts:
                    rows.append(measure(name, process.pid, dict(base, kind="burst", url=url, clients=args.burst, nonce=nonce),
                                        live=True, processes=args.client_processes))
            if "share" in want:
                rows.append(measure("kcrypt ws://  burst %d, server share" % args.burst, process.pid,
                                    dict(base, kind="waves", url=url, clients=args.burst), live=True,
                                    processes=args.client_processes))
        finally:
            process.stop()
    if "thread" in want:
        process, url = start_challenger(os.path.join(workdir, "thread"), extra=["--store-calls", "thread"] + workers)
        try:
            job = dict(base, kind="loop", url=url, clients=args.clients, rounds=args.rounds)
            run_clients(enrol_all(job))
            rows.append(measure("kcrypt ws://  enrolled, thread", process.pid, job, live=True))
        finally:
            process.stop()
    if "wss" in want:
        process, url = start_challenger(os.path.join(workdir, "wss"), tls=pki, extra=workers)
        try:
            job = dict(base, kind="loop", url=url, ca=pki["ca.pem"], clients=args.clients, rounds=args.rounds)
            run_clients(enrol_all(job))  # first contacts over TLS are not the figure here
            rows.append(measure("kcrypt wss:// enrolled", process.pid, job, live=True))
        finally:
            process.stop()
    if "tang" in want and not args.no_tang and os.path.exists(TANGD):
        process, url = start_tang(workdir)
        try:
            rows.append(measure("tang          recovery", process.pid,
                                dict(kind="tang", url=url, clients=args.clients, rounds=args.rounds), children=True))
        finally:
            process.stop()
    return rows


def print_rows(title, rows):
    print(title)
    print("  %-38s %6s %8s %9s %9s %17s %17s" % ("scenario", "n", "ops/s", "p50 ms", "p99 ms", "server CPU ms/op", "client CPU ms/op"))
    for row in rows:
        values = (row["scenario"], row["n"], row["per_s"], row["p50_ms"], row["p99_ms"], row["cpu_ms"], row["client_cpu_ms"])
        print("  %-38s %6d %8.0f %9.1f %9.1f %17.3f %17.3f" % values)
    for row in rows:
        if "burst" in row["scenario"] and "share" not in row["scenario"]:
            # The whole burst's CPU work spread perfectly over the CPUs: the last node cannot finish sooner
            # (p99 can be ~1% under it; the clients' closing frames count as CPU but not as latency).
            cpus = os.cpu_count()
            bound = (row["cpu_ms"] + row["client_cpu_ms"]) * row["n"] / cpus
            print("  lower bound, %s: (%.3f + %.3f) ms × %d / %d CPUs = %.0f ms (p99 %.0f ms, max %.0f ms)"
                  % (row["scenario"].split("  ", 1)[1], row["cpu_ms"], row["client_cpu_ms"], row["n"], cpus, bound,
                     row["p99_ms"], row["max_ms"]))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent nodes in the closed-loop scenarios")
    parser.add_argument("--rounds", type=int, default=20, help="attestations per node in the closed-loop scenarios")
    parser.add_argument("--burst", type=int, default=500, help="nodes connecting at once in the burst scenario")
    parser.add_argument("--identities", type=int, default=200, help="distinct software TPM identities")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (fresh servers each time)")
    parser.add_argument("--head-quotes", action="store_true", help="quotes without nonce, as upstream HEAD clients send")
    parser.add_argument("--no-tang", action="store_true", help="skip the Tang baseline")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma list of scenarios to run (default: all): %s" % ",".join(SCENARIOS))
    parser.add_argument("--client-processes", type=int, default=os.cpu_count(), help="client processes the burst's nodes are split over")
    parser.add_argument("--workers", type=int, default=1, help="challenger worker processes (serve --workers, passed when > 1)")
    args = parser.parse_args()
    args.scenarios = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    unknown = args.scenarios - set(SCENARIOS)
    if unknown:
        parser.error("unknown scenarios: %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(SCENARIOS)))
    # SIGTERM (e.g. from timeout) unwinds like Ctrl-C, so the servers this bench started are stopped.
    signal.signal(signal.SIGTERM, lambda *_args: sys.exit(143))
    soft_tpm.key_pool(args.identities + 1)  # generate (and cache) the keys before measuring
    print("machine: %d CPUs, load average %s; python %s" % (os.cpu_count(), "%.2f %.2f %.2f" % os.getloadavg(), sys.version.split()[0]))
    all_rows = []
    for run in range(1, args.runs + 1):
        workdir = tempfile.mkdtemp(prefix="kcrypt-bench-attestation-")
        for sub in ("ws", "wss", "thread"):
            os.makedirs(os.path.join(workdir, sub))
        try:
            rows = one_run(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print_rows("run %d (load average %.2f %.2f %.2f)" % ((run,) + os.getloadavg()), rows)
        all_rows.append(rows)
    if args.runs > 1:
        median = []
        for i, row in enumerate(all_rows[0]):
            values = [rows[i] for rows in all_rows]
            median.append({key: (statistics.median(v[key] for v in values) if key != "scenario" else row[key]) for key in row})
        print_rows("median of %d runs" % args.runs, median)


if __name__ == "__main__":
    main()
