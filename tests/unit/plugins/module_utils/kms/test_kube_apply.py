# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kms/kube_apply.py: what counts as a change, and the object list (the API side runs against kmock in
tests/integration/test_challenger_kubernetes.py)."""

from __future__ import annotations

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import kube_apply


@pytest.mark.parametrize("wanted, live, expected", [
    ({"a": 1}, {"a": 1, "b": 2}, True),            # fields the API server adds are fine
    ({"a": 1}, {"a": 2}, False),
    ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 3}}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, True),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1}, {"x": 2}]}, False),  # a list that grew is a change
    ({"a": "1"}, {"a": 1}, False),
    ({"a": {}}, {}, False),
])
def test_compares_wanted_fields_only(wanted, live, expected):
    assert kube_apply.is_subset(wanted, live) is expected


def test_expands_list_documents_in_order():
    objects = [{"kind": "Namespace"}, {"kind": "List", "items": [{"kind": "Role"}, {"kind": "List", "items": [{"kind": "A"}]}]},
               {"kind": "Service"}]
    assert [obj["kind"] for obj in kube_apply.flatten(objects)] == ["Namespace", "Role", "A", "Service"]


@pytest.mark.parametrize("bad", ["text", {"kind": "Service"}, {"apiVersion": "v1", "kind": "Service", "metadata": {}}])
def test_refuses_what_is_not_an_object_before_calling_the_api(bad):
    with pytest.raises(KcryptError, match="object 1 is not a Kubernetes object"):
        kube_apply.apply_objects([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}, bad],
                                 kubeconfig="/nonexistent/kubeconfig")


class _Resource:
    def __init__(self, namespaced):
        self.namespaced = namespaced


def test_namespace_map_moves_its_namespaces_and_namespace_the_rest():
    """The recovery-key Role goes to the mapped namespace; its binding's ServiceAccount stays the challenger's."""
    applier = kube_apply.Applier.__new__(kube_apply.Applier)  # place() needs no API client
    applier.namespace, applier.namespace_map = "kms", {"kcrypt-recovery": "kms-recovery"}
    role = {"kind": "Role", "metadata": {"name": "r", "namespace": "kcrypt-recovery"}}
    binding = {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "kcrypt-recovery"},
               "subjects": [{"kind": "ServiceAccount", "name": "kcrypt-challenger", "namespace": "kcrypt"}]}
    other = {"kind": "Role", "metadata": {"name": "o", "namespace": "kcrypt"}}
    namespace = {"kind": "Namespace", "metadata": {"name": "kcrypt-recovery"}}
    assert applier.place(role, _Resource(True))["metadata"]["namespace"] == "kms-recovery"
    placed = applier.place(binding, _Resource(True))
    assert placed["metadata"]["namespace"] == "kms-recovery" and placed["subjects"][0]["namespace"] == "kms"
    assert applier.place(other, _Resource(True))["metadata"]["namespace"] == "kms"
    assert "namespace" not in applier.place(namespace, _Resource(False))["metadata"]
    assert role["metadata"]["namespace"] == "kcrypt-recovery"  # the caller's object is left as it was
