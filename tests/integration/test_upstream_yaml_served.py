# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An upstream-shaped SealedVolume + Secret YAML, imported with ``kcrypt-challenger import`` and served to a
swtpm-backed node over the newest protocol, on every store backend."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.client import kms_client as client
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import policy, server
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM
from support.challenger import ChallengerThread

# The documented upstream example (spec §4: SealedVolume "test2", static secret "mysecret"/"pass"),
# as an operator would have it in git for `kubectl apply`.
UPSTREAM = """\
apiVersion: v1
kind: Secret
metadata:
  name: mysecret
  namespace: default
type: Opaque
stringData:
  pass: "upstream static: p@ss w0rd"
---
apiVersion: keyserver.kairos.io/v1alpha1
kind: SealedVolume
metadata:
  name: test2
  namespace: default
spec:
  TPMHash: "{tpm_hash}"
  partitions:
    - label: COS_PERSISTENT
      secret:
        name: mysecret
        path: pass
  quarantined: false
"""


def test_imported_upstream_yaml_is_served_to_a_node(store_target, swtpm, repo_root, subprocess_env, tmp_path):
    with TPM(swtpm.tcti) as tpm:
        ek = tpm.endorsement_key()
    source = tmp_path / "sealedvolume.yaml"
    source.write_text(UPSTREAM.format(tpm_hash=ek.tpm_hash))
    imported = subprocess.run([sys.executable, os.path.join(repo_root, "bin", "kcrypt-challenger"), "import", str(source),
                               "--store", store_target.url], capture_output=True, env=subprocess_env, timeout=60, check=False)
    assert imported.returncode == 0, imported.stderr.decode()
    assert b"SealedVolume test2: created" in imported.stdout and b"Secret mysecret: created" in imported.stdout

    with store_target.open() as kms_store:
        store_calls = "inline" if store_target.kind == "sqlite" else "thread"
        challenger = server.Challenger(policy.Policy(kms_store, enrollment="registered-only"), store_calls=store_calls)
        with ChallengerThread(challenger) as kms:
            config = client.ClientConfig(challenger_server=kms.url, tpm_device=swtpm.tcti, attempts=2, retry_delay=0.05)
            assert client.get_passphrase(config, PartitionRef(label="COS_PERSISTENT", device_name="vda5")) \
                == b"upstream static: p@ss w0rd"
        volume = kms_store.get_volume("test2")
    # what the server learned keeps the upstream shape: it exports and re-imports cleanly
    assert volume["spec"]["attestation"]["ekPublicKey"] == ek.public_pem
    assert sorted(volume["spec"]["attestation"]["pcrValues"]["pcrs"]) == ["0", "11", "7"]
    exported = yaml.safe_load(st.dump_yaml([volume]))
    assert exported["apiVersion"] == "keyserver.kairos.io/v1alpha1" and exported["kind"] == "SealedVolume"
    assert set(exported["spec"]) == {"TPMHash", "partitions", "attestation"}  # quarantined: false is omitted, as Go does
    st.normalize_volume(exported)
