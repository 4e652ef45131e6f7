# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A bounded fuzz run against the real ``kcrypt-challenger serve`` process (issue 14, "Keep proving it").

A few thousand mutated messages per endpoint (tests/support/fuzz.py: the HTTP upgrade, the framing, the
JSON, the base64 and the TPM structures inside), each on its own connection, and afterwards:

* no traceback and no "internal error" in the server's log;
* no HTTP 5xx and no close code outside 1000/1002/1007/1008/1009 (the store works, so not even the
  documented 1011);
* the store holds exactly what it held before: no request that failed authentication wrote anything;
* the server's RSS grew by less than RSS_BOUND_KB over the second half of the run, and it still serves the
  enrolled node. (The first half takes RSS to its plateau: sixteen connections at once with frames up to
  64 KiB and 60,000-level nesting leave glibc's heap at its high-water mark; the Python heap itself grows
  by tens of kB, measured with tracemalloc. bench/fuzz.py shows the plateau over 100,000 cases.)

``KCRYPT_FUZZ_CASES`` (per endpoint, default 1200, half of them in each half) and ``KCRYPT_FUZZ_SEED`` change the run; the 100,000+
run is ``bench/fuzz.py`` (docs/challenger.md).
"""

from __future__ import annotations

import os
import time

import pytest

from support import fuzz, soft_tpm
from support.challenger import ChallengerProcess, soft_attest
from support.ports import free_port
from support.soft_tpm import SoftTPM

CASES = int(os.environ.get("KCRYPT_FUZZ_CASES", "1200"))
SEED = os.environ.get("KCRYPT_FUZZ_SEED", "ci")
RSS_BOUND_KB = 8 * 1024  # a leak of 3 kB per case would pass it over the second half's cases


@pytest.mark.slow
def test_fuzzed_messages_on_every_endpoint(tmp_path):
    keys = soft_tpm.key_pool(2)
    node = SoftTPM(keys[0], keys[1])
    port = free_port()
    log_path = tmp_path / "kms.log"
    db = tmp_path / "kms.db"
    with ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s" % db,
                            "--request-timeout", "2", "--first-message-timeout", "2", "--read-timeout", "2"],
                           port, log_path=str(log_path)) as kms:
        url = "ws://127.0.0.1:%d" % port
        passphrase = soft_attest(url, node)["passphrase"]
        before_store = fuzz.store_snapshot(str(db))
        started = time.monotonic()
        outcomes, failures = fuzz.Campaign(port, node, seed=SEED + "/1").run(CASES // 2)
        time.sleep(1.5)  # idle: the garbage-collector pacer runs
        before_rss = fuzz.rss_kb(kms.process.pid)
        more_outcomes, more_failures = fuzz.Campaign(port, node, seed=SEED + "/2").run(CASES - CASES // 2)
        seconds = time.monotonic() - started
        time.sleep(1.5)
        after_rss = fuzz.rss_kb(kms.process.pid)
        after_store = fuzz.store_snapshot(str(db))
        outcomes.update(more_outcomes)
        failures += more_failures
        assert soft_attest(url, node)["passphrase"] == passphrase  # still serving, the same key
    log = log_path.read_bytes()
    summary = "seed %s, %d cases per endpoint in %.1fs: %s" % (SEED, CASES, seconds, dict(sorted(outcomes.items())))
    assert failures == [], summary
    assert b"Traceback" not in log and b"internal error" not in log, summary
    assert after_store == before_store, summary
    assert after_rss - before_rss < RSS_BOUND_KB, "RSS %d kB -> %d kB; %s" % (before_rss, after_rss, summary)
    assert sum(outcomes.values()) == CASES * len(fuzz.ENDPOINTS)
    print(summary, "RSS %d -> %d kB" % (before_rss, after_rss))
