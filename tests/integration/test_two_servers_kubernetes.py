# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two ``kcrypt-challenger`` replicas on one Kubernetes API, 200 concurrent first contacts.

The SQLite variant (two processes on one file) is test_challenger_load.py. Here the
two replicas share the emulated API server (and a real cluster when KUBECONFIG is
set): 150 distinct software TPMs, 50 of them twice, all at once, half to each
replica. Each TPM must end up with exactly one SealedVolume and one Secret, and
get the same passphrase every time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import threading

import pytest
from kubernetes import client, config

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from support import soft_tpm
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from support.challenger import ChallengerProcess, connect
from support.soft_tpm import SoftTPM
from support.stores import make_store_target
from support.ports import free_port

DISTINCT = 150
CONTACTS = 200


def attest(ws_url, node, timeout=120):
    """One newest-protocol exchange (as support.challenger.soft_attest, with a longer wait for a busy API)."""
    ws = connect(ws_url, headers={"label": "COS_PERSISTENT", "name": "", "uuid": ""}, timeout=timeout)
    try:
        ws.send(protocol.write_json(node.init_message()))
        challenge = protocol.load_json_object(ws.recv(), "challenge")
        if "challenge" not in challenge:
            return challenge
        ws.send(protocol.write_json(node.proof_message(challenge)))
        return protocol.load_json_object(ws.recv(), "response")
    finally:
        ws.close()


@pytest.fixture(params=["kubernetes", "cluster"])
def kube_target(request, tmp_path):
    return make_store_target(request.param, request, tmp_path)


def _secret_names(target):
    api = config.new_client_from_config(config_file=target.kubeconfig)
    try:
        return sorted(s.metadata.name for s in client.CoreV1Api(api).list_namespaced_secret(target.namespace).items
                      if (s.metadata.labels or {}).get("kcrypt.kairos.io/managed-by") == "kcrypt-challenger")
    finally:
        api.close()


def test_two_replicas_200_concurrent_first_contacts(kube_target, tmp_path):
    keys = soft_tpm.key_pool(DISTINCT + 1)
    identities = [SoftTPM(ek_key=key, ak_key=keys[-1]) for key in keys[:DISTINCT]]
    contacts = [identities[i % DISTINCT] for i in range(CONTACTS)]
    ports = [free_port(), free_port()]
    replicas = [ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", kube_target.url,
                                   "--log-level", "warning"], port, log_path=str(tmp_path / ("replica%d.log" % i)))
                for i, port in enumerate(ports)]
    try:
        for replica in replicas:
            replica.start()
        barrier = threading.Barrier(CONTACTS)

        def first_contact(index):
            barrier.wait()
            return attest(replicas[index % 2].url.replace("http", "ws", 1), contacts[index])

        with concurrent.futures.ThreadPoolExecutor(CONTACTS) as pool:
            responses = list(pool.map(first_contact, range(CONTACTS)))
        errors = [r for r in responses if "passphrase" not in r]
        assert errors == []
        handed_out = {}
        for node, response in zip(contacts, responses):
            handed_out.setdefault(node.tpm_hash, set()).add(response["passphrase"])
        assert len(handed_out) == DISTINCT and all(len(v) == 1 for v in handed_out.values())

        with kube_target.open() as kms_store:
            volumes = kms_store.list_volumes()
            assert len(volumes) == DISTINCT
            assert sorted(st.volume_tpm_hash(v) for v in volumes) == sorted(n.tpm_hash for n in identities)
            secret_names = _secret_names(kube_target)
            assert len(secret_names) == DISTINCT
            assert secret_names == sorted(v["spec"]["partitions"][0]["secret"]["name"] for v in volumes)
            for node in identities[:20]:
                volume = kms_store.find_volume(node.tpm_hash)
                secret = kms_store.get_secret(volume["spec"]["partitions"][0]["secret"]["name"])
                assert base64.b64encode(secret["data"]["passphrase"]).decode() in handed_out[node.tpm_hash]
        for node in identities[:20]:  # retrievable afterwards from either replica
            again = attest(replicas[1].url.replace("http", "ws", 1), node)
            assert {again["passphrase"]} == handed_out[node.tpm_hash]
    finally:
        for replica in replicas:
            replica.stop()
