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
import stat
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


# ---------------------------------------------------------------- challenger: Kubernetes apply


@pytest.mark.parametrize("wanted, live, expected", [
    ({"a": 1}, {"a": 1, "b": 2}, True),            # fields the API server adds are fine
    ({"a": 1}, {"a": 2}, False),
    ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 3}}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1}, {"x": 2}]}, False),  # a list that grew is a change
    ({"a": "1"}, {"a": 1}, False),
    ({"a": {}}, {}, False),
])
def test_k8s_apply_compares_wanted_fields_only(wanted, live, expected):
    assert load("challenger", "kcrypt_k8s_apply.py").is_subset(wanted, live) is expected


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


# ---------------------------------------------------------------- challenger: TLS


def tls(tmp_path, *extra):
    helper = os.path.join(ROOT, "roles", "challenger", "files", "kcrypt_tls.py")
    args = [sys.executable, helper, "--dir", str(tmp_path / "tls"), "--common-name", "kms",
            "--san", "DNS:kms", "--san", "IP:127.0.0.1"] + list(extra)
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_tls_generates_a_ca_and_a_server_certificate_once(tmp_path):
    from cryptography import x509

    first = tls(tmp_path)
    assert first["changed"] and "BEGIN CERTIFICATE" in first["ca_certificate"]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "tls" / key).st_mode) == 0o600
    assert "PRIVATE KEY" not in json.dumps(first)
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["kms"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert tls(tmp_path)["changed"] is False


def test_tls_reissues_the_server_certificate_for_new_names_and_keeps_the_ca(tmp_path):
    tls(tmp_path)
    ca = (tmp_path / "tls" / "ca.crt").read_bytes()
    key = (tmp_path / "tls" / "server.key").read_bytes()
    checked = tls(tmp_path, "--san", "DNS:kms.local", "--check")
    assert checked["changed"] and checked["reasons"] == ["server certificate lacks kms.local"]
    assert b"kms.local" not in (tmp_path / "tls" / "server.crt").read_bytes()  # check mode wrote nothing
    assert tls(tmp_path, "--san", "DNS:kms.local")["changed"]
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == ca
    assert (tmp_path / "tls" / "server.key").read_bytes() == key
    assert tls(tmp_path, "--san", "DNS:kms.local")["changed"] is False


def test_tls_replaces_a_server_certificate_that_does_not_match_its_key(tmp_path):
    tls(tmp_path)
    (tmp_path / "tls" / "server.key").unlink()
    assert tls(tmp_path)["reasons"] == ["server certificate does not match its key"]


def test_k8s_apply_expands_list_documents_in_order():
    flatten = load("challenger", "kcrypt_k8s_apply.py").flatten
    objects = [{"kind": "Namespace"}, {"kind": "List", "items": [{"kind": "Role"}, {"kind": "List", "items": [{"kind": "A"}]}]},
               {"kind": "Service"}]
    assert [obj["kind"] for obj in flatten(objects)] == ["Namespace", "Role", "A", "Service"]
