# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Recovery keys escrowed in the KMS (issue 16 part 3), with real parts: a swtpm node, LUKS2 on loop
devices, the challenger on 127.0.0.1 over SQLite and over the Kubernetes API emulator.

* the escrowed key opens the partition (cryptsetup --test-passphrase), the node's result never holds it;
* neither protocol hands it to a node, whatever partition, label, name or Secret name is asked for,
  and ``/postPass`` cannot overwrite it;
* an escrow without a valid TPM proof (wrong credential, broken or unbound quote, PCRs the quote does not sign),
  for another TPM's partition, with bad partition headers (over-long, bad characters, none), or for a
  quarantined TPM writes nothing;
* every read by an administrator is audited first (CLI and module);
* rotation replaces it, the old key no longer opens, a crash in the middle keeps an escrowed key that opens;
* the controller escrow (the key returned once) stays available.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import sqlite3
import subprocess
import sys

import pytest
import websocket
from kubernetes import client as kclient, config as kconfig

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger as challenger_cli, kcrypt as kcrypt_cli
from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, recovery as kms_recovery, server, store, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.kube_names import RECOVERY_SECRET_KEY, SECRET_TYPE_LABEL
from ansible_collections.kairos.kcrypt.plugins.module_utils.node import blockdev, encryption, key_source, luks, recovery
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support import playbook
from support.challenger import ChallengerThread, connect
from support.loopdisk import make_ext4, opens_with, unique_label
from support.node_fixtures import fast_options, loop_disks, node  # noqa: F401  # pylint: disable=unused-import
from support.soft_tpm import SoftTPM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = os.path.join(ROOT, "plugins", "modules")


@pytest.fixture(params=["sqlite", "kubernetes"])
def kms_store(request, tmp_path):
    """The KMS store: a SQLite file, or a namespace (and its recovery namespace) on the API emulator."""
    if request.param == "sqlite":
        url = "sqlite://%s/kms.db" % tmp_path
    else:
        api = request.getfixturevalue("kube_api")
        url = "kubernetes://?kubeconfig=%s&namespace=kcrypt-esc-%s" % (api.kubeconfig, secrets.token_hex(4))
    opened = store_factory.open_store(url)
    opened.test_url = url
    try:
        yield opened
    finally:
        opened.close()


def kms(kms_store, enrollment="tofu", **options):
    return ChallengerThread(server.Challenger(policy.Policy(kms_store, enrollment=enrollment), ready_check=kms_store.ping, **options))


def node_params(url, node, **extra):
    values = {"key_source": "kms", "challenger_server": url, "tpm_device": node.tcti, "kms_attempts": 2, "kms_retry_delay": 0.05}
    values.update(extra)
    return values


def encrypt(params, label, escrow=recovery.ESCROW_KMS):
    source = key_source.build(params)
    request = encryption.EncryptRequest(partitions=(encryption.Selector(label=label),), mode="in_place", options=fast_options(),
                                        recovery_key=True, recovery_escrow=recovery.build_escrow(escrow, params))
    return encryption.apply(encryption.plan(request, source), request, source)[0], source


def labelled_partition(loop_disks):
    disk = loop_disks([("part0", 40)])
    label = unique_label()
    make_ext4(disk.partitions[0], label)
    return disk.partitions[0], label


def reveal(kms_store, node, label=None, reason="test"):
    (found,) = kms_recovery.reveal(kms_store, node.tpm_hash, "pytest", partition=label, reason=reason)
    return found


def run_module(tmp_path, name, no_log=False, check_mode=False, **args):
    """Run a module as Ansible does (subprocess, argument file); returns (result, raw output)."""
    if no_log:
        args["_ansible_no_log"] = True
    if check_mode:
        args["_ansible_check_mode"] = True
    args_file = tmp_path / ("args-%s.json" % secrets.token_hex(4))
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, ".collections"))
    process = subprocess.run([sys.executable, os.path.join(MODULES, name + ".py"), str(args_file)], capture_output=True,
                             text=True, env=env, check=False, timeout=300)
    args_file.unlink()
    return json.loads(process.stdout[process.stdout.index("{"):]), process.stdout + process.stderr


def admin(kms_store, *argv):
    """kcrypt-challenger's admin CLI in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = challenger_cli.main(list(argv[:2]) + ["--store", kms_store.test_url] + list(argv[2:]), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- the escrowed key opens the partition, and no node gets it ------------------------------------


def test_escrowed_key_opens_the_partition_and_is_never_served_to_a_node(kms_store, node, loop_disks, tmp_path):
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node)
        result, source = encrypt(params, label)
        assert result["recovery_key_added"] and "recovery_key" not in result  # escrowed, not returned
        (passphrase,) = source.secrets
        found = reveal(kms_store, node)
        key = found["recovery_key"]
        assert found["escrowed"] and found["partition"] == label and found["escrowed_at"]
        assert len(key) == 71 and key != passphrase
        # the escrowed key opens the partition: the project's helper and cryptsetup itself
        assert luks.test_passphrase(device, key) and opens_with(device, key)
        header = luks.read_header(device)
        assert recovery.kept_slots(header) == header.recovery_slots and len(header.recovery_slots) == 1
        assert luks.test_passphrase(device, key, keyslot=header.recovery_slots[0])

        # A partition whose Secret an administrator named after the recovery Secret, on a registration without
        # attestation (a legacy node's): the legacy /getPass does not find it, so the node /postPasses a passphrase,
        # which lands among the passphrase Secrets; the newest protocol then serves that. The recovery key is
        # neither served nor overwritten.
        secret_name = found["secret"]
        volume = kms_store.find_volume(node.tpm_hash)
        volume["spec"]["partitions"].append({"label": "POINTED", "secret": {"name": secret_name, "path": RECOVERY_SECRET_KEY}})
        volume["spec"].pop("attestation")
        kms_store.update_volume(volume)
        for protocol_name in ("legacy", "attestation"):
            config = key_source.build(node_params(kms_thread.url, node, kms_protocol=protocol_name)).config
            try:
                value = kms_client.get_passphrase(config, PartitionRef(label="POINTED"))
            except KcryptError as error:
                value = str(error).encode()
            assert key not in value
        posted = kms_store.get_secret(secret_name)  # the node's /postPass: a passphrase Secret of the same name
        assert posted["data"]["generated_by"] == b"tpm" and key not in posted["data"][RECOVERY_SECRET_KEY]
        assert reveal(kms_store, node, label)["recovery_key"] == key
        # Both protocols, asked for the partition by its label, name and UUID, and by every name the recovery
        # Secret goes by (label "<label>-recovery" even makes a TOFU passphrase Secret, or reuses the posted one,
        # of the recovery Secret's very name), serve a passphrase or refuse, never the recovery key.
        asks = [PartitionRef(label=label), PartitionRef(device_name=blockdev.probe(device).name),
                PartitionRef(label=secret_name), PartitionRef(label=RECOVERY_SECRET_KEY), PartitionRef(device_name=secret_name),
                PartitionRef(uuid=secret_name), PartitionRef(label=label + "-recovery")]
        served = []
        for protocol_name in ("attestation", "legacy"):
            config = key_source.build(node_params(kms_thread.url, node, kms_protocol=protocol_name)).config
            for ref in asks:
                try:
                    served.append(kms_client.get_passphrase(config, ref))
                except KcryptError as error:
                    assert key.decode() not in str(error)
        assert passphrase in served and key not in served and all(key not in value for value in served)

        assert reveal(kms_store, node, label)["recovery_key"] == key
        assert luks.test_passphrase(device, key)


def test_escrow_needs_a_tpm_proof_and_writes_only_the_nodes_own_partition(kms_store, node, loop_disks):
    device, label = labelled_partition(loop_disks)
    stranger = SoftTPM()
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node)
        encrypt(params, label)
        key = reveal(kms_store, node, label)["recovery_key"]
        secret_name = reveal(kms_store, node, label)["secret"]

        def raw_escrow(tpm, headers, nonce=True, recovery_key=b"x" * 32, tamper=None):
            ws = connect(kms_thread.ws_url, path=protocol.RECOVERY_ESCROW_PATH, headers=headers)
            try:
                ws.send(protocol.write_json(tpm.init_message()))
                challenge = protocol.load_json_object(ws.recv(), "challenge")
                if "challenge" not in challenge:
                    return challenge
                proof = tpm.proof_message(challenge, nonce=nonce)
                proof["recovery_key"] = protocol.b64encode(recovery_key)
                if tamper:
                    tamper(proof)
                ws.send(protocol.write_json(proof))
                return protocol.load_json_object(ws.recv(), "response")
            finally:
                ws.close()

        headers = {"label": label, "name": "", "uuid": ""}
        # an unregistered TPM, asking for the node's partition: refused
        answer = raw_escrow(stranger, headers)
        assert "not registered" in answer["error"]
        # registered, but the partition is another TPM's: refused, the other TPM's key untouched
        kms_store.create_volume(store.new_volume("stranger", stranger.tpm_hash, partitions=[{"label": "STRANGER_DATA"}]))
        answer = raw_escrow(stranger, headers)
        assert "partition label=%s is not registered for this TPM" % label in answer["error"]
        # its own partition, but no valid proof: a wrong activation secret, a quote not bound to the nonce
        own = {"label": "STRANGER_DATA", "name": "", "uuid": ""}
        answer = raw_escrow(stranger, own, tamper=lambda proof: proof.update(secret=protocol.b64encode(b"\0" * 32)))
        assert answer["error"].endswith("invalid secret")
        answer = raw_escrow(stranger, own, nonce=False)
        assert "qualifying data does not match the nonce" in answer["error"]  # refused even where /tpm-attestation takes it
        # sizes are bounded before anything is stored
        for size in (0, 8, protocol.MAX_RECOVERY_KEY_SIZE + 1):
            answer = raw_escrow(stranger, own, recovery_key=b"k" * size)
            assert "recovery_key must be" in answer["error"]
        assert kms_store.get_recovery_secret("stranger-stranger-data-recovery") is None
        # what a node may declare is bounded as for a passphrase: the label matches, the name is not a device name
        for bad in ({"name": "vda5;reboot"}, {"uuid": "u" * 65}, {"name": "n" * 65}):
            answer = raw_escrow(stranger, dict(own, **bad))
            assert "invalid partition" in answer["error"], (bad, answer)
        assert kms_store.get_recovery_secret("stranger-stranger-data-recovery") is None
        # quarantined: refused
        volume = kms_store.get_volume("stranger")
        volume["spec"]["quarantined"] = True
        kms_store.update_volume(volume)
        assert "quarantined" in raw_escrow(stranger, own)["error"]
        assert kms_store.get_recovery_secret("stranger-stranger-data-recovery") is None
        # a proper escrow of its own partition is stored, under its own name
        volume = kms_store.get_volume("stranger")
        volume["spec"].pop("quarantined")
        kms_store.update_volume(volume)
        assert raw_escrow(stranger, own, recovery_key=b"s" * 40) == {"escrowed": True}
        assert kms_store.get_recovery_secret("stranger-stranger-data-recovery")["data"][RECOVERY_SECRET_KEY] == b"s" * 40
        # the node's own escrow was never touched
        assert kms_store.get_recovery_secret(secret_name)["data"][RECOVERY_SECRET_KEY] == key
        assert luks.test_passphrase(device, key)
    if isinstance(kms_store, store_factory.store_sqlite.SQLiteStore):
        with sqlite3.connect(kms_store.path) as db:
            assert sorted(r[0] for r in db.execute("SELECT name FROM recovery_secrets")) == sorted(
                [secret_name, "stranger-stranger-data-recovery"])


def stored_state(kms_store):
    """Everything an escrow could write: the recovery Secrets' names, and each SealedVolume with its version."""
    if isinstance(kms_store, store_factory.store_sqlite.SQLiteStore):
        with sqlite3.connect(kms_store.path) as db:
            names = sorted(r[0] for r in db.execute("SELECT name FROM recovery_secrets"))
    else:
        kubeconfig = kms_store.test_url.split("kubeconfig=")[1].split("&")[0]
        api = kconfig.new_client_from_config(config_file=kubeconfig)
        try:
            names = sorted(s.metadata.name for s in kclient.CoreV1Api(api).list_namespaced_secret(kms_store.recovery_namespace).items)
        finally:
            api.close()
    volumes = sorted((v["metadata"]["name"], v["metadata"].get("resourceVersion"), json.dumps(v["spec"], sort_keys=True))
                     for v in kms_store.list_volumes())
    return names, volumes


def tpm_escrow(kms_thread, node, headers, recovery_key=b"r" * 40, forge=None):
    """One /recovery-escrow exchange driven by hand with the node's swtpm (the client's own steps, to change one).

    ``headers``: the handshake's headers (None: none at all); ``forge(tpm, ak, secret, pcr_quote)`` returns the
    (secret, pcr_quote) to send instead of the genuine ones. Returns the KMS's answer."""
    with TPM(node.tcti) as tpm:
        ek = tpm.endorsement_key()
        ak = tpm.create_ak()
        init = protocol.init_message(ek.spki_der, protocol.AttestationParameters.from_attestation_key(ak))
        header = ["%s: %s" % item for item in (headers or {}).items()]
        ws = websocket.create_connection(kms_thread.ws_url + protocol.RECOVERY_ESCROW_PATH, header=header, timeout=30,
                                         suppress_origin=True)
        try:
            ws.send(protocol.write_json(init))
            challenge = protocol.parse_challenge(protocol.load_json_object(ws.recv(), "challenge"))
            secret = tpm.activate_credential(ak, challenge.credential, challenge.secret)
            quote, signature = tpm.quote(ak, protocol.QUOTE_PCRS, qualifying_data=secret)
            pcr_quote = protocol.PCRQuote(protocol.QUOTE_VERSION, quote, signature, tpm.pcr_read(protocol.QUOTE_PCRS))
            if forge:
                secret, pcr_quote = forge(tpm, ak, secret, pcr_quote)
            ws.send(protocol.write_json(protocol.escrow_message(secret, pcr_quote, recovery_key)))
            return protocol.load_json_object(ws.recv(), "response")
        finally:
            ws.close()


def _other_pcrs(tpm, ak, secret, pcr_quote):
    pcrs = dict(pcr_quote.pcrs)
    pcrs[0] = bytes(32) if pcrs[0] != bytes(32) else b"\1" * 32
    return secret, dataclasses.replace(pcr_quote, pcrs=pcrs)


def _unbound_quote(tpm, ak, secret, pcr_quote):
    quote, signature = tpm.quote(ak, protocol.QUOTE_PCRS, qualifying_data=b"")
    return secret, dataclasses.replace(pcr_quote, quote=quote, signature=signature)


# A registration holding partitions a node must not be able to name: were the request's values not checked
# before matching, each bad header below would match one of them and its recovery key would be written.
ODD_PARTITIONS = [{"label": "L" * 256}, {"label": "BAD\tLABEL"}, {"deviceName": "vda5;reboot"}, {"deviceName": "n" * 65},
                  {"uuid": "u" * 65}]


@pytest.mark.parametrize("headers, refusal", [
    ({"label": "L" * 256, "name": "", "uuid": ""}, "invalid partition: label is longer than 255 bytes (256 bytes)"),
    ({"label": "BAD\tLABEL", "name": "", "uuid": ""}, "invalid partition: label holds control characters"),
    ({"label": "", "name": "vda5;reboot", "uuid": ""}, "invalid partition: name holds characters other than"),
    ({"label": "", "name": "n" * 65, "uuid": ""}, "invalid partition: name is longer than 64 bytes"),
    ({"label": "", "name": "", "uuid": "u" * 65}, "invalid partition: uuid is longer than 64 bytes"),
    ({"label": "", "name": "", "uuid": ""}, "invalid partition: the request names no partition"),
    ({"label": "", "name": "", "uuid": "unknown"}, "invalid partition: the request names no partition"),
    (None, "invalid partition: the request names no partition"),  # no headers at all
], ids=["long-label", "control-label", "bad-name", "long-name", "long-uuid", "empty", "unknown-uuid", "none"])
def test_escrow_with_bad_partition_headers_is_refused_and_writes_nothing(kms_store, node, headers, refusal):
    kms_store.create_volume(store.new_volume("odd", node.tpm_hash, partitions=[{"label": "COS_PERSISTENT"}] + ODD_PARTITIONS))
    before = stored_state(kms_store)
    with kms(kms_store) as kms_thread:
        answer = tpm_escrow(kms_thread, node, headers)
        assert list(answer) == ["error"] and answer["error"].startswith("Attestation verification failed: " + refusal), answer
        assert stored_state(kms_store) == before
        # the same TPM and proof with a good header escrows: the refusal was the header's
        assert tpm_escrow(kms_thread, node, {"label": "COS_PERSISTENT", "name": "", "uuid": ""}) == {"escrowed": True}
    assert stored_state(kms_store)[0] == ["odd-cos-persistent-recovery"]


@pytest.mark.parametrize("forge, refusal", [
    (lambda tpm, ak, secret, pcr_quote: (bytes(32), pcr_quote), "invalid secret"),  # wrong credential
    (lambda tpm, ak, secret, pcr_quote: (secret, dataclasses.replace(pcr_quote, signature=pcr_quote.signature[:-1] + bytes(
        [pcr_quote.signature[-1] ^ 1]))), "quote signature verification failed"),  # the quote's signature broken
    (_other_pcrs, "the PCR values do not match the quoted digest"),  # PCR values the quote does not sign
    (_unbound_quote, "qualifying data does not match the nonce"),  # a genuine quote, not bound to this exchange
], ids=["wrong-credential", "bad-signature", "other-pcrs", "unbound-quote"])
def test_an_unauthenticated_escrow_writes_nothing(kms_store, node, forge, refusal):
    """The node's own TPM, its own registered partition: only the proof is wrong, and nothing is written."""
    kms_store.create_volume(store.new_volume("own", node.tpm_hash, partitions=[{"label": "COS_PERSISTENT"}]))
    headers = {"label": "COS_PERSISTENT", "name": "", "uuid": ""}
    before = stored_state(kms_store)
    with kms(kms_store) as kms_thread:
        answer = tpm_escrow(kms_thread, node, headers, forge=forge)
        assert "escrowed" not in answer and refusal in answer["error"], answer
        assert stored_state(kms_store) == before == ([], before[1])
        assert tpm_escrow(kms_thread, node, headers) == {"escrowed": True}  # the genuine proof is accepted


def test_recovery_secrets_live_apart_with_their_own_label(kms_store):
    doc = store.new_secret("node-data-recovery", {RECOVERY_SECRET_KEY: b"r" * 71},
                           labels={SECRET_TYPE_LABEL: "recovery-key"})
    kms_store.put_recovery_secret(doc)
    assert kms_store.get_secret("node-data-recovery") is None  # no passphrase path can find it
    kms_store.put_recovery_secret(store.new_secret("node-data-recovery", {RECOVERY_SECRET_KEY: b"2" * 71},
                                                   labels={SECRET_TYPE_LABEL: "recovery-key"}))
    assert kms_store.get_recovery_secret("node-data-recovery")["data"] == {RECOVERY_SECRET_KEY: b"2" * 71}
    if kms_store.test_url.startswith("kubernetes"):
        kubeconfig = kms_store.test_url.split("kubeconfig=")[1].split("&")[0]
        api = kconfig.new_client_from_config(config_file=kubeconfig)
        try:
            core = kclient.CoreV1Api(api)
            raw = core.read_namespaced_secret("node-data-recovery", kms_store.namespace + "-recovery")
            assert raw.metadata.labels[SECRET_TYPE_LABEL] == "recovery-key"
            with pytest.raises(kclient.exceptions.ApiException):
                core.read_namespaced_secret("node-data-recovery", kms_store.namespace)
        finally:
            api.close()
        with pytest.raises(store.StoreError, match="must differ"):
            store_factory.open_store(kms_store.test_url + "&recovery_namespace=" + kms_store.namespace)


# -- retrieval is audited ------------------------------------------------------------------------


def test_every_read_is_audited_first(kms_store, node, loop_disks, tmp_path):
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        encrypt(node_params(kms_thread.url, node), label)
    assert kms_store.audit_events() == []  # the escrow itself reveals nothing

    code, out, err = admin(kms_store, "recovery", "show", node.tpm_hash, "--partition", label, "--reason", "INC-1")
    assert code == 0, err
    key = out.strip().rsplit(" ", 1)[1].encode()
    assert luks.test_passphrase(device, key)
    (event,) = kms_store.audit_events()
    assert event["action"] == "recovery-key-revealed" and event["tpm_hash"] == node.tpm_hash
    assert event["partition"] == label and event["secret"].endswith("-recovery") and event["reason"] == "INC-1"
    assert "uid %d" % os.getuid() in event["actor"] and "kcrypt-challenger recovery show" in event["actor"]
    assert event["time"].endswith("Z")

    # the module: reveal=true refuses without no_log, reads nothing and records nothing
    args = dict(tpm_hash=node.tpm_hash, reveal=True)
    if kms_store.test_url.startswith("sqlite"):
        args.update(store_path=kms_store.path)
    else:
        args.update(backend="kubernetes", kubeconfig=kms_store.test_url.split("kubeconfig=")[1].split("&")[0],
                    namespace=kms_store.namespace)
    result, output = run_module(tmp_path, "kairos_recovery_key", **args)
    assert result.get("failed") and "no_log" in result["msg"] and len(kms_store.audit_events()) == 1
    result, output = run_module(tmp_path, "kairos_recovery_key", no_log=True, reason="INC-2", **args)
    assert not result.get("failed") and result["changed"] is False, result
    (entry,) = result["recovery_keys"]
    assert entry["recovery_key"].encode() == key and entry["escrowed"]
    check_args = dict(args)
    check_args["reveal"] = False
    status, output = run_module(tmp_path, "kairos_recovery_key", **check_args)
    assert "recovery_key" not in status["recovery_keys"][0] and status["recovery_keys"][0]["escrowed"]
    assert key.decode() not in output
    events = kms_store.audit_events()
    assert [e["action"] for e in events] == ["recovery-key-revealed", "recovery-key-revealed", "recovery-key-checked"]
    assert "kairos_recovery_key" in events[1]["actor"] and events[1]["reason"] == "INC-2"

    code, out, err = admin(kms_store, "recovery", "audit")
    assert code == 0 and out.count("recovery-key-") == 3 and key.decode() not in out


# -- rotation ------------------------------------------------------------------------------------


def test_rotation_replaces_the_escrowed_key_and_the_old_one_no_longer_opens(kms_store, node, loop_disks, tmp_path):
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node)
        encrypt(params, label)
        old = reveal(kms_store, node, label)["recovery_key"]
        args = dict(params, partitions=[{"label": label}], rekey_id="after-recovery", step="recovery", recovery_escrow="kms")

        predicted, output = run_module(tmp_path, "kairos_luks_rekey", check_mode=True, **args)
        assert predicted["changed"] and predicted["partitions"][0]["recovery_key_rotated"], predicted
        assert reveal(kms_store, node, label)["recovery_key"] == old and luks.test_passphrase(device, old)

        result, output = run_module(tmp_path, "kairos_luks_rekey", **args)
        assert result["changed"] and result["partitions"][0]["recovery_key_rotated"], result
        assert "recovery_key" not in result["partitions"][0]
        new = reveal(kms_store, node, label)["recovery_key"]
        assert new != old and old.decode() not in output and new.decode() not in output
        assert luks.test_passphrase(device, new) and opens_with(device, new)
        assert not luks.test_passphrase(device, old) and not opens_with(device, old)
        assert len(luks.read_header(device).recovery_slots) == 1
        assert luks.test_passphrase(device, source_key(params, device, label))  # the main key is untouched

        again, output = run_module(tmp_path, "kairos_luks_rekey", **args)
        assert again["changed"] is False and not again["partitions"][0]["recovery_key_rotated"], again
        assert reveal(kms_store, node, label)["recovery_key"] == new


def source_key(params, device, label):
    return key_source.build(params).existing_key(blockdev.probe(device), label)


def test_rotation_interrupted_after_the_escrow_keeps_a_key_that_opens(kms_store, node, loop_disks, monkeypatch):
    """A crash between escrowing the new key and marking its slot: the escrowed key opens, a re-run completes."""
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node)
        encrypt(params, label)
        first = reveal(kms_store, node, label)["recovery_key"]
        current = source_key(params, device, label)
        escrow = recovery.build_escrow("kms", params)

        def crash(*args):
            raise KcryptError("power cut")

        with monkeypatch.context() as patch:
            patch.setattr(recovery.luks, "replace_token", crash)
            with pytest.raises(KcryptError, match="power cut"):
                recovery.add(blockdev.probe(device), current, fast_options(), escrow, label=label, rekey_id="r2")
        escrowed = reveal(kms_store, node, label)["recovery_key"]
        assert escrowed != first and luks.test_passphrase(device, escrowed) and luks.test_passphrase(device, first)
        header = luks.read_header(device)
        assert len(header.recovery_slots) == 2 and len(recovery.kept_slots(header)) == 1
        # a main-key re-key in between keeps both recovery slots (the pending one may hold the escrowed key)
        from ansible_collections.kairos.kcrypt.plugins.module_utils.node import rekey
        assert set(header.recovery_slots) <= set(header.key_slots) - set(rekey.old_slots(blockdev.probe(device)))

        outcome = rekey.rotate_recovery([blockdev.probe(device)], lambda d: current, escrow, "r2", fast_options())
        final = reveal(kms_store, node, label)["recovery_key"]
        assert outcome[device]["rotated"] and final not in (first, escrowed)
        assert luks.test_passphrase(device, final)
        assert not luks.test_passphrase(device, first) and not luks.test_passphrase(device, escrowed)
        header = luks.read_header(device)
        assert len(header.recovery_slots) == 1 and recovery.round_done(header, "r2")
        assert [t for t in header.tokens.values() if t.get("type") == luks.RECOVERY_TOKEN_TYPE and not t.get("keyslots")] == []


def test_escrow_failure_leaves_no_recovery_key_claimed(kms_store, node, loop_disks):
    """The KMS refuses the escrow (quarantine after encryption): the partition is not marked as having a
    recovery key, so the next run adds one again; the earlier escrowed key still opens."""
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node)
        encrypt(params, label)
        first = reveal(kms_store, node, label)["recovery_key"]
        volume = kms_store.find_volume(node.tpm_hash)
        volume["spec"]["quarantined"] = True
        kms_store.update_volume(volume)
        escrow = recovery.build_escrow("kms", params)
        with pytest.raises(kms_client.AttestationRejected, match="quarantined"):
            recovery.add(blockdev.probe(device), source_key_offline(params, kms_store, node, device, label), fast_options(),
                         escrow, label=label, rekey_id="r3")
        header = luks.read_header(device)
        assert len(recovery.kept_slots(header)) == 1 and len(header.recovery_slots) == 2
        assert reveal(kms_store, node, label)["recovery_key"] == first and luks.test_passphrase(device, first)


def source_key_offline(params, kms_store, node, device, label):
    """The partition's passphrase from the store (the node is quarantined, the KMS would refuse it)."""
    volume = kms_store.find_volume(node.tpm_hash)
    entry = [p for p in volume["spec"]["partitions"] if p.get("label") == label][0]
    return kms_store.get_secret(entry["secret"]["name"])["data"][entry["secret"].get("path", "passphrase")]


@pytest.mark.parametrize("kms_store", ["sqlite"], indirect=True)
def test_escrow_goes_with_the_attestation_protocol(kms_store, node, loop_disks):
    """``/recovery-escrow`` is the attestation protocol's proof: a KMS serving only ``legacy`` answers 404 and the
    node fails at once, saying why and what to do, and nothing is written; with ``attestation`` alone it escrows."""
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        params = node_params(kms_thread.url, node, kms_attempts=5, kms_retry_delay=2.0)
        encrypt(params, label)
        escrowed = reveal(kms_store, node, label)
    ref = PartitionRef(label=label)
    config = key_source.kms_client_config(params)
    with kms(kms_store, protocols=("legacy",)) as kms_thread:
        with pytest.raises(KcryptError) as info:
            kms_client.escrow_recovery_key(dataclasses.replace(config, challenger_server=kms_thread.url), ref, b"n" * 40)
    message = str(info.value)
    assert "404" in message and "protocol is disabled" in message and "recovery_escrow=controller" in message, message
    assert "after 5 attempts" not in message  # not retried: a 404 does not go away
    assert reveal(kms_store, node, label)["recovery_key"] == escrowed["recovery_key"]
    with kms(kms_store, protocols=("attestation",)) as kms_thread:
        assert kms_client.escrow_recovery_key(dataclasses.replace(config, challenger_server=kms_thread.url), ref, b"n" * 40)
    assert reveal(kms_store, node, label)["recovery_key"] == b"n" * 40


# -- ad hoc and from the CLI ----------------------------------------------------------------------


@pytest.mark.parametrize("kms_store", ["sqlite"], indirect=True)
def test_ad_hoc_module_and_cli_escrow(kms_store, node, loop_disks):
    """``ansible -m kairos.kcrypt.kairos_luks_encrypt`` and ``kcrypt encrypt`` escrow by themselves."""
    disk = loop_disks([("one", 40), ("two", 40)])
    labels = [unique_label(), unique_label()]
    for device, label in zip(disk.partitions, labels):
        make_ext4(device, label)
    with kms(kms_store) as kms_thread:
        args = dict(node_params(kms_thread.url, node), partitions=[{"label": labels[0]}], mode="in_place",
                    recovery_key=True, recovery_escrow="kms", pbkdf={"algorithm": "pbkdf2", "iteration_count": 1000})
        results = playbook.adhoc("localhost", "kairos.kcrypt.kairos_luks_encrypt", json.dumps(args),
                                 os.path.join(ROOT, "inventory", "localhost.yml"))
        result = results["localhost"]
        assert result.get("changed") and not result.get("failed"), result
        assert result["partitions"][0]["recovery_key_added"] and "recovery_key" not in result["partitions"][0]

        out = io.StringIO()
        code = kcrypt_cli.main(["--json", "encrypt", "--mode", "in_place", "--label", labels[1], "--key-source", "kms",
                                "--challenger-server", kms_thread.url, "--tpm-device", node.tcti, "--kms-attempts", "2",
                                "--recovery-key", "--recovery-escrow", "kms", "--pbkdf-algorithm", "pbkdf2",
                                "--pbkdf-iteration-count", "1000"], out=out, err=io.StringIO())
        assert code == 0, out.getvalue()
    for device, label in zip(disk.partitions, labels):
        key = reveal(kms_store, node, label)["recovery_key"]
        assert key.decode() not in json.dumps(result) + out.getvalue()
        assert opens_with(device, key)


# -- the controller escrow stays available ---------------------------------------------------------


def test_controller_escrow_returns_the_key_once_and_the_kms_keeps_none(kms_store, node, loop_disks):
    device, label = labelled_partition(loop_disks)
    with kms(kms_store) as kms_thread:
        result, source = encrypt(node_params(kms_thread.url, node), label, escrow=recovery.ESCROW_CONTROLLER)
    key = result["recovery_key"].encode()
    assert luks.test_passphrase(device, key) and opens_with(device, key)
    found = reveal(kms_store, node, label)
    assert not found["escrowed"] and found["recovery_key"] is None
