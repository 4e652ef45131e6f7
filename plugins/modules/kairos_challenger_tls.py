#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_challenger_tls
short_description: Keep a kcrypt challenger's private CA and server certificate
version_added: 0.1.0
description:
  - Makes the TLS material of a kcrypt challenger (KMS) in O(path). It creates a private CA (C(ca.key), C(ca.crt))
    once and keeps it, and a server certificate (C(server.key), C(server.crt)) signed by that CA.
  - The server certificate is issued again when it is missing, does not match its key or the CA, lacks one of
    O(subject_alt_names), or expires within 30 days. Its key is kept.
  - Private keys are created with mode C(0600) and never returned. The CA key belongs to the user the task runs as;
    the server key to O(owner), so the service can read it.
  - The C(kairos.kcrypt.challenger) role runs it when C(challenger_tls=generate). Nodes trust the RV(ca_certificate)
    it returns (the O(kairos.kcrypt.kairos_luks_encrypt#module:certificate) option).
author:
  - kairos.kcrypt contributors (@kairos-io)
extends_documentation_fragment:
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
    details:
      - Check mode writes nothing and returns the reasons a real run would change something.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  path:
    description:
      - The directory of the TLS files. It is created (mode C(0750)) if missing.
    type: path
    required: true
  common_name:
    description: The common name of the server certificate.
    type: str
    required: true
  subject_alt_names:
    description:
      - The names nodes reach the challenger by, as V(DNS:name) or V(IP:address). At least one.
      - Nodes that find the KMS with mDNS connect to its IP address, so it must be listed too.
    type: list
    elements: str
    required: true
  ca_common_name:
    description: The common name of the CA certificate, used when the CA is created.
    type: str
    default: kairos.kcrypt challenger CA
  owner:
    description:
      - The user that owns the server key (the service user). Empty leaves it to the user the task runs as.
    type: str
    default: ""
  group:
    description:
      - The group of the server key. Empty means the primary group of O(owner).
    type: str
    default: ""
  days:
    description: Lifetime of a new server certificate, in days. It never outlives the CA.
    type: int
    default: 825
  ca_days:
    description: Lifetime of a new CA certificate, in days.
    type: int
    default: 3650
requirements:
  - cryptography >= 41 (Python, on the target)
"""

EXAMPLES = r"""
- name: Keep the challenger's CA and server certificate
  kairos.kcrypt.kairos_challenger_tls:
    path: /etc/kcrypt-challenger/tls
    common_name: kms.example.com
    subject_alt_names:
      - DNS:kms.example.com
      - IP:192.168.1.20
    owner: kcrypt
  register: tls

- name: Give the nodes the CA certificate
  ansible.builtin.set_fact:
    kms_ca_certificate: "{{ tls.ca_certificate }}"
"""

RETURN = r"""
ca_certificate:
  description: The CA certificate as PEM, for the nodes' C(certificate) option. Empty in check mode before the CA exists.
  returned: always
  type: str
  sample: "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
reasons:
  description: Why something changed (or would change, in check mode).
  returned: always
  type: list
  elements: str
  sample: ["server certificate lacks kms.local"]
certificate:
  description: Path of the server certificate.
  returned: always
  type: str
  sample: /etc/kcrypt-challenger/tls/server.crt
key:
  description: Path of the server key.
  returned: always
  type: str
  sample: /etc/kcrypt-challenger/tls/server.key
ca:
  description: Path of the CA certificate.
  returned: always
  type: str
  sample: /etc/kcrypt-challenger/tls/ca.crt
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import tls_material


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(
            path=dict(type="path", required=True),
            common_name=dict(type="str", required=True),
            subject_alt_names=dict(type="list", elements="str", required=True),
            ca_common_name=dict(type="str", default=tls_material.CA_COMMON_NAME),
            owner=dict(type="str", default=""),
            group=dict(type="str", default=""),
            days=dict(type="int", default=825),
            ca_days=dict(type="int", default=3650),
        ),
        supports_check_mode=True,
    )
    params = module.params
    result = run_or_fail(module, tls_material.ensure, params["path"], params["common_name"], params["subject_alt_names"],
                         owner=params["owner"], group=params["group"], days=params["days"], ca_days=params["ca_days"],
                         ca_common_name=params["ca_common_name"], check_mode=module.check_mode)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
