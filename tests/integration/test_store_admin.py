# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The admin subcommands of ``kcrypt-challenger``, against every store backend."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from ansible_collections.kairos.kcrypt.plugins.module_utils.cli import challenger
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.partition_ref import PartitionRef
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.policy import Policy

HASH = "d" * 64
PASS = b"Static passphrase with spaces & symbols"


class Result(object):
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def admin(store_target):
    """Run an admin subcommand in this process (cli.challenger.main, as the command line)."""
    def run(*args, input=None, check=True):
        stdout, stderr = io.StringIO(), io.StringIO()
        stdin = io.TextIOWrapper(io.BytesIO(input or b""))
        code = challenger.main(list(args) + ["--store", store_target.url], stdin=stdin, stdout=stdout, stderr=stderr)
        result = Result(code, stdout.getvalue().encode(), stderr.getvalue().encode())
        if check:
            assert code == 0, result.stderr.decode()
        return result
    return run


def test_entry_point_reads_the_passphrase_from_stdin(repo_root, store_target, subprocess_env):
    """The real ``kcrypt-challenger`` process: subcommands mounted, passphrase piped on stdin, never echoed."""
    command = [sys.executable, os.path.join(repo_root, "bin", "kcrypt-challenger"), "--store", store_target.url]
    result = subprocess.run(command + ["add", "--tpm-hash", HASH, "--partition", "COS_PERSISTENT", "--passphrase-file", "-"],
                            input=PASS, capture_output=True, env=subprocess_env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert PASS not in result.stdout + result.stderr
    listing = subprocess.run(command + ["list"], capture_output=True, env=subprocess_env, timeout=60, check=False)
    assert listing.returncode == 0 and HASH.encode() in listing.stdout
    missing = subprocess.run([sys.executable, os.path.join(repo_root, "bin", "kcrypt-challenger"), "--store",
                              "sqlite:///nonexistent-kcrypt-store-dir/kms.db", "list"], capture_output=True, env=subprocess_env,
                             timeout=60, check=False)
    assert missing.returncode == 1 and b"there is no store at /nonexistent-kcrypt-store-dir/kms.db" in missing.stderr
    assert not os.path.exists("/nonexistent-kcrypt-store-dir")
    with store_target.open() as store:
        assert store.get_secret("tpm-%s-cos-persistent" % HASH[:16])["data"]["passphrase"] == PASS


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


def test_export_with_secrets_never_writes_through_an_existing_file(admin, store_target, tmp_path):
    """A pre-existing 0644 file kept its mode with the passphrases written into it (issue 14 item 9)."""
    admin("add", "--tpm-hash", HASH, "--name", "node-1", "--partition", "COS_PERSISTENT", "--passphrase-file", "-", input=PASS)
    out = tmp_path / "out"
    out.mkdir()
    export = out / "export.yaml"
    export.write_text("an older export\n")
    os.chmod(str(export), 0o644)
    other_link = out / "hard-link"
    os.link(str(export), str(other_link))
    admin("export", "--include-secrets", "-o", str(export))
    assert stat.S_IMODE(os.stat(str(export)).st_mode) == 0o600
    docs = list(yaml.safe_load_all(export.read_text()))
    assert [d["kind"] for d in docs] == ["SealedVolume", "Secret"]
    assert other_link.read_text() == "an older export\n"  # replaced, not written through
    assert sorted(p.name for p in out.iterdir()) == ["export.yaml", "hard-link"]  # no temporary file left

    target = out / "elsewhere.yaml"
    target.write_text("keep me\n")
    os.chmod(str(target), 0o644)
    link = out / "link.yaml"
    link.symlink_to(target)
    result = admin("export", "--include-secrets", "-o", str(link), check=False)
    assert result.returncode == 1 and b"not a regular file" in result.stderr
    assert link.is_symlink() and target.read_text() == "keep me\n"
    result = admin("export", "-o", str(tmp_path / "missing-dir" / "x.yaml"), check=False)
    assert result.returncode == 1 and b"cannot write" in result.stderr


COLLIDING_YAML = """\
apiVersion: v1
kind: Secret
metadata:
  name: node-db-cos-persistent
stringData:
  passphrase: static of node-db
---
apiVersion: keyserver.kairos.io/v1alpha1
kind: SealedVolume
metadata:
  name: node-db
spec:
  TPMHash: "%s"
  partitions:
    - label: COS-PERSISTENT%s
---
apiVersion: keyserver.kairos.io/v1alpha1
kind: SealedVolume
metadata:
  name: node
spec:
  TPMHash: "%s"
  partitions:
    - label: DB-COS-PERSISTENT
"""
OTHER_HASH = "e" * 64


def test_import_refuses_secrets_two_partitions_would_share(admin, store_target):
    """node + DB-COS-PERSISTENT and node-db + COS-PERSISTENT both derive node-db-cos-persistent."""
    result = admin("import", "-", input=(COLLIDING_YAML % (HASH, "", OTHER_HASH)).encode(), check=False)
    assert result.returncode == 1 and b"nothing imported" in result.stderr
    assert b"Error: SealedVolume node: Secret node-db-cos-persistent is used by" in result.stderr
    assert b"Error: SealedVolume node-db: " in result.stderr
    with store_target.open() as store:
        assert store.list_volumes() == [] and store.get_secret("node-db-cos-persistent") is None
    # node-db naming its Secret does not help node: the Secret is still node-db's
    named = "\n      secret:\n        name: node-db-cos-persistent"
    result = admin("import", "-", input=(COLLIDING_YAML % (HASH, named, OTHER_HASH)).encode(), check=False)
    assert result.returncode == 1 and b"SealedVolume node:" in result.stderr and b"SealedVolume node-db:" in result.stderr
    # without node, it imports; node alone later is refused against the store
    alone = (COLLIDING_YAML % (HASH, named, OTHER_HASH)).rsplit("---", 1)[0]
    admin("import", "-", input=alone.encode())
    node_only = "---" + (COLLIDING_YAML % (HASH, named, OTHER_HASH)).rsplit("---", 1)[1]
    result = admin("import", "-", input=node_only.encode(), check=False)
    assert result.returncode == 1 and b"SealedVolume node: Secret node-db-cos-persistent is used by" in result.stderr
    with store_target.open() as store:
        assert [v["metadata"]["name"] for v in store.list_volumes()] == ["node-db"]


def test_add_refuses_a_secret_another_partition_uses(admin, store_target):
    admin("add", "--tpm-hash", HASH, "--name", "node-db", "--partition", "COS-PERSISTENT", "--passphrase-file", "-", input=PASS)
    result = admin("add", "--tpm-hash", OTHER_HASH, "--name", "node", "--partition", "DB-COS-PERSISTENT",
                   "--passphrase-file", "-", input=b"mine", check=False)
    assert result.returncode == 1 and b"Secret node-db-cos-persistent, which partition label=DB-COS-PERSISTENT would use, " \
                                      b"is not its: it is labelled for another TPM" in result.stderr
    result = admin("add", "--tpm-hash", OTHER_HASH, "--name", "node", "--partition", "label=X,secret=node-db-cos-persistent",
                   check=False)
    assert result.returncode == 1 and b"Secret node-db-cos-persistent is already used by partition label=COS-PERSISTENT " \
                                      b"of SealedVolume node-db" in result.stderr
    result = admin("add", "--tpm-hash", HASH, "--partition", "label=OEM,secret=node-db-cos-persistent", check=False)
    assert result.returncode == 1 and b"would use the same Secret node-db-cos-persistent" in result.stderr
    with store_target.open() as store:
        assert [v["metadata"]["name"] for v in store.list_volumes()] == ["node-db"]
        assert store.get_secret("node-db-cos-persistent")["data"]["passphrase"] == PASS
    # without a passphrase it is registered: the KMS generates a Secret of its own on first contact
    admin("add", "--tpm-hash", OTHER_HASH, "--name", "node", "--partition", "DB-COS-PERSISTENT")
    with store_target.open() as store:
        passphrase = Policy(store).issue_passphrase(OTHER_HASH, "PEM", {}, PartitionRef(label="DB-COS-PERSISTENT"))
        assert passphrase != PASS and len(passphrase) == 44
        assert Policy(store).issue_passphrase(HASH, "PEM", {}, PartitionRef(label="COS-PERSISTENT")) == PASS


def test_check_reports_secrets_that_are_not_one_partitions(admin, store_target):
    with store_target.open() as store:  # what an older server could leave behind: node's partition reused node-db's Secret
        assert b"every Secret reference belongs to exactly one partition" in admin("check").stdout
        store.create_secret(st.new_secret("node-db-cos-persistent", {"passphrase": b"x"}))
        store.create_volume(st.new_volume("node-db", HASH, [{"label": "COS-PERSISTENT"}]))
        store.create_volume(st.new_volume("node", OTHER_HASH, [
            {"label": "DB-COS-PERSISTENT", "secret": {"name": "node-db-cos-persistent", "path": "passphrase"}}]))
    result = admin("check", check=False)
    assert result.returncode == 1
    assert b"Secret node-db-cos-persistent is used by " in result.stdout
    assert b"partition label=COS-PERSISTENT of SealedVolume node-db" in result.stdout
    assert b"partition label=DB-COS-PERSISTENT of SealedVolume node " in result.stdout
    assert b"1 Secret(s) are not exactly one partition's" in result.stderr
    with store_target.open() as store:
        volume = store.get_volume("node")
        volume["spec"]["partitions"][0]["secret"] = {"name": "node-own"}
        store.update_volume(volume)
    assert admin("check").returncode == 0
