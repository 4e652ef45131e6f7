# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Kubernetes API emulator of kube_api.py with the resources a deployment needs.

kube_api.py registers what the stores use (Secrets, CRDs). Deploying the challenger
also creates Namespaces, ServiceAccounts, Roles, RoleBindings, ConfigMaps, Services
and Deployments; this process registers those on the same strict emulator (Namespaces
are served by kube_api.py itself). kmock stores them and serves create/get/list/patch/
delete; it runs no controllers, so a Deployment never gets pods: tests check the objects,
not a rollout.

``KubeCluster(work_dir).start()`` runs ``python tests/support/kube_cluster.py PORT_FILE``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kube_api  # noqa: E402  (the emulator this extends)

WORKLOAD_RESOURCES = {
    # key: (kind, singular, namespaced)
    "v1/namespaces": ("Namespace", "namespace", False),
    "v1/serviceaccounts": ("ServiceAccount", "serviceaccount", True),
    "v1/configmaps": ("ConfigMap", "configmap", True),
    "v1/services": ("Service", "service", True),
    "apps/v1/deployments": ("Deployment", "deployment", True),
    "rbac.authorization.k8s.io/v1/roles": ("Role", "role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", "rolebinding", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", "poddisruptionbudget", True),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


class KubeCluster(kube_api.KubeAPI):
    """One emulator process with workload resources, stopped by the PID this code started."""

    def start(self, timeout=60):  # a startup deadline only: CI runs it next to heavy I/O
        script = kube_api.__file__
        kube_api.__file__ = os.path.abspath(__file__)  # KubeAPI.start runs the module it names
        try:
            return super().start(timeout)
        finally:
            kube_api.__file__ = script


def _emulator():
    """kube_api's strict emulator, with discovery left to kmock.

    The strict emulator answers object requests itself and 404s a list of a resource it does
    not know; the discovery documents (/api/v1, /apis/GROUP/VERSION) parse as such a list with
    no plural, but the kubernetes DynamicClient needs them, so they go to kmock as before.
    """
    import kmock

    class WorkloadEmulator(kube_api._emulator_class()):
        async def _handle(self, request):
            if request.resource is not None and not request.resource.plural:
                return await kmock.KubernetesEmulator._handle(self, request)
            return await super()._handle(request)

    return WorkloadEmulator()


async def _serve(port_file):
    import kmock

    emulator = _emulator()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs=VERBS)
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=VERBS)
    for key, (kind, singular, namespaced) in WORKLOAD_RESOURCES.items():
        emulator.resources[key] = kmock.ResourceInfo(kind=kind, singular=singular, namespaced=namespaced, verbs=VERBS)
    async with emulator, kmock.Server(emulator, host="127.0.0.1", port=0) as server:
        with open(port_file + ".tmp", "w") as handle:
            handle.write(str(server.port))
        os.rename(port_file + ".tmp", port_file)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
