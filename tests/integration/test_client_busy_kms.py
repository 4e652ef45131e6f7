# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node client against a KMS at its connection cap (issue 15): the real ``kcrypt-challenger serve``
answers 503 with ``Retry-After`` before the upgrade, the real client (swtpm, websocket-client parsing the
refusal) waits what the KMS asked and gets its passphrase once a slot is free."""

from __future__ import annotations

import threading
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from support.challenger import ChallengerProcess, connect
from support.ports import free_port

HOLD = 2.5  # seconds the only slot stays taken


def test_the_client_waits_out_a_busy_kms(tmp_path, swtpm_factory):
    tpm = swtpm_factory(ek_cert=True, fresh=True)
    port = free_port()
    args = ["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://%s/kms.db" % tmp_path,
            "--max-connections", "1", "--max-connections-per-client", "0"]
    with ChallengerProcess(args, port, log_path=str(tmp_path / "kms.log")) as kms:
        holder = connect("ws://127.0.0.1:%d" % port)  # upgraded, no init: the one exchange in flight
        release = threading.Timer(HOLD, holder.close)
        release.start()
        logged = []
        started = time.monotonic()
        try:
            config = client.ClientConfig(kms.url, tpm_device=tpm.tcti, attempts=10, retry_delay=0.2)
            passphrase = client.get_passphrase(config, PartitionRef(label="COS_PERSISTENT"), log=logged.append)
        finally:
            release.cancel()
            holder.close()
        took = time.monotonic() - started
    assert passphrase  # TOFU served the node once the slot was free
    busy = [line for line in logged if "is busy: HTTP 503" in line]
    waits = [line for line in logged if "the KMS asked to retry after 1 s" in line]
    assert busy and len(waits) == len(busy), logged
    # it waited the KMS's 1 s (not the client's 0.2 s retry_delay) between refusals: few attempts, not a dozen
    assert len(busy) <= HOLD / 1.0 + 1, logged
    assert took >= HOLD, took
