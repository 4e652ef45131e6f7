# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Upstream's e2e scenarios 2, 3 and 7-11 (spec §8.2), step by step, with real parts and without VMs.

Upstream runs them on VMs against a k3d cluster; here the node is our client on a swtpm,
the KMS our challenger on 127.0.0.1 with the real policy, and the store every backend of
tests/integration/conftest.py (SQLite, the Kubernetes API emulator, a real cluster when
KUBECONFIG is set). The administrator's edits are made on the store directly, as upstream's
tests patch the SealedVolume with kubectl. A "reboot" is simply the next unlock: the
swtpm's PCRs stay as they are, which is what a healthy reboot looks like.
"""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerThread

PERSISTENT = PartitionRef(label="COS_PERSISTENT", device_name="vda5")
OEM = PartitionRef(label="COS_OEM", device_name="vda2")


@pytest.fixture(scope="module")
def node(swtpm_factory):
    started = swtpm_factory(ek_cert=True)
    with TPM(started.tcti) as tpm:
        started.ek = tpm.endorsement_key()
        started.pcrs = {str(i): value.hex() for i, value in tpm.pcr_read([0, 7, 11]).items()}
    yield started
    started.stop()


@pytest.fixture
def kms(store):
    store_calls = "inline" if store.url.startswith("sqlite:") else "thread"
    with ChallengerThread(server.Challenger(policy.Policy(store), store_calls=store_calls)) as running:
        yield running


def unlock(kms, node, partition, **kwargs):
    return client.get_passphrase(client.ClientConfig(kms.url, tpm_device=node.tcti, attempts=1, **kwargs), partition)


def refused(kms, node, partition, text):
    with pytest.raises(client.AttestationRejected, match="^attestation failed: Attestation verification failed: .*" + text):
        unlock(kms, node, partition)


def volume_of(kms_store, node):
    (volume,) = kms_store.volumes_for(node.ek.tpm_hash)
    return volume


def edit(kms_store, node, change):
    volume = volume_of(kms_store, node)
    change(volume["spec"])
    kms_store.update_volume(volume)


def registered(name, node, partitions, **kwargs):
    """A SealedVolume as an administrator writes it for this node."""
    return st.new_volume(name, node.ek.tpm_hash, partitions, **kwargs)


def test_remote_auto(kms, store, node):
    """Scenario 2: a pre-created SealedVolume (TPM hash + label, no Secret) gets a generated Secret <volume>-<label>."""
    store.create_volume(registered("auto-node", node, [{"label": "COS_PERSISTENT"}]))
    passphrase = unlock(kms, node, PERSISTENT)
    secret = store.get_secret("auto-node-cos-persistent")
    assert secret["data"]["passphrase"] == passphrase and len(passphrase) == 44
    assert secret["metadata"]["labels"]["kcrypt.kairos.io/managed-by"] == "kcrypt-challenger"
    assert unlock(kms, node, PERSISTENT) == passphrase  # after the reboot


def test_remote_static(kms, store, node):
    """Scenario 3: the administrator's Secret <volume>-cos-persistent (key passphrase) is what the node gets."""
    store.create_secret(st.new_secret("static-node-cos-persistent", {"passphrase": b"an administrator's passphrase"}))
    store.create_volume(registered("static-node", node, [{"label": "COS_PERSISTENT"}]))
    assert unlock(kms, node, PERSISTENT) == b"an administrator's passphrase"
    assert unlock(kms, node, PERSISTENT) == b"an administrator's passphrase"


def test_remote_complete_workflow(kms, store, node):
    """Scenario 7: LiveCD install of two partitions, reboot, quarantine, PCR and EK re-learning, recreated volume."""
    # LiveCD install: TOFU with PCRs deferred, one Secret per partition.
    persistent = unlock(kms, node, PERSISTENT, defer_pcr_enrollment=True)
    oem = unlock(kms, node, OEM, defer_pcr_enrollment=True)
    volume = volume_of(store, node)
    name = volume["metadata"]["name"]
    assert name == "tofu-" + node.ek.tpm_hash[:8]
    secrets = {label: store.get_secret("%s-%s" % (name, label)) for label in ("cos-persistent", "cos-oem")}
    assert secrets["cos-persistent"]["data"]["passphrase"] == persistent and secrets["cos-oem"]["data"]["passphrase"] == oem
    assert all(s["metadata"]["labels"]["kcrypt.kairos.io/managed-by"] == "kcrypt-challenger" for s in secrets.values())
    attestation = volume["spec"]["attestation"]
    assert attestation["ekPublicKey"] == node.ek.public_pem and attestation["pcrValues"]["pcrs"] == {"0": "", "7": "", "11": ""}

    # First boot of the installed system: same passphrases, the PCRs are learned.
    assert (unlock(kms, node, PERSISTENT), unlock(kms, node, OEM)) == (persistent, oem)
    assert volume_of(store, node)["spec"]["attestation"]["pcrValues"]["pcrs"] == node.pcrs

    # Quarantine refuses every partition; lifting it restores access.
    edit(store, node, lambda spec: spec.update(quarantined=True))
    refused(kms, node, PERSISTENT, "TPM is quarantined")
    refused(kms, node, OEM, "TPM is quarantined")
    edit(store, node, lambda spec: spec.update(quarantined=False))
    assert unlock(kms, node, PERSISTENT) == persistent

    # PCR0 set to a wrong value: refused; set to "": accepted and re-learned.
    edit(store, node, lambda spec: spec["attestation"]["pcrValues"]["pcrs"].update({"0": "ab" * 32}))
    refused(kms, node, PERSISTENT, "PCR0 changed - boot state verification failed: expected %s, got %s" % ("ab" * 32, node.pcrs["0"]))
    edit(store, node, lambda spec: spec["attestation"]["pcrValues"]["pcrs"].update({"0": ""}))
    assert unlock(kms, node, PERSISTENT) == persistent
    assert volume_of(store, node)["spec"]["attestation"]["pcrValues"]["pcrs"]["0"] == node.pcrs["0"]

    # EK set to "": accepted and re-learned as a PUBLIC KEY PEM with its trailing newline.
    edit(store, node, lambda spec: spec["attestation"].update(ekPublicKey=""))
    assert unlock(kms, node, PERSISTENT) == persistent
    learned = volume_of(store, node)["spec"]["attestation"]["ekPublicKey"]
    assert learned == node.ek.public_pem and learned.endswith("-----END PUBLIC KEY-----\n") and len(learned) > 100
    # A wrong EK is refused; restoring it works again.
    edit(store, node, lambda spec: spec["attestation"].update(ekPublicKey="wrong-ek-value"))
    refused(kms, node, PERSISTENT, "EK verification failed: EK public key does not match enrolled key - potential TPM impersonation")
    edit(store, node, lambda spec: spec["attestation"].update(ekPublicKey=learned))
    assert unlock(kms, node, PERSISTENT) == persistent

    # The SealedVolume is deleted and recreated without attestation; the Secrets stay and are reused unchanged.
    before = {label: store.get_secret("%s-%s" % (name, label)) for label in ("cos-persistent", "cos-oem")}
    assert store.delete_volume(name) is True
    store.create_volume(registered(name, node, [{"label": "COS_PERSISTENT"}, {"label": "COS_OEM"}]))
    assert (unlock(kms, node, PERSISTENT), unlock(kms, node, OEM)) == (persistent, oem)
    after = {label: store.get_secret("%s-%s" % (name, label)) for label in ("cos-persistent", "cos-oem")}
    for label in before:
        assert after[label]["data"] == before[label]["data"]
        assert after[label]["metadata"]["resourceVersion"] == before[label]["metadata"]["resourceVersion"]
    relearned = volume_of(store, node)["spec"]
    assert relearned["attestation"]["ekPublicKey"] == node.ek.public_pem and relearned["attestation"]["pcrValues"]["pcrs"] == node.pcrs


def static(kms_store, name, value):
    kms_store.create_secret(st.new_secret(name, {"passphrase": value}))
    return [{"label": "COS_PERSISTENT", "secret": {"name": name, "path": "passphrase"}}]


def test_remote_ek_only(kms, store, node):
    """Scenario 8: ``attestation: {}`` and a static Secret: the EK is learned, PCRs are never stored."""
    store.create_volume(registered("ek-only", node, static(store, "ek-only-static", b"ek only passphrase"), attestation={}))
    for dummy in range(2):  # install, then reboot
        assert unlock(kms, node, PERSISTENT) == b"ek only passphrase"
    attestation = volume_of(store, node)["spec"]["attestation"]
    assert attestation["ekPublicKey"] == node.ek.public_pem and "pcrValues" not in attestation


def test_remote_selective_pcr(kms, store, node):
    """Scenario 9: EK "" and PCRs 0 and 7 "": both PCRs and the EK are learned, PCR 11 stays unchecked."""
    attestation = {"ekPublicKey": "", "pcrValues": {"pcrs": {"0": "", "7": ""}}}
    store.create_volume(registered("selective", node, static(store, "selective-static", b"selective"), attestation=attestation))
    assert unlock(kms, node, PERSISTENT) == b"selective"
    attestation = volume_of(store, node)["spec"]["attestation"]
    assert attestation["ekPublicKey"] == node.ek.public_pem
    assert attestation["pcrValues"]["pcrs"] == {"0": node.pcrs["0"], "7": node.pcrs["7"]}
    assert unlock(kms, node, PERSISTENT) == b"selective"


def test_remote_ek_reenroll(kms, store, node):
    """Scenario 10: after TOFU the EK is cleared; the value learned again equals the original."""
    passphrase = unlock(kms, node, PERSISTENT)
    original = volume_of(store, node)["spec"]["attestation"]["ekPublicKey"]
    edit(store, node, lambda spec: spec["attestation"].update(ekPublicKey=""))
    assert unlock(kms, node, PERSISTENT) == passphrase
    assert volume_of(store, node)["spec"]["attestation"]["ekPublicKey"] == original == node.ek.public_pem


def test_remote_mixed_modes(kms, store, node):
    """Scenario 11: EK enforced, PCR0 "", PCR7 enforced, PCR11 omitted: works, PCR0 learned, the rest unchanged."""
    pcrs = {"0": "", "7": node.pcrs["7"]}
    attestation = {"ekPublicKey": node.ek.public_pem, "pcrValues": {"pcrs": pcrs}}
    store.create_volume(registered("mixed", node, static(store, "mixed-static", b"mixed"), attestation=attestation))
    assert unlock(kms, node, PERSISTENT) == b"mixed"
    attestation = volume_of(store, node)["spec"]["attestation"]
    assert attestation["pcrValues"]["pcrs"] == {"0": node.pcrs["0"], "7": node.pcrs["7"]}
    assert attestation["ekPublicKey"] == node.ek.public_pem
