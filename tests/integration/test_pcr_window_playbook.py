# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/pcr_window.yml on two swtpm nodes and an embedded KMS store: open, upgrade, report, close.

node1 upgrades and reboots inside the window (re-learned), node2 upgrades but does not reboot (still
open, then closed by the playbook: its old value stays enforced). A second run takes the known-good
value from an upgraded reference node (pcr_window_from_node). The nodes' "upgrade" is
tests/integration/playbooks/tasks/pcr_upgrade.yml (tpm2_pcrextend, then the discovery client).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_factory import open_store
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support import playbook
from support.challenger import ChallengerThread

PERSISTENT = PartitionRef(label="COS_PERSISTENT")
MEASUREMENT = hashlib.sha256(b"bootloader of release 3.2").hexdigest()


def _pcr7(tpm):
    with TPM(tpm.tcti) as handle:
        return handle.pcr_read([7])[7].hex()


def _get(kms, tpm):
    return client.get_passphrase(client.ClientConfig(challenger_server=kms.url, tpm_device=tpm.tcti, attempts=1), PERSISTENT)


def test_open_upgrade_report_close_then_known_good_values(tmp_path, swtpm_factory):
    node1, node2, reference = (swtpm_factory(ek_cert=True, fresh=True) for dummy in range(3))
    store_dir = tmp_path / "kms"
    store_dir.mkdir()
    store = open_store("sqlite://%s/kms.db" % store_dir)
    kms = ChallengerThread(server.Challenger(policy.Policy(store))).start()
    try:
        first = {name: _get(kms, tpm) for name, tpm in (("node1", node1), ("node2", node2))}
        enrolled = {"node1": _pcr7(node1), "node2": _pcr7(node2)}
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {
            "hosts": {"localhost": local, "reference": dict(local, kcrypt_tpm_device=reference.tcti)},
            "children": {"kcrypt_nodes": {"hosts": {
                "node1": dict(local, kcrypt_tpm_device=node1.tcti, upgrade_contacts=True),
                "node2": dict(local, kcrypt_tpm_device=node2.tcti)}}}}}))
        variables = {"kcrypt_kms_store_dir": str(store_dir), "kms_url": kms.url, "kcrypt_checkout": playbook.ROOT,
                     "upgrade_measurement": MEASUREMENT, "pcr_window_until": "1h",
                     "pcr_window_upgrade_tasks": os.path.join(playbook.ROOT, "tests", "integration", "playbooks", "tasks", "pcr_upgrade.yml")}

        check = playbook.playbook("playbooks/pcr_window.yml", variables, inventory=str(inventory), check=True)
        assert check.rc == 0, check
        assert all("relearnUntil" not in v["spec"]["attestation"]["pcrValues"] for v in store.list_volumes())

        run = playbook.playbook("playbooks/pcr_window.yml", variables, inventory=str(inventory))
        assert run.rc == 0, run
        summary = run.task_results("Show the summary")[-1]["pcr_window_summary | default({})"]
        upgraded = {"node1": _pcr7(node1), "node2": _pcr7(node2)}
        assert summary["node1"]["pcrs"] == {"7": "re-learned %s -> %s" % (enrolled["node1"], upgraded["node1"])}
        assert summary["node2"]["pcrs"]["7"].startswith("still open until ")
        assert run.task_results("Close what is left open", host="node2")[-1]["changed"] is True
        assert run.task_results("Close what is left open", host="node1")[-1]["changed"] is False
        values = {v["spec"]["TPMHash"]: v["spec"]["attestation"]["pcrValues"] for v in store.list_volumes()}
        assert values[summary["node1"]["tpm_hash"]] == {"pcrs": dict(values[summary["node1"]["tpm_hash"]]["pcrs"], **{"7": upgraded["node1"]})}
        assert values[summary["node2"]["tpm_hash"]]["pcrs"]["7"] == enrolled["node2"]  # closed: the old value is enforced
        assert "relearnUntil" not in values[summary["node2"]["tpm_hash"]]
        with pytest.raises(client.AttestationRejected, match="PCR7 changed"):
            _get(kms, node2)

        # node2 again, with the value of a reference node that runs the new release
        subprocess.run(["tpm2_pcrextend", "7:sha256=%s" % MEASUREMENT], check=True, capture_output=True,
                       env=dict(os.environ, TPM2TOOLS_TCTI=reference.tcti, TSS2_LOG="all+NONE"))
        assert _pcr7(reference) == upgraded["node2"]  # the same release measures the same
        second = dict(variables, pcr_window_from_node="reference", pcr_window_close=False)
        del second["pcr_window_upgrade_tasks"]
        run = playbook.playbook("playbooks/pcr_window.yml", second, inventory=str(inventory), limit="node2")
        assert run.rc == 0, run
        windows = [v for v in store.list_volumes() if v["spec"]["TPMHash"] == summary["node2"]["tpm_hash"]][0][
            "spec"]["attestation"]["pcrValues"]
        assert windows["relearnTo"] == {"7": upgraded["node2"]} and "7" in windows["relearnUntil"]
        assert _get(kms, node2) == first["node2"]
        learned = [v for v in store.list_volumes() if v["spec"]["TPMHash"] == summary["node2"]["tpm_hash"]][0]
        assert learned["spec"]["attestation"]["pcrValues"] == {"pcrs": dict(windows["pcrs"], **{"7": upgraded["node2"]})}
    finally:
        kms.stop()
        store.close()
        for tpm in (node1, node2, reference):
            tpm.stop()
