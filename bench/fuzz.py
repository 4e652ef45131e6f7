# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The long fuzz run: 100,000+ mutated messages against ``kcrypt-challenger serve`` (issue 14).

    .venv/bin/python bench/fuzz.py [--cases 25000] [--seed long] [--parallel 16] [--server-root DIR]

``--cases`` is per endpoint (attestation, legacy-get, legacy-post, http): 25,000 makes 100,000. The cases
are tests/support/fuzz.py's (the CI test runs 1,500 per endpoint); the server is the real CLI on an
SQLite store with one enrolled software TPM. Prints, every 10,000 cases and at the end: cases per
second, the server's RSS, open fds and log size; then the outcomes per endpoint, every case that broke a
promise (HTTP 5xx, a close code outside 1000/1002/1007/1008/1009, an internal error) with its seed and
number for tests/support/fuzz.py's ``Campaign.case`` to replay, whether the log holds a traceback, and
whether the store changed. Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
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

from support import fuzz, soft_tpm  # noqa: E402
from support.challenger import ChallengerProcess, soft_attest  # noqa: E402
from support.ports import free_port  # noqa: E402


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=25000, help="cases per endpoint (4 endpoints)")
    parser.add_argument("--seed", default="long")
    parser.add_argument("--parallel", type=int, default=16, help="cases in flight at once")
    parser.add_argument("--batch", type=int, default=2500, help="cases per endpoint between two progress lines")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (the server's log and store)")
    args = parser.parse_args()
    keys = soft_tpm.key_pool(2)
    node = soft_tpm.SoftTPM(keys[0], keys[1])
    workdir = tempfile.mkdtemp(prefix="kcrypt-fuzz-")
    port = free_port()
    log_path = os.path.join(workdir, "kms.log")
    db = os.path.join(workdir, "kms.db")
    server = ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://" + db,
                                "--request-timeout", "2", "--first-message-timeout", "2", "--read-timeout", "2"],
                               port, log_path=log_path)
    with server:
        pid = server.process.pid
        passphrase = soft_attest("ws://127.0.0.1:%d" % port, node)["passphrase"]
        campaign = fuzz.Campaign(port, node, seed=args.seed, parallel=args.parallel)
        campaign.run(20)
        before = fuzz.store_snapshot(db)
        print("server pid %d, log %s; RSS %d kB, %d fds after enrolment and warm-up" % (pid, log_path, fuzz.rss_kb(pid), open_fds(pid)))
        print("%10s %10s %10s %8s %12s" % ("cases", "cases/s", "RSS kB", "fds", "log bytes"))
        outcomes, failures, done, started = {}, [], 0, time.monotonic()
        for first in range(0, args.cases, args.batch):
            count = min(args.batch, args.cases - first)
            batch = fuzz.Campaign(port, node, seed="%s/%d" % (args.seed, first), parallel=args.parallel)
            counts, found = batch.run(count)
            for key, value in counts.items():
                outcomes[key] = outcomes.get(key, 0) + value
            failures += [("%s/%d" % (args.seed, first),) + item for item in found]
            done += count * len(fuzz.ENDPOINTS)
            seconds = time.monotonic() - started
            print("%10d %10.0f %10d %8d %12d" % (done, done / seconds, fuzz.rss_kb(pid), open_fds(pid), os.path.getsize(log_path)))
        time.sleep(2)
        print("after 2 s idle: RSS %d kB, %d fds" % (fuzz.rss_kb(pid), open_fds(pid)))
        still = soft_attest("ws://127.0.0.1:%d" % port, node).get("passphrase") == passphrase
        after = fuzz.store_snapshot(db)
    with open(log_path, "rb") as handle:
        log = handle.read()
    print("\noutcomes:")
    for (endpoint, outcome), count in sorted(outcomes.items()):
        print("  %-12s %-14s %8d" % (endpoint, outcome, count))
    print("\ncases that broke a promise: %d" % len(failures))
    for seed, endpoint, number, problems in failures[:20]:
        print("  seed %s %s case %d: %s" % (seed, endpoint, number, "; ".join(problems)))
    print("tracebacks in the log: %d; 'internal error' in the log: %d; log %d bytes"
          % (log.count(b"Traceback"), log.count(b"internal error"), len(log)))
    print("store unchanged: %s; the enrolled node still gets its passphrase: %s" % (after == before, still))
    if args.keep:
        print("kept %s" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
