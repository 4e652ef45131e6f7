# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PCR upgrade windows that close by themselves (issue 16 part 2), with swtpm PCR extends, on every store.

A swtpm node enrols (the KMS learns PCRs 0, 7 and 11), an "upgrade" extends PCR 7 on the TPM,
and the window is opened the way kairos_sealedvolume opens it (registration.plan_registration).
``store`` is tests/integration/conftest.py's fixture: SQLite, the Kubernetes API emulator with
the collection's CRD, and a real cluster when KUBECONFIG is set.
"""

from __future__ import annotations

import datetime
import logging
import time

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, registration, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import rfc3339
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerThread

PERSISTENT = PartitionRef(label="COS_PERSISTENT", device_name="vda5")


@pytest.fixture
def node(swtpm_factory):
    """A node's TPM (a copy of the shared provisioned one), stopped after the test."""
    tpm = swtpm_factory(ek_cert=True)
    with TPM(tpm.tcti) as handle:
        tpm.tpm_hash = handle.endorsement_key().tpm_hash
    yield tpm
    tpm.stop()


def _kms(kms_store):
    store_calls = "inline" if kms_store.url.startswith("sqlite:") else "thread"
    return ChallengerThread(server.Challenger(policy.Policy(kms_store), store_calls=store_calls))


def _get(kms, tpm):
    config = client.ClientConfig(challenger_server=kms.url, tpm_device=tpm.tcti, attempts=1)
    return client.get_passphrase(config, PERSISTENT)


def _refused(kms, tpm, match):
    with pytest.raises(client.AttestationRejected, match=match):
        _get(kms, tpm)


def _upgrade(tpm, measurement):
    """What an OS upgrade does to the boot chain: PCR 7 is extended with something new. Returns the new value."""
    with TPM(tpm.tcti) as handle:
        handle.pcr_extend(7, measurement)
        return handle.pcr_read([7])[7].hex()


def _pcr7(tpm):
    with TPM(tpm.tcti) as handle:
        return handle.pcr_read([7])[7].hex()


def _open_window(kms_store, tpm_hash, until, relearn_to=None):
    wish = {"ek": "learn", "pcrs": {"0": "learn", "7": "relearn", "11": "learn"}, "relearn_until": until}
    if relearn_to:
        wish["relearn_to"] = relearn_to
    plan = registration.plan_registration(kms_store, tpm_hash, None, attestation=wish)
    return registration.apply_plan(kms_store, plan)


def _pcr_values(kms_store, tpm_hash):
    return kms_store.find_volume(tpm_hash)["spec"]["attestation"]["pcrValues"]


def test_a_change_inside_the_window_is_learned_and_enforced_right_after(store, node, caplog):
    caplog.set_level(logging.INFO, logger="kcrypt.audit")
    with _kms(store) as kms:
        passphrase = _get(kms, node)
        enrolled = _pcr7(node)
        assert _pcr_values(store, node.tpm_hash)["pcrs"]["7"] == enrolled

        upgraded = _upgrade(node, b"shim 15.8 + grub 2.12")
        _refused(kms, node, "PCR7 changed - boot state verification failed: expected %s, got %s" % (enrolled, upgraded))

        volume = _open_window(store, node.tpm_hash, "1h")
        assert registration.pcr_window_report(volume)["7"]["state"] == "open"
        assert _get(kms, node) == passphrase
        values = _pcr_values(store, node.tpm_hash)
        assert values["pcrs"]["7"] == upgraded and "relearnUntil" not in values  # learned, and enforced from now on
        relearns = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pcr-relearn ")]
        assert len(relearns) == 1 and "tpm_hash=%s pcr=7 old=%s new=%s" % (node.tpm_hash, enrolled, upgraded) in relearns[0]

        second = _upgrade(node, b"something after the upgrade")
        _refused(kms, node, "PCR7 changed - boot state verification failed: expected %s, got %s" % (upgraded, second))


def test_a_window_that_expires_without_contact_leaves_the_old_value_enforced(store, node):
    with _kms(store) as kms:
        _get(kms, node)
        enrolled = _pcr7(node)
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
        _open_window(store, node.tpm_hash, rfc3339(until))
        while datetime.datetime.now(datetime.timezone.utc) <= until + datetime.timedelta(seconds=1):
            time.sleep(0.25)
        upgraded = _upgrade(node, b"an upgrade after the window")
        _refused(kms, node, "PCR7 changed - boot state verification failed: expected %s, got %s" % (enrolled, upgraded))
    values = _pcr_values(store, node.tpm_hash)
    assert values["pcrs"]["7"] == enrolled
    assert registration.pcr_window_report(store.find_volume(node.tpm_hash))["7"]["state"] == "expired"


def test_known_good_values_from_a_reference_node(store, node, swtpm_factory):
    """The window takes its value from a node that was upgraded already: only that value is accepted, then enforced."""
    reference = swtpm_factory(ek_cert=True, fresh=True)
    try:
        known_good = _upgrade(reference, b"release 3.2")
    finally:
        reference.stop()
    with _kms(store) as kms:
        passphrase = _get(kms, node)
        enrolled = _pcr7(node)
        _open_window(store, node.tpm_hash, "30m", relearn_to={"7": known_good})
        tampered = _upgrade(node, b"release 3.2 with a modified bootloader")
        _refused(kms, node, "accepts only %s" % known_good)
        assert _pcr_values(store, node.tpm_hash)["pcrs"]["7"] == enrolled
        node.restart()  # reboot: PCRs back to their boot values, then the genuine upgrade
        assert _upgrade(node, b"release 3.2") == known_good != tampered
        assert _get(kms, node) == passphrase
        assert _pcr_values(store, node.tpm_hash)["pcrs"]["7"] == known_good
        assert registration.pcr_window_report(store.find_volume(node.tpm_hash)) == {}


def test_upstreams_crd_prunes_the_window_and_the_store_says_so(tmp_path):
    """With upstream's CRD (ours without relearnUntil/relearnTo) the API server prunes the window: the registration
    fails with a clear message, the volume keeps its old, enforced values, and nothing else is lost."""
    import yaml
    from kubernetes import client as kube_client, config as kube_config

    from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as store_module
    from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store
    from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_kubernetes import CRDPruned
    from support.kube_api import KubeAPI
    from support.stores import CRD_PATH

    crd = [doc for doc in yaml.safe_load_all(open(CRD_PATH)) if doc][0]
    pcr_values = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "attestation"]["properties"]["pcrValues"]["properties"]
    del pcr_values["relearnUntil"], pcr_values["relearnTo"]  # what upstream's controller-gen CRD has
    api = KubeAPI(str(tmp_path / "kube")).start()
    try:
        kube = kube_config.new_client_from_config(config_file=api.kubeconfig)
        kube_client.ApiextensionsV1Api(kube).create_custom_resource_definition(crd)
        kube.close()
        kms_store = open_store("kubernetes://?kubeconfig=%s&namespace=kcrypt" % api.kubeconfig)
        try:
            tpm_hash, old = "e" * 64, "a" * 64
            kms_store.create_volume(store_module.new_volume("node", tpm_hash, [{"label": "COS_PERSISTENT"}], attestation={
                "ekPublicKey": "", "pcrValues": {"pcrs": {"7": old}}}))
            with pytest.raises(CRDPruned, match="pruned spec.attestation.pcrValues.relearnUntil .*Apply kairos.kcrypt's "
                                                "deploy/kubernetes/crd.yaml"):
                _open_window(kms_store, tpm_hash, "1h")
            spec = kms_store.find_volume(tpm_hash)["spec"]
            assert spec["attestation"]["pcrValues"] == {"pcrs": {"0": "", "7": old, "11": ""}}
            assert spec["partitions"] == [{"label": "COS_PERSISTENT"}]
        finally:
            kms_store.close()
    finally:
        api.stop()
