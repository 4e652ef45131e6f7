#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_k8s_objects
short_description: Apply or delete the kcrypt challenger's Kubernetes objects with the official Python client
version_added: 0.1.0
description:
  - Creates the objects in O(objects) that do not exist, and patches (JSON merge patch) those whose live
    version differs in a field the object sets. Fields the API server adds are left alone, so a second run
    changes nothing. With O(state=absent), deletes those that exist, in reverse order.
  - Items of C(kind=List) documents are applied in their place, as C(kubectl) does.
  - It needs only the C(kubernetes) Python library, not the C(kubernetes.core) collection. The
    C(kairos.kcrypt.challenger) role uses it to deploy the challenger on Kubernetes. For anything else,
    C(kubernetes.core.k8s) is the more complete module.
author:
  - kairos.kcrypt contributors (@kairos-io)
extends_documentation_fragment:
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  objects:
    description:
      - The objects, each with C(apiVersion), C(kind) and C(metadata.name), in the order to apply them
        (for example the Namespace and CRDs first).
    type: list
    elements: dict
    required: true
  state:
    description:
      - V(present) creates or updates the objects. V(absent) deletes them.
    type: str
    choices: [present, absent]
    default: present
  namespace:
    description:
      - Put every namespaced object, and the ServiceAccount subjects of RoleBindings, in this namespace,
        as C(kustomize)'s C(namespace) does. Empty keeps the namespaces the objects name.
    type: str
    default: ""
  namespace_map:
    description:
      - Namespaces to replace, as a mapping from the namespace an object names to the one to put it in instead.
        O(namespace) applies to the objects it does not map. ServiceAccount subjects of RoleBindings still go to O(namespace).
      - The challenger role maps the recovery-key namespace V(kcrypt-recovery) of C(deploy/kubernetes/rbac.yaml) this way.
    type: dict
    default: {}
  kubeconfig:
    description:
      - Path of the kubeconfig file. If omitted, the in-cluster service account is used when the task runs in a pod,
        then E(KUBECONFIG), then C(~/.kube/config).
    type: path
  context:
    description: The kubeconfig context to use.
    type: str
requirements:
  - kubernetes >= 28 (Python, where the task runs)
seealso:
  - module: kairos.kcrypt.kairos_sealedvolume
"""

EXAMPLES = r"""
- name: Deploy the challenger's manifests in namespace kcrypt
  kairos.kcrypt.kairos_k8s_objects:
    objects: "{{ lookup('ansible.builtin.file', 'deploy/kubernetes/crd.yaml') | ansible.builtin.from_yaml_all | list }}"
    namespace: kcrypt
  delegate_to: localhost
"""

RETURN = r"""
created:
  description: The objects created (or that would be, in check mode), as C(Kind namespace/name).
  returned: always
  type: list
  elements: str
  sample: ["Deployment kcrypt/kcrypt-challenger"]
updated:
  description: The objects patched (or that would be).
  returned: always
  type: list
  elements: str
deleted:
  description: The objects deleted (or that would be).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_apply


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(
            objects=dict(type="list", elements="dict", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            namespace=dict(type="str", default=""),
            namespace_map=dict(type="dict", default={}),
            kubeconfig=dict(type="path"),
            context=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    result = run_or_fail(module, kube_apply.apply_objects, params["objects"], state=params["state"], namespace=params["namespace"],
                         kubeconfig=params["kubeconfig"], context=params["context"], check_mode=module.check_mode,
                         namespace_map=params["namespace_map"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
