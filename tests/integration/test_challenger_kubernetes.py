# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger role on Kubernetes, against the kmock API emulator (tests/support/kube_cluster.py).

No real API server runs here and kmock runs no controllers, so this checks what can be
checked: the objects the role applies (and re-applies without change, updates, moves to
another namespace, deletes), that the store works on the CRD it applied, and that the
server started with the exact settings of the ConfigMap serves against the API. Pods,
rollouts and the image are out of reach.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from support import playbook
from support.kube_cluster import KubeCluster
from support.process import stop as stop_process

ROOT = playbook.ROOT
pytest.importorskip("kubernetes")
pytest.importorskip("kmock")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    api = KubeCluster(str(tmp_path_factory.mktemp("kube"))).start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def dynamic(cluster):
    from kubernetes import config, dynamic as kube_dynamic

    return kube_dynamic.DynamicClient(config.new_client_from_config(config_file=cluster.kubeconfig))


def fetch(dynamic, api_version, kind, name, namespace=None):
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return dynamic.resources.get(api_version=api_version, kind=kind).get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        return None


def deploy(cluster, check=False, **overrides):
    variables = {"challenger_platform": "kubernetes", "challenger_kubernetes_kubeconfig": cluster.kubeconfig,
                 "challenger_kubernetes_image": "registry.example/kcrypt-challenger:test"}
    variables.update(overrides)
    run = playbook.playbook("playbooks/challenger.yml", variables, check=check)
    assert run.rc == 0, run
    return run


def applied(run):
    results = run.task_results("Apply (or delete) the challenger's Kubernetes objects")
    assert results, run
    return results[-1]


# the tests of this class build on each other, in order (scripts/test.sh: --dist loadscope keeps a class on one worker)
@pytest.mark.slow
class TestChallengerOnKubernetes:
    def test_deploy(self, cluster, dynamic):
        run = deploy(cluster)
        assert run.changed > 0
        created = applied(run)["created"]
        assert "Deployment kcrypt/kcrypt-challenger" in created
        assert fetch(dynamic, "v1", "Namespace", "kcrypt") is not None
        assert fetch(dynamic, "apiextensions.k8s.io/v1", "CustomResourceDefinition",
                     "sealedvolumes.keyserver.kairos.io") is not None
        assert fetch(dynamic, "v1", "ServiceAccount", "kcrypt-challenger", "kcrypt") is not None
        role = fetch(dynamic, "rbac.authorization.k8s.io/v1", "Role", "kcrypt-challenger", "kcrypt")
        verbs = {rule["resources"][0]: set(rule["verbs"]) for rule in role["rules"]}
        assert verbs == {"sealedvolumes": {"get", "list", "create", "update"}, "secrets": {"get", "create"}}
        binding = fetch(dynamic, "rbac.authorization.k8s.io/v1", "RoleBinding", "kcrypt-challenger", "kcrypt")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kcrypt-challenger", "namespace": "kcrypt"}]
        # recovery keys: their own namespace, where the server writes Secrets and reads none
        assert fetch(dynamic, "v1", "Namespace", "kcrypt-recovery") is not None
        role = fetch(dynamic, "rbac.authorization.k8s.io/v1", "Role", "kcrypt-challenger-recovery", "kcrypt-recovery")
        assert [(rule["resources"], set(rule["verbs"])) for rule in role["rules"]] == [(["secrets"], {"create", "update"})]
        binding = fetch(dynamic, "rbac.authorization.k8s.io/v1", "RoleBinding", "kcrypt-challenger-recovery", "kcrypt-recovery")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kcrypt-challenger", "namespace": "kcrypt"}]
        for namespace in ("kcrypt", "kcrypt-recovery"):
            assert fetch(dynamic, "rbac.authorization.k8s.io/v1", "Role", "kcrypt-recovery-reader", namespace) is not None
        settings = yaml.safe_load(fetch(dynamic, "v1", "ConfigMap", "kcrypt-challenger", "kcrypt")["data"]["config.yaml"])
        assert settings["store"] == "kubernetes://?namespace=kcrypt"  # the pod's own account, no kubeconfig
        assert settings["listen"] == "0.0.0.0:8082" and settings["tls_cert"] == ""
        deployment = fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt")
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert deployment["spec"]["replicas"] == 2
        assert spec["serviceAccountName"] == "kcrypt-challenger"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["image"] == "registry.example/kcrypt-challenger:test"
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        service = fetch(dynamic, "v1", "Service", "kcrypt-challenger", "kcrypt")
        assert service["spec"]["ports"][0]["port"] == 8082
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert fetch(dynamic, "policy/v1", "PodDisruptionBudget", "kcrypt-challenger", "kcrypt") is not None
        result = run.task_results("Publish how to reach the challenger")[-1]["ansible_facts"]["challenger_result"]
        assert result["url"] == "http://kcrypt-challenger.kcrypt.svc:8082"

    def test_second_run_changes_nothing(self, cluster):
        run = deploy(cluster)
        assert run.changed == 0, applied(run)

    def test_check_mode_predicts_without_applying(self, cluster, dynamic):
        run = deploy(cluster, check=True, challenger_kubernetes_replicas=3)
        assert run.changed > 0
        assert applied(run)["updated"] == ["Deployment kcrypt/kcrypt-challenger"]
        assert fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt")["spec"]["replicas"] == 2

    def test_changes_are_applied(self, cluster, dynamic):
        before = fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt")
        run = deploy(cluster, challenger_kubernetes_replicas=3, challenger_log_level="debug")
        assert sorted(applied(run)["updated"]) == [
            "ConfigMap kcrypt/kcrypt-challenger", "Deployment kcrypt/kcrypt-challenger"]
        after = fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt")
        assert after["spec"]["replicas"] == 3
        key = "kcrypt.kairos.io/config-sha256"  # a settings change rolls the pods
        assert after["spec"]["template"]["metadata"]["annotations"][key] != \
            before["spec"]["template"]["metadata"]["annotations"][key]
        assert deploy(cluster, challenger_kubernetes_replicas=3, challenger_log_level="debug").changed == 0

    def test_another_namespace(self, cluster, dynamic):
        deploy(cluster, challenger_kubernetes_namespace="kcrypt-other", challenger_kubernetes_replicas=1)
        binding = fetch(dynamic, "rbac.authorization.k8s.io/v1", "RoleBinding", "kcrypt-challenger", "kcrypt-other")
        assert binding["subjects"][0]["namespace"] == "kcrypt-other"
        assert fetch(dynamic, "v1", "Namespace", "kcrypt-other-recovery") is not None
        binding = fetch(dynamic, "rbac.authorization.k8s.io/v1", "RoleBinding", "kcrypt-challenger-recovery", "kcrypt-other-recovery")
        assert binding["subjects"][0]["namespace"] == "kcrypt-other"
        assert fetch(dynamic, "v1", "ServiceAccount", "kcrypt-challenger", "kcrypt-other") is not None
        settings = yaml.safe_load(fetch(dynamic, "v1", "ConfigMap", "kcrypt-challenger", "kcrypt-other")["data"]["config.yaml"])
        assert settings["store"] == "kubernetes://?namespace=kcrypt-other"
        assert fetch(dynamic, "policy/v1", "PodDisruptionBudget", "kcrypt-challenger", "kcrypt-other") is None

    def test_the_store_works_on_the_applied_crd(self, cluster):
        store = "kubernetes://?namespace=kcrypt&kubeconfig=%s" % cluster.kubeconfig
        cli = [sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger")]
        added = subprocess.run(cli + ["add", "--store", store, "--tpm-hash", "a" * 64, "--partition", "COS_PERSISTENT"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert added.returncode == 0, added.stderr
        listed = subprocess.run(cli + ["list", "--store", store, "-o", "yaml"], capture_output=True, text=True, timeout=60, check=False)
        assert listed.returncode == 0, listed.stderr
        assert "a" * 64 in listed.stdout

    def test_server_with_the_configmap_settings_serves(self, cluster, dynamic, tmp_path):
        """What a pod would run: the ConfigMap's config.yaml, the API reached as the pod would (here: KUBECONFIG)."""
        config = tmp_path / "config.yaml"
        config.write_text(fetch(dynamic, "v1", "ConfigMap", "kcrypt-challenger", "kcrypt")["data"]["config.yaml"])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, KUBECONFIG=cluster.kubeconfig)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger"), "serve",
                                   "--config", str(config), "--listen", "127.0.0.1:%d" % port],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            status = None
            while status is None:
                try:
                    with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port, timeout=5) as response:
                        status = response.status
                except OSError:
                    assert server.poll() is None, server.stderr.read().decode()
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert status == 200  # /readyz: the store (SealedVolumes in namespace kcrypt) is reachable
        finally:
            stop_process(server, timeout=15)

    def test_absent_removes_the_workload_and_keeps_the_data(self, cluster, dynamic):
        run = deploy(cluster, challenger_state="absent")
        deleted = applied(run)["deleted"]
        assert "Deployment kcrypt/kcrypt-challenger" in deleted and "RoleBinding kcrypt/kcrypt-challenger" in deleted
        assert fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt") is None
        assert fetch(dynamic, "v1", "ServiceAccount", "kcrypt-challenger", "kcrypt") is None
        assert fetch(dynamic, "v1", "Namespace", "kcrypt") is not None
        assert fetch(dynamic, "apiextensions.k8s.io/v1", "CustomResourceDefinition",
                     "sealedvolumes.keyserver.kairos.io") is not None
        store = "kubernetes://?namespace=kcrypt&kubeconfig=%s" % cluster.kubeconfig
        listed = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger"), "list", "--store",
                                 store, "-o", "yaml"], capture_output=True, text=True, timeout=60, check=False)
        assert "a" * 64 in listed.stdout
        assert deploy(cluster, challenger_state="absent").changed == 0


def test_ek_certificate_settings_and_the_ca_bundle(cluster, dynamic, tmp_path):
    """challenger_ek_certificate/challenger_ek_ca: a file and a directory become one PEM bundle in the ConfigMap,
    mounted next to config.yaml; the server starts on them; a DER file is refused with a clear message."""
    from support import ek_pki
    from support.soft_tpm import key_pool

    root_key, inter_key = key_pool(2)
    root = ek_pki.ca_certificate("Vendor EK Root CA", root_key)
    inter = ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key)
    (tmp_path / "root.pem").write_bytes(ek_pki.pem(root))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "intermediate.crt").write_bytes(ek_pki.pem(inter))
    (tmp_path / "more" / "notes.txt").write_text("not read\n")
    options = {"challenger_kubernetes_namespace": "kcrypt-ek", "challenger_kubernetes_replicas": 1,
               "challenger_ek_certificate": "require",
               "challenger_ek_ca": [str(tmp_path / "root.pem"), str(tmp_path / "more")]}
    run = deploy(cluster, **options)
    configmap = fetch(dynamic, "v1", "ConfigMap", "kcrypt-challenger", "kcrypt-ek")["data"]
    assert configmap["ek-ca.pem"] == (ek_pki.pem(root) + ek_pki.pem(inter)).decode()
    settings = yaml.safe_load(configmap["config.yaml"])
    assert settings["ek_certificate"] == "require" and settings["ek_ca"] == ["/etc/kcrypt-challenger/ek-ca.pem"]
    container = fetch(dynamic, "apps/v1", "Deployment", "kcrypt-challenger", "kcrypt-ek")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "config", "mountPath": "/etc/kcrypt-challenger/ek-ca.pem", "subPath": "ek-ca.pem",
            "readOnly": True} in container["volumeMounts"]
    assert deploy(cluster, **options).changed == 0, run

    # what the pod runs: the server reads the bundle at start and checks every certificate in it
    (tmp_path / "ek-ca.pem").write_text(configmap["ek-ca.pem"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(settings, ek_ca=[str(tmp_path / "ek-ca.pem")], listen="127.0.0.1:0",
                                          store="sqlite://%s" % (tmp_path / "kms.db"))))
    with subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "kcrypt-challenger"), "serve", "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) as server:
        try:
            deadline = time.monotonic() + 30
            lines = []
            while not any("listening on" in line for line in lines):
                assert server.poll() is None and time.monotonic() < deadline, "".join(lines)
                lines.append(server.stderr.readline())
            assert "ek certificate require with 2 trusted CA(s)" in lines[-1]
        finally:
            stop_process(server, timeout=15)

    (tmp_path / "der").mkdir()
    der_file = tmp_path / "der" / "vendor.crt"
    der_file.write_bytes(ek_pki.der(root))
    failed = playbook.playbook("playbooks/challenger.yml", dict(
        options, challenger_platform="kubernetes", challenger_kubernetes_kubeconfig=cluster.kubeconfig,
        challenger_ek_ca=[str(tmp_path / "der")]))
    assert failed.rc != 0 and any("openssl x509 -inform der" in m for m in failed.failure_messages()), failed

    deploy(cluster, challenger_kubernetes_namespace="kcrypt-ek", challenger_kubernetes_replicas=1)  # back to off
    configmap = fetch(dynamic, "v1", "ConfigMap", "kcrypt-challenger", "kcrypt-ek")["data"]
    assert "ek-ca.pem" not in configmap and yaml.safe_load(configmap["config.yaml"])["ek_ca"] == []
    deploy(cluster, challenger_kubernetes_namespace="kcrypt-ek", challenger_state="absent")
