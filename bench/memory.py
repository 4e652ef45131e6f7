# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger's memory over a long run of legitimate attestations (issue 14.8).

    .venv/bin/python bench/memory.py [--attestations 80000] [--identities 200] [--concurrency 20]
        [--sample 10000] [--server-root DIR]

Starts ``kcrypt-challenger serve`` (SQLite store, log level warning), enrols ``--identities`` software
TPM identities, then runs ``--attestations`` enrolled attestations from ``--concurrency`` closed loops in a
client process (the hand-written client of bench/attestation.py) and prints the server's RSS every
``--sample`` attestations, after 3 s idle at the end, and the growth from the first sample on.
``--server-root`` runs another checkout's server (e.g. one with the earlier garbage-collector tuning) with
the same clients, for an A/B comparison. Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _checkout  # noqa: E402

_checkout.setup()

from support import soft_tpm  # noqa: E402
from support.process import stop as stop_process  # noqa: E402
from support.ports import free_port  # noqa: E402

_spec = importlib.util.spec_from_file_location("attestation_bench", os.path.join(ROOT, "bench", "attestation.py"))
attestation_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attestation_bench)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def clients(port, identities, total, concurrency, progress):
    """Client process: ``total`` attestations by ``concurrency`` closed loops; counts into ``progress``."""
    keys = soft_tpm.key_pool(identities + 1)
    nodes = [attestation_bench.Node(key, keys[-1], nonce=True) for key in keys[:identities]]
    for node in nodes:
        node.prepare("127.0.0.1", port)

    async def loop(index):
        while True:
            with progress.get_lock():
                if progress.value >= total:
                    return
                progress.value += 1
                number = progress.value
            await attestation_bench.attest("127.0.0.1", port, nodes[number % len(nodes)], None)

    async def run():
        await asyncio.gather(*(loop(i) for i in range(concurrency)))

    asyncio.run(run())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attestations", type=int, default=80000)
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--sample", type=int, default=10000, help="attestations between two RSS readings")
    parser.add_argument("--server-root", default=ROOT, help="checkout whose bin/kcrypt-challenger runs (default: this one)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="kcrypt-memory-")
    port = free_port()
    log_path = os.path.join(workdir, "challenger.log")
    server = attestation_bench.Process(
        [sys.executable, os.path.join(args.server_root, "bin", "kcrypt-challenger"), "serve", "--listen", "127.0.0.1:%d" % port,
         "--store", "sqlite://%s/kms.db" % workdir, "--log-level", "warning"], log_path)
    try:
        attestation_bench.wait_http("http://127.0.0.1:%d/healthz" % port)
        pid = server.pid
        started_rss = rss_kb(pid)
        enrol = multiprocessing.Value("l", 0)
        worker = multiprocessing.Process(target=clients, args=(port, args.identities, args.identities, 1, enrol))
        worker.start()
        worker.join()
        print("server %s (pid %d): RSS %d kB at start, %d kB after enrolling %d identities"
              % (args.server_root, pid, started_rss, rss_kb(pid), args.identities))
        progress = multiprocessing.Value("l", 0)
        worker = multiprocessing.Process(target=clients, args=(port, args.identities, args.attestations, args.concurrency, progress))
        started = time.monotonic()
        worker.start()
        print("%12s %10s %12s %12s" % ("attestations", "seconds", "RSS kB", "per second"))
        samples, next_sample = [], args.sample
        while worker.is_alive():
            time.sleep(0.2)
            done = progress.value
            if done >= next_sample:
                seconds = time.monotonic() - started
                samples.append((done, rss_kb(pid)))
                print("%12d %10.1f %12d %12.0f" % (done, seconds, samples[-1][1], done / seconds))
                next_sample += args.sample
        worker.join()
        time.sleep(3)
        idle = rss_kb(pid)
        print("after 3 s idle: RSS %d kB" % idle)
        if len(samples) >= 2:
            (first_done, first_rss), (last_done, last_rss) = samples[0], samples[-1]
            print("growth from %d to %d attestations: %+d kB (%+.1f kB per 10,000)"
                  % (first_done, last_done, last_rss - first_rss, (last_rss - first_rss) * 10000.0 / max(1, last_done - first_done)))
    finally:
        stop_process(server.popen)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
