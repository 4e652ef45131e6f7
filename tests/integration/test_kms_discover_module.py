# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kairos.kcrypt.kairos_kms_discover run by ansible against a KMS announced with zeroconf on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns


@pytest.fixture
def ansible_module(tmp_path, repo_root, subprocess_env):
    collections = tmp_path / "collections" / "ansible_collections" / "kairos"
    collections.mkdir(parents=True)
    os.symlink(repo_root, str(collections / "kcrypt"))
    env = dict(subprocess_env, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"))

    def run(args, check=False):
        tree = tmp_path / "tree"
        command = [
            os.path.join(os.path.dirname(sys.executable), "ansible"), "localhost", "-i", "localhost,", "-c", "local",
            "-e", "ansible_python_interpreter=%s" % sys.executable,
            "-m", "kairos.kcrypt.kairos_kms_discover", "-a", json.dumps(args), "--tree", str(tree),
        ]
        if check:
            command.append("--check")
        completed = subprocess.run(command, env=env, cwd=repo_root, capture_output=True, timeout=120, check=False)
        return completed.returncode, json.loads((tree / "localhost").read_text())

    return run


def test_discovers_announced_kms_also_in_check_mode(ansible_module):
    host = "kms-%s.local" % uuid.uuid4().hex[:8]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mdns.Announcer(host, port, interfaces=["127.0.0.1"], instance="mod-" + host[4:12]):
        rc, result = ansible_module({"host": host, "interfaces": ["lo"], "timeout": 10, "scheme": "https"})
        assert rc == 0, result
        assert (result["changed"], result["url"], result["address"], result["port"], result["host_header"]) == (
            False, "https://127.0.0.1:%d" % port, "127.0.0.1", port, host,
        )
        rc, result = ansible_module({"challenger_server": "http://%s:9000/" % host, "timeout": 10}, check=True)
        assert rc == 0, result
        assert (result["changed"], result["url"], result["host_header"]) == (
            False, "http://127.0.0.1:%d/" % port, "%s:9000" % host,
        )


def test_no_answer_fails_with_upstream_text(ansible_module):
    rc, result = ansible_module({"host": "absent-%s.local" % uuid.uuid4().hex[:8], "timeout": 1})
    assert rc != 0
    assert "url" not in result
    assert result["msg"].startswith("mDNS resolution failed: no mDNS server found for absent-")
    assert "(searched for service type _kcrypt._tcp) on interfaces 127.0.0.1" in result["msg"]
