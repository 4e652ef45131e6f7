# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger with the real policy and SQLite store under concurrency and hostile input.

* 200 concurrent first contacts (150 distinct software TPM identities, 50 of them
  twice) against two ``kcrypt-challenger`` processes sharing one SQLite file:
  exactly one enrolment per TPM, and every passphrase handed out is the one the
  TPM gets afterwards.
* Every kind of bad input leaves the store untouched and the server serving.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import sqlite3
import threading

import pytest
import websocket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server, store_factory as store
from support import soft_tpm
from support.challenger import ChallengerProcess, ChallengerThread, connect, soft_attest
from support.soft_tpm import SoftTPM
from support.ports import free_port

DISTINCT = 150
CONTACTS = 200


def _counts(db_path):
    with sqlite3.connect(db_path) as conn:
        return (conn.execute("SELECT count(*) FROM sealed_volumes").fetchone()[0],
                conn.execute("SELECT count(*) FROM secrets").fetchone()[0])


def test_200_concurrent_first_contacts_enrol_each_tpm_once(tmp_path):
    keys = soft_tpm.key_pool(DISTINCT + 1)
    identities = [SoftTPM(ek_key=key, ak_key=keys[-1]) for key in keys[:DISTINCT]]  # the AK may be shared
    contacts = [identities[i % DISTINCT] for i in range(CONTACTS)]
    db = str(tmp_path / "kms.db")
    ports = [free_port(), free_port()]
    servers = [
        ChallengerProcess(["serve", "--listen", "127.0.0.1:%d" % port, "--store", "sqlite://" + db, "--log-level", "warning"],
                          port, log_path=str(tmp_path / ("kms%d.log" % i)))
        for i, port in enumerate(ports)
    ]
    servers[0].start()  # creates the database and its key file
    try:
        servers[1].start()
        barrier = threading.Barrier(CONTACTS)

        def first_contact(index):
            barrier.wait()
            url = servers[index % 2].url.replace("http", "ws", 1)
            return soft_attest(url, contacts[index], nonce=index % 3 != 0)  # a mix of HEAD-style and nonce-bound quotes

        with concurrent.futures.ThreadPoolExecutor(CONTACTS) as pool:
            responses = list(pool.map(first_contact, range(CONTACTS)))
        errors = [r for r in responses if "passphrase" not in r]
        assert errors == []
        handed_out = {}
        for node, response in zip(contacts, responses):
            handed_out.setdefault(node.tpm_hash, set()).add(response["passphrase"])
        assert len(handed_out) == DISTINCT
        assert all(len(values) == 1 for values in handed_out.values())  # repeated contacts got the same passphrase

        assert _counts(db) == (DISTINCT, DISTINCT)
        with store.open_store("sqlite://" + db) as kms_store:
            for node in identities:
                assert len(kms_store.volumes_for(node.tpm_hash)) == 1
        for node in identities:  # every passphrase is retrievable afterwards, from either server
            again = soft_attest(servers[hash(node.tpm_hash) % 2].url.replace("http", "ws", 1), node)
            assert {again["passphrase"]} == handed_out[node.tpm_hash]
            assert len(base64.b64decode(again["passphrase"])) == 44
    finally:
        for process in servers:
            process.stop()


@pytest.fixture
def kms(tmp_path):
    kms_store = store.open_store("sqlite://%s/kms.db" % tmp_path)
    challenger = server.Challenger(policy.Policy(kms_store), read_timeout=0.3, first_message_timeout=0.3, max_message_size=8192)
    with ChallengerThread(challenger) as running:
        running.db = str(tmp_path / "kms.db")
        yield running
    kms_store.close()


def _answer(ws):
    try:
        opcode, data = ws.recv_data(control_frame=True)
    except websocket.WebSocketConnectionClosedException:
        return "closed"
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        return "close %d" % int.from_bytes(data[:2], "big")
    return json.loads(data).get("error", "")


def test_bad_input_writes_nothing_and_the_server_keeps_serving(kms):
    keys = soft_tpm.key_pool(4)
    node = SoftTPM(keys[0], keys[1])
    outcomes = []

    def session(*frames, after_challenge=None):
        ws = connect(kms.ws_url)
        try:
            for frame in frames:
                ws.send(frame)
            if after_challenge is not None:
                ws.send(after_challenge(json.loads(ws.recv())))
            outcomes.append(_answer(ws))
        finally:
            ws.close()

    init = protocol.write_json(node.init_message())
    session("{broken")  # malformed JSON
    session('{"ek_public": {"x": 1}, "ak_params": []}')  # wrong types
    session("x" * 10000)  # oversized frame
    session()  # silent client
    bad_ak = node.attestation_parameters(public=node.ak_public_area(attributes=soft_tpm.AK_ATTRIBUTES & ~0x2))
    session(protocol.write_json(protocol.init_message(node.ek_spki_der, bad_ak)))  # exportable AK
    session(init, after_challenge=lambda c: protocol.write_json(dict(node.proof_message(c), secret="AAAA")))  # forged answer
    recorded = {}
    session(init, after_challenge=lambda c: recorded.setdefault("proof", protocol.write_json(node.proof_message(c))) and "{")
    session(init, after_challenge=lambda c: recorded["proof"])  # replayed answer

    def forged_quote(challenge):
        proof = node.proof_message(challenge)
        quote = proof["pcr_quote"]
        quote["pcrs"]["0"] = protocol.b64encode(b"\x11" * 32)  # values that do not match the signed digest
        return protocol.write_json(proof)

    session(init, after_challenge=forged_quote)
    assert outcomes[0].startswith("WebSocket read: reading attestation init: invalid JSON")
    assert outcomes[1].startswith("WebSocket read: reading attestation init: json: cannot unmarshal object")
    assert outcomes[2] == "close 1009"
    assert outcomes[3] == "WebSocket read: reading attestation init: no attestation init within 0.3s"
    assert outcomes[4] == "Challenge generation: generating challenge: provided key is exportable"
    assert outcomes[5] == "Attestation verification failed: invalid secret"
    assert outcomes[6].startswith("Proof read: reading proof: invalid JSON")
    assert outcomes[7] == "Attestation verification failed: invalid secret"
    assert "PCR digest verification failed" in outcomes[8]
    assert _counts(kms.db) == (0, 0)  # nothing written to the store
    assert "passphrase" in soft_attest(kms.ws_url, node)  # still serving
    assert _counts(kms.db) == (1, 1)
