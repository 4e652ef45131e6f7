# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-challenger serve --workers N``: the real entry point with worker processes on one port.

Nodes are software TPM identities over the newest protocol; the store is SQLite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from support import soft_tpm
from support.challenger import ROOT, ChallengerProcess, soft_attest
from support.process import alive, children
from support.soft_tpm import SoftTPM
from support.ports import free_port

WORKERS = 2


def _gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if alive(pid)]:
            return True
        time.sleep(0.05)
    return False


def _wait_exit(process, timeout=15):
    try:
        return process.wait(timeout)
    except Exception:
        return None


@pytest.fixture
def workers_kms(tmp_path):
    port = free_port()
    kms = ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
                             "--workers", str(WORKERS)], port, log_path=str(tmp_path / "kms.log"))
    kms.start()
    deadline = time.monotonic() + 15
    while "listening on" not in (tmp_path / "kms.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # /healthz answers once the first worker listens; the log line once all do
    kms.workers = children(kms.process.pid)
    try:
        yield kms
    finally:
        pids = [kms.process.pid] + kms.workers if kms.process else kms.workers
        kms.stop()
        for pid in pids:  # a test may have stopped the supervisor in a way that left a worker: end ours
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_share_the_port_the_store_and_the_metrics(workers_kms, tmp_path):
    assert len(workers_kms.workers) == WORKERS
    keys = soft_tpm.key_pool(6)
    nodes = [SoftTPM(ek_key=key, ak_key=keys[-1]) for key in keys[:5]]
    ws_url = workers_kms.url.replace("http", "ws", 1)
    passphrases = {}
    for round_number in range(8):  # 40 connections: the kernel spreads them over both workers
        for node in nodes:
            response = soft_attest(ws_url, node, nonce=round_number % 2 == 0)
            passphrases.setdefault(node.tpm_hash, set()).add(response["passphrase"])
    assert all(len(values) == 1 for values in passphrases.values())  # the same key whichever worker answered
    with sqlite3.connect(str(tmp_path / "kms.db")) as conn:
        assert conn.execute("SELECT count(*) FROM sealed_volumes").fetchone()[0] == 5
    time.sleep(0.2)  # the audit lines are written after the reply
    audit = [line for line in (tmp_path / "kms.log").read_text().splitlines() if "outcome=success" in line]
    assert len(audit) == 40
    assert {re.search(r" (worker-\d+) kcrypt.audit", line).group(1) for line in audit} == {"worker-1", "worker-2"}
    for _attempt in range(6):  # whichever worker answers /metrics counts for all of them
        text = urllib.request.urlopen(workers_kms.url + "/metrics", timeout=5).read().decode()
        assert 'kcrypt_attestations_total{protocol="attestation",outcome="success"} 40' in text
        assert "kcrypt_attestations_in_flight 0" in text


def test_sigterm_stops_every_worker_and_frees_the_port(workers_kms):
    workers = workers_kms.workers
    workers_kms.process.send_signal(signal.SIGTERM)
    assert _wait_exit(workers_kms.process) == 0
    assert _gone(workers)
    with socket.socket() as sock:  # free again, for a plain (non-SO_REUSEPORT) listener too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # /healthz probes left TIME_WAIT entries
        sock.bind(("127.0.0.1", workers_kms.port))
        sock.listen()


def test_a_worker_that_dies_stops_the_set(workers_kms, tmp_path):
    os.kill(workers_kms.workers[0], signal.SIGKILL)
    assert _wait_exit(workers_kms.process) == 1  # the service manager restarts the whole set
    assert _gone(workers_kms.workers)
    assert re.search(r"worker-1 \(pid %d\) exited with code -9; stopping the other workers" % workers_kms.workers[0],
                     (tmp_path / "kms.log").read_text())


def test_workers_die_with_their_supervisor(workers_kms):
    os.kill(workers_kms.process.pid, signal.SIGKILL)  # no handler runs: the kernel ends the workers (PDEATHSIG)
    _wait_exit(workers_kms.process)
    assert _gone(workers_kms.workers)


def test_a_port_in_use_is_one_clear_error_even_for_another_challenger(workers_kms, tmp_path):
    # SO_REUSEPORT would let a second challenger with workers share the port silently and take half the
    # nodes: the supervisor first binds without it, so this start fails like any port clash.
    args = ["serve", "--listen", "127.0.0.1:%d" % workers_kms.port, "--store", "sqlite://%s/other.db" % tmp_path,
            "--workers", str(WORKERS)]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger")] + args, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=30, check=False)
    assert result.returncode == 1
    assert "Error: cannot listen on 127.0.0.1:%d: Address already in use" % workers_kms.port in result.stderr
    assert result.stderr.count("cannot listen") == 1  # said once, by the supervisor, before any worker started
    assert children(workers_kms.process.pid) == workers_kms.workers  # the running server is untouched
