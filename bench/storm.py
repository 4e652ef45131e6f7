# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Boot storm: N enrolled nodes ask one kcrypt-challenger for their keys at the same moment.

    .venv/bin/python bench/storm.py [--nodes 1000 3000 10000] [--workers 1 2] [--tpm-delay 0.2]
        [--arrival-window 0] [--attempts 30] [--retry-delay 1] [--client-processes 4] [--max-connections N]

After a power cut a whole fleet boots at once. Each simulated node (a software TPM identity,
tests/support/soft_tpm.py, one per node: the store holds N SealedVolumes) does what a Kairos node
does: connect, wait ``--tpm-delay`` (its TPM creates the AK), send the init message, read the
challenge, wait ``--tpm-delay`` (ActivateCredential and the quote on its TPM), send the proof, read
its passphrase. The WebSocket stays open throughout, as a real node's does. A refused attempt is
retried like upstream's client: ``--attempts`` tries, ``--retry-delay`` seconds apart (or the
server's ``Retry-After`` when longer). Refusals are counted by kind: an HTTP status before the
upgrade (503 when the KMS is at its connection cap), a close frame (1011), a timeout
(``--timeout`` per message), a connection error (refused, reset). Each node connects from its own
loopback address (127.1.0.1, 127.1.0.2, ...), as nodes are separate hosts.

Per N and server worker count: a fresh challenger (SQLite store) whose N nodes are first enrolled
(unmeasured, no delays), then the storm. Printed: the time until every node had its key, p50/p99/max
of a node's time from its start to its key (retries included), nodes that never got it (permanent
failures), attempts, refusals by kind, the server's peak RSS and open file descriptors (summed over
its processes, sampled every 0.2 s) and its CPU time, the clients' CPU time.

The nodes' own crypto (ActivateCredential, the quote signature: ~2 ms CPU per node) runs on the
same cores as the server here, unlike in a real fleet; the clients' CPU is printed so the storm's
floor on this machine is visible: (server + client CPU) / CPUs. The nodes are split over
``--client-processes`` processes, each with its file-descriptor limit raised to the hard limit.
The first N identities need N RSA keys (~35 ms each, cached in ~/.cache/kcrypt after the first
run). Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import attestation as bench  # noqa: E402  (the software nodes, the WebSocket client, the server helpers)

from support import soft_tpm  # noqa: E402
from support.process import proc_kib  # noqa: E402

REFUSAL_KINDS = ("http", "close", "timeout", "connection", "other")


class Refused(Exception):
    def __init__(self, kind, detail, retry_after=0.0):
        super().__init__(detail)
        self.kind, self.retry_after = kind, retry_after


def source_address(number):
    """Node ``number``'s own loopback address (127.1.0.1, 127.1.0.2, ...): real nodes are separate hosts,
    so a per-address limit of the KMS sees one node per address, and no address runs out of ports."""
    return "127.%d.%d.%d" % (1 + number // 62500, number // 250 % 250, number % 250 + 1)


async def open_socket(host, port, node, timeout):
    """The upgrade, as bench.WebSocket.connect, but a refusal says what it was (and the Retry-After)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(node.source, 0)), timeout)
    except asyncio.TimeoutError:
        raise Refused("timeout", "connect timed out")
    except OSError as error:
        raise Refused("connection", "connect: %s" % error)
    try:
        writer.write(node.request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.TimeoutError:
        writer.close()
        raise Refused("timeout", "no answer to the upgrade")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        writer.close()
        raise Refused("connection", "upgrade: %r" % error)
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        headers = {name.strip().lower(): value.strip() for name, _sep, value in (line.partition(b":") for line in lines[1:])}
        writer.close()
        try:
            retry_after = float(headers.get(b"retry-after", b"0") or 0)
        except ValueError:
            retry_after = 0.0
        raise Refused("http", lines[0].decode("latin-1"), retry_after)
    return bench.WebSocket(reader, writer)


async def receive(ws, what, timeout):
    try:
        return await asyncio.wait_for(ws.receive(what), timeout)
    except asyncio.TimeoutError:
        raise Refused("timeout", "no %s within %s s" % (what, timeout))
    except (asyncio.IncompleteReadError, OSError) as error:
        raise Refused("connection", "%s: %r" % (what, error))
    except RuntimeError as error:
        kind = "close" if "closed before" in str(error) else "other"
        raise Refused(kind, str(error))


async def one_attempt(host, port, node, job):
    ws = await open_socket(host, port, node, job["timeout"])
    try:
        await asyncio.sleep(job["tpm_delay"])  # the TPM makes the AK
        ws.send(node.init)
        challenge = await receive(ws, "challenge", job["timeout"])
        await asyncio.sleep(job["tpm_delay"])  # ActivateCredential and the quote
        ws.send(node.proof(challenge))
        answer = await receive(ws, "passphrase", job["timeout"])
        if "passphrase" not in answer:
            raise Refused("other", "no passphrase: %r" % sorted(answer))
    except BaseException:
        ws.writer.close()
        raise
    await ws.close()


async def boot(host, port, node, job, delay):
    """One node: start after ``delay``, retry like upstream.

    Returns (ok, seconds from its start to its key, attempts, refusal kinds, wall-clock time it ended).
    """
    await asyncio.sleep(delay)
    started = time.perf_counter()
    refusals = []
    for attempt in range(1, job["attempts"] + 1):
        try:
            await one_attempt(host, port, node, job)
            return True, time.perf_counter() - started, attempt, refusals, time.time()
        except Refused as refusal:
            refusals.append((refusal.kind, str(refusal)[:120]))
            if attempt < job["attempts"]:
                await asyncio.sleep(max(job["retry_delay"], refusal.retry_after))
    return False, time.perf_counter() - started, job["attempts"], refusals, time.time()


def client_process(job, keys_needed, results, barrier, part):
    """Its ``part`` (index, count) of the nodes; puts ("ok", [per-node tuples], CPU seconds of the storm) on results."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per node, and retries overlap closes

    async def run():
        keys = soft_tpm.key_pool(keys_needed)
        index, count = part
        numbers = range(index, job["nodes"], count)
        nodes = [bench.Node(keys[i], keys[-1], job["nonce"]) for i in numbers]
        host, port = job["url"].split("://")[1].rsplit(":", 1)
        for number, node in zip(numbers, nodes):
            node.prepare(host, int(port))
            node.source = source_address(number)
        if job["kind"] == "enrol":  # first contacts, a bounded number at a time, no delays
            gate = asyncio.Semaphore(job["concurrency"])
            quick = dict(job, tpm_delay=0.0)

            async def enrol(node):
                async with gate:
                    return await boot(host, int(port), node, quick, 0.0)

            answers = await asyncio.gather(*(enrol(node) for node in nodes))
            return answers, 0.0, time.time()
        spread = job["arrival_window"]
        delays = [(i * count + index) / job["nodes"] * spread for i in range(len(nodes))]  # even arrivals over the window
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 600)  # every process has its nodes ready
        started, cpu = time.time(), time.process_time()
        answers = await asyncio.gather(*(boot(host, int(port), node, job, delay) for node, delay in zip(nodes, delays)))
        return answers, time.process_time() - cpu, started

    try:
        results.put(("ok",) + asyncio.run(run()))
    except Exception as error:  # reported by the parent
        if barrier is not None:
            barrier.abort()
        results.put(("error", repr(error), 0, 0))


def run_clients(job, processes, keys_needed):
    """The job's nodes over ``processes`` client processes; returns (per-node tuples, client CPU seconds, start time)."""
    results = multiprocessing.Queue()
    barrier = multiprocessing.Barrier(processes)
    workers = [multiprocessing.Process(target=client_process, args=(job, keys_needed, results, barrier, (i, processes)))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    answers = []
    try:
        answers = [results.get(timeout=3600) for _worker in workers]
    finally:
        for worker in workers:
            if len(answers) < len(workers):
                worker.terminate()
            worker.join()
    errors = [answer[1] for answer in answers if answer[0] != "ok"]
    if errors:
        raise RuntimeError("client process failed: %s" % "; ".join(errors))
    return ([node for answer in answers for node in answer[1]], sum(answer[2] for answer in answers),
            min(answer[3] for answer in answers))


class ServerSampler(threading.Thread):
    """Peak RSS and open fds of the server and its worker processes, summed, every 0.2 s."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak_rss_kib = self.peak_fds = 0

    @staticmethod
    def _fds(pid):
        try:
            return len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            return 0

    def run(self):
        while not self.stop.is_set():
            pids = [self.pid] + bench.child_pids(self.pid)
            self.peak_rss_kib = max(self.peak_rss_kib, sum(proc_kib(p, "VmRSS") for p in pids))
            self.peak_fds = max(self.peak_fds, sum(self._fds(p) for p in pids))
            self.stop.wait(0.2)


def server_supports(flag):
    helptext = subprocess.run([sys.executable, os.path.join(bench.ROOT, "bin", "kcrypt-challenger"), "serve", "--help"],
                              capture_output=True, text=True, check=False).stdout
    return flag in helptext


def storm(args, count, workers, workdir):
    extra = ["--workers", str(workers)] if workers > 1 else []
    if args.max_connections is not None:
        extra += ["--max-connections", str(args.max_connections)]
    process, url = bench.start_challenger(workdir, extra=extra)
    base = {"url": url, "nodes": count, "nonce": not args.head_quotes, "attempts": args.attempts,
            "retry_delay": args.retry_delay, "timeout": args.timeout, "tpm_delay": args.tpm_delay,
            "arrival_window": args.arrival_window}
    try:
        enrolled = run_clients(dict(base, kind="enrol", concurrency=100), args.client_processes, count + 1)[0]
        missing = sum(1 for node in enrolled if not node[0])
        if missing:
            raise RuntimeError("%d of %d nodes could not enrol before the storm" % (missing, count))
        sampler = ServerSampler(process.pid)
        sampler.start()
        server_cpu = bench.cpu_seconds(process.pid, live=True)
        nodes, client_cpu, start_at = run_clients(dict(base, kind="storm"), args.client_processes, count + 1)
        server_cpu = bench.cpu_seconds(process.pid, live=True) - server_cpu
        sampler.stop.set()
        sampler.join()
    finally:
        process.stop()
    done = sorted(node[1] for node in nodes if node[0])
    failures = sum(1 for node in nodes if not node[0])
    kinds = {kind: 0 for kind in REFUSAL_KINDS}
    examples = {}
    for node in nodes:
        for kind, detail in node[3]:
            kinds[kind] += 1
            examples.setdefault(kind, {}).setdefault(detail, 0)
            examples[kind][detail] += 1
    return {
        "nodes": count, "workers": workers,
        "all_keys_s": max(node[4] for node in nodes) - start_at if not failures else float("nan"),
        "p50": statistics.median(done) if done else float("nan"),
        "p99": done[min(len(done) - 1, int(len(done) * 0.99))] if done else float("nan"),
        "max": done[-1] if done else float("nan"), "failures": failures, "attempts": sum(node[2] for node in nodes),
        "refusals": kinds, "examples": examples, "rss_mib": sampler.peak_rss_kib / 1024.0, "fds": sampler.peak_fds,
        "server_cpu": server_cpu, "client_cpu": client_cpu,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="challenger worker processes")
    parser.add_argument("--tpm-delay", type=float, default=0.2, help="seconds a node's TPM takes between messages")
    parser.add_argument("--arrival-window", type=float, default=0.0,
                        help="nodes start evenly over this many seconds (0: all at the same moment)")
    parser.add_argument("--attempts", type=int, default=30, help="attempts per node (upstream: 30)")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="seconds between attempts (upstream: 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a node waits for each answer")
    parser.add_argument("--client-processes", type=int, default=max(2, os.cpu_count() or 1) * 2)
    parser.add_argument("--max-connections", type=int, help="passed to kcrypt-challenger serve (when it has the flag)")
    parser.add_argument("--head-quotes", action="store_true", help="quotes without nonce, as upstream HEAD clients send")
    args = parser.parse_args()
    if args.max_connections is not None and not server_supports("--max-connections"):
        parser.error("this kcrypt-challenger has no --max-connections")
    signal.signal(signal.SIGTERM, lambda *_args: sys.exit(143))  # unwind: stop the servers this bench started
    print("machine: %d CPUs, load average %.2f %.2f %.2f; fd limit %s; tpm delay %.3f s, arrival window %.1f s, "
          "%d attempts %.1f s apart, client processes %d"
          % ((os.cpu_count(),) + os.getloadavg() + (resource.getrlimit(resource.RLIMIT_NOFILE)[1], args.tpm_delay,
             args.arrival_window, args.attempts, args.retry_delay, args.client_processes)))
    soft_tpm.key_pool(max(args.nodes) + 1)  # generate (and cache) the identities before measuring
    header = "%-6s %-7s %11s %8s %8s %8s %7s %9s %s %9s %6s %10s %10s %5s"
    print(header % ("nodes", "workers", "all keys s", "p50 s", "p99 s", "max s", "failed", "attempts",
                    " ".join("%-6s" % k for k in REFUSAL_KINDS), "RSS MiB", "fds", "server CPU", "client CPU", "load"))
    for count in args.nodes:
        for workers in args.workers:
            workdir = tempfile.mkdtemp(prefix="kcrypt-bench-storm-")
            try:
                row = storm(args, count, workers, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            print("%-6d %-7d %11.1f %8.2f %8.2f %8.2f %7d %9d %s %9.0f %6d %10.1f %10.1f %5.1f" % (
                row["nodes"], row["workers"], row["all_keys_s"], row["p50"], row["p99"], row["max"], row["failures"],
                row["attempts"], " ".join("%-6d" % row["refusals"][k] for k in REFUSAL_KINDS), row["rss_mib"], row["fds"],
                row["server_cpu"], row["client_cpu"], os.getloadavg()[0]))
            for kind, details in sorted(row["examples"].items()):  # the commonest refusal texts of each kind
                for detail, times in sorted(details.items(), key=lambda item: -item[1])[:2]:
                    print("       %-10s %6d x %s" % (kind, times, detail))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
