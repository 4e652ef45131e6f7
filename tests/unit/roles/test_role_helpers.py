# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Python helpers the lab and challenger roles ship in their files/ directories."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile

import pytest

from support.ports import free_port
from support.process import stop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def load(role, name):
    path = os.path.join(ROOT, "roles", role, "files", name)
    spec = importlib.util.spec_from_file_location("helper_" + name.replace(".py", ""), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- lab: the definition


def definition(**overrides):
    value = {"name": "lab", "python": "/usr/bin/python3", "network": "10.213.0.0/24", "nodes": [],
             "node_count": 3, "node_name_prefix": "node",
             "defaults": {"netns": False, "oem": False, "disk_size_mb": 128, "oem_size_mb": 16}}
    value.update(overrides)
    return value


def test_lab_count_expands_into_named_nodes():
    lab = load("lab", "kcrypt_lab.py")
    nodes = lab.normalize(definition())["nodes"]
    assert [node["name"] for node in nodes] == ["node1", "node2", "node3"]
    assert all(node["disk_size_mb"] == 128 and node["netns"] is False for node in nodes)


def test_lab_explicit_nodes_override_the_defaults_and_keep_unset_ones():
    lab = load("lab", "kcrypt_lab.py")
    nodes = lab.normalize(definition(nodes=["a", {"name": "b", "netns": True, "oem": None}]))["nodes"]
    assert [(n["name"], n["netns"], n["oem"]) for n in nodes] == [("a", False, False), ("b", True, False)]


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b"])
def test_lab_refuses_node_names_that_are_not_plain(name):
    lab = load("lab", "kcrypt_lab.py")
    with pytest.raises(lab.LabError):
        lab.normalize(definition(nodes=[{"name": name}]))


def test_lab_refuses_a_relative_directory():
    lab = load("lab", "kcrypt_lab.py")
    with pytest.raises(lab.LabError, match="absolute"):
        lab.Lab("relative/dir")


def test_lab_refuses_a_record_pointing_outside_its_node_directory(tmp_path):
    lab = load("lab", "kcrypt_lab.py")
    node_dir = tmp_path / "nodes" / "n1"
    node_dir.mkdir(parents=True)
    (node_dir / "node.json").write_text(json.dumps({"dir": "/etc", "state_dir": "/etc/tpm"}))
    with pytest.raises(lab.LabError, match="does not belong"):
        lab.Lab(str(tmp_path)).recorded_nodes()


# ---------------------------------------------------------------- challenger: code bundle


def test_bundle_is_reproducible_and_runs_the_cli(tmp_path):
    bundle = os.path.join(ROOT, "roles", "challenger", "files", "kcrypt_bundle.py")
    digests = []
    for name in ("one.pyz", "two.pyz"):
        out = subprocess.run([sys.executable, bundle, "--collection", ROOT, "--output", str(tmp_path / name)],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        digests.append(out)
    assert digests[0] == digests[1]
    # run from a directory where no checkout is importable: the bundle must carry all it needs
    run = subprocess.run([sys.executable, "-S", str(tmp_path / "one.pyz"), "--help"], capture_output=True, text=True,
                         cwd=str(tmp_path), env={"PATH": os.environ["PATH"]}, check=False)
    assert run.returncode == 0, run.stderr
    assert "serve" in run.stdout


def test_bundle_ships_only_the_server_and_serves(tmp_path):
    """The bundle holds common/, kms/ and the challenger's CLI (no node code), and runs the KMS on its own."""
    bundle = os.path.join(ROOT, "roles", "challenger", "files", "kcrypt_bundle.py")
    pyz = tmp_path / "kms.pyz"
    subprocess.run([sys.executable, bundle, "--collection", ROOT, "--output", str(pyz)], capture_output=True, check=True)
    prefix = "ansible_collections/kairos/kcrypt/plugins/module_utils/"
    with zipfile.ZipFile(str(pyz)) as archive:
        names = [n[len(prefix):] for n in archive.namelist() if n.startswith(prefix)]
    packages = {n.split("/")[0] for n in names if "/" in n}
    assert packages == {"common", "kms", "cli"}, names
    assert {n for n in names if n.startswith("cli/")} == {"cli/__init__.py", "cli/challenger.py", "cli/challenger_admin.py"}
    for package in packages:
        assert package + "/__init__.py" in names
    assert "kms/server.py" in names and "common/messages.py" in names
    assert "kms/tls_material.py" not in names and "kms/kube_apply.py" not in names  # the role's deployment steps
    # Served from a directory where no checkout is importable, with only the virtualenv's libraries.
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(pyz), "serve", "--listen", "127.0.0.1:%d" % port,
                             "--store", "sqlite://%s" % (tmp_path / "kms.db")],
                            cwd=str(tmp_path), env={"PATH": os.environ["PATH"]}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=2) as answer:
                    assert answer.read() == b"ok\n"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no answer"
                time.sleep(0.2)
    finally:
        stop(proc)


def test_containerfile_copies_what_exists_and_installs_the_role_packages():
    text = open(os.path.join(ROOT, "deploy", "container", "Containerfile")).read()
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert os.path.exists(os.path.join(ROOT, source)), source
    import yaml

    defaults = yaml.safe_load(open(os.path.join(ROOT, "roles", "challenger", "defaults", "main.yml")))
    for package in defaults["challenger_python_packages"]:
        assert '"%s"' % package in text, package
