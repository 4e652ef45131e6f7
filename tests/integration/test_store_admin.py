# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The admin subcommands as a process, against every store backend."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.policy import Policy

HASH = "d" * 64
PASS = b"Static passphrase with spaces & symbols"

LAUNCHER = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
import _checkout
_checkout.setup()
from ansible_collections.kairos.kcrypt.plugins.module_utils import store_admin
sys.exit(store_admin.main(sys.argv[1:]))
"""


def admin_command(repo_root):
    """``kcrypt-challenger`` when the checkout has it (wire branch), else store_admin on its own."""
    exe = os.path.join(repo_root, "bin", "kcrypt-challenger")
    if os.path.exists(exe):
        return [sys.executable, exe]
    return [sys.executable, "-c", LAUNCHER, os.path.join(repo_root, "bin")]


@pytest.fixture
def admin(repo_root, store_target, subprocess_env):
    def run(*args, input=None, check=True):
        result = subprocess.run(admin_command(repo_root) + list(args) + ["--store", store_target.url],
                                input=input, capture_output=True, env=subprocess_env, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr.decode()
        return result
    return run


def test_register_static_passphrase_from_stdin_and_serve(admin, store_target):
    result = admin("add", "--tpm-hash", HASH, "--name", "node-1", "--partition", "label=COS_PERSISTENT,name=vda5",
                   "--passphrase-file", "-", input=PASS)
    assert b"created SealedVolume node-1" in result.stdout
    assert b"Secret node-1-cos-persistent (key passphrase): create" in result.stdout
    assert PASS not in result.stdout + result.stderr
    with store_target.open() as store:
        assert Policy(store).issue_passphrase(HASH, "PEM", {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) == PASS
    # again: nothing changes, the passphrase is kept
    result = admin("add", "--tpm-hash", HASH, "--partition", "COS_PERSISTENT", "--passphrase-file", "-", input=b"other")
    assert b"unchanged SealedVolume node-1" in result.stdout and b"kept" in result.stdout
    # a second partition is added next to the first
    admin("add", "--tpm-hash", HASH, "--partition", "COS_OEM")
    listing = admin("list").stdout.decode()
    assert "node-1" in listing and HASH in listing and "COS_PERSISTENT,COS_OEM" in listing


def test_passphrase_file_and_newline_refused(admin, store_target, tmp_path):
    bad = tmp_path / "pass-with-newline"
    bad.write_bytes(PASS + b"\n")
    result = admin("add", "--tpm-hash", HASH, "--partition", "COS_PERSISTENT", "--passphrase-file", str(bad), check=False)
    assert result.returncode == 1 and b"contains a newline" in result.stderr and b"printf" in result.stderr
    with store_target.open() as store:
        assert store.list_volumes() == []
    good = tmp_path / "pass"
    good.write_bytes(PASS)
    admin("add", "--tpm-hash", HASH, "--partition", "COS_PERSISTENT", "--passphrase-file", str(good))
    with store_target.open() as store:
        assert store.get_secret("tpm-%s-cos-persistent" % HASH[:16])["data"]["passphrase"] == PASS


def test_bad_input(admin, store_target):
    result = admin("add", "--tpm-hash", "xyz", "--partition", "L", check=False)
    assert result.returncode == 1 and b"tpm_hash must be 64 hexadecimal" in result.stderr
    result = admin("add", "--tpm-hash", HASH, "--partition", "colour=blue", check=False)
    assert result.returncode == 1 and b"unknown key" in result.stderr
    result = admin("show", "nothing-here", check=False)
    assert result.returncode == 1 and b"no SealedVolume named nothing-here" in result.stderr
    with store_target.open() as store:
        assert store.list_volumes() == []


def test_show_quarantine_export_import_delete(admin, store_target, tmp_path):
    admin("add", "--tpm-hash", HASH, "--name", "node-1", "--partition", "COS_PERSISTENT", "--passphrase-file", "-", input=PASS)
    shown = json.loads(admin("show", HASH, "-o", "json").stdout)
    assert shown["metadata"]["name"] == "node-1" and shown["spec"]["partitions"] == [{"label": "COS_PERSISTENT"}]
    assert b"quarantined" in admin("quarantine", "node-1").stdout
    with store_target.open() as store:
        assert store.get_volume("node-1")["spec"]["quarantined"] is True
    admin("unquarantine", HASH)
    with store_target.open() as store:
        assert "quarantined" not in store.get_volume("node-1")["spec"]

    plain = admin("export").stdout
    assert PASS not in plain and b"kind: Secret" not in plain
    export = tmp_path / "export.yaml"
    admin("export", "--include-secrets", "-o", str(export))
    assert stat.S_IMODE(os.stat(str(export)).st_mode) == 0o600
    docs = list(yaml.safe_load_all(export.read_text()))
    assert [d["kind"] for d in docs] == ["SealedVolume", "Secret"]
    assert "resourceVersion" not in docs[0]["metadata"]

    admin("delete", "node-1")
    with store_target.open() as store:
        assert store.list_volumes() == [] and store.get_secret("node-1-cos-persistent") is not None
    result = admin("import", str(export))
    assert b"SealedVolume node-1: created" in result.stdout and b"Secret node-1-cos-persistent: exists, kept" in result.stdout
    with store_target.open() as store:
        assert Policy(store).issue_passphrase(HASH, "PEM", {}, PartitionRef(label="COS_PERSISTENT")) == PASS
    assert b"exists, kept (use --replace)" in admin("import", str(export)).stdout
    assert b"replaced" in admin("import", str(export), "--replace").stdout

    admin("delete", HASH, "--purge-secrets")
    with store_target.open() as store:
        assert store.list_volumes() == [] and store.get_secret("node-1-cos-persistent") is None


UPSTREAM_YAML = """\
apiVersion: v1
kind: Secret
metadata:
  name: mysecret
  namespace: default
type: Opaque
stringData:
  pass: upstream static passphrase
---
apiVersion: keyserver.kairos.io/v1alpha1
kind: SealedVolume
metadata:
  name: test2
  namespace: default
spec:
  TPMHash: "%s"
  partitions:
    - label: COS_PERSISTENT
      secret:
        name: mysecret
        path: pass
  quarantined: false
""" % HASH


def test_import_upstream_shaped_yaml_from_stdin_and_serve(admin, store_target):
    result = admin("import", "-", input=UPSTREAM_YAML.encode())
    assert b"SealedVolume test2: created" in result.stdout and b"Secret mysecret: created" in result.stdout
    with store_target.open() as store:
        volume = store.get_volume("test2")
        assert volume["metadata"]["namespace"] == store.namespace  # the store's namespace, not "default"
        assert Policy(store).issue_passphrase(HASH, "PEM", {"0": "aa"}, PartitionRef(label="COS_PERSISTENT")) \
            == b"upstream static passphrase"
    stale = UPSTREAM_YAML.replace("partitions:", "partitionSecrets: {}\n  partitions:").replace("test2", "test3")
    result = admin("import", "-", input=stale.encode(), check=False)
    assert result.returncode == 1 and b"unknown key(s) partitionSecrets" in result.stderr
    with store_target.open() as store:
        assert store.get_volume("test3") is None
