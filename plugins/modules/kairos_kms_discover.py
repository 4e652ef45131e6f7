#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kairos_kms_discover
short_description: Find a Kairos KMS (kcrypt challenger) announced with mDNS
version_added: 0.1.0
description:
  - Browses the C(_kcrypt._tcp) mDNS service on the managed host's network and returns the address
    of the KMS whose SRV target is O(host), the way a Kairos node with C(kcrypt.challenger.mdns=true)
    finds it.
  - Only an announcement whose SRV target equals O(host) and that carries A, SRV and TXT records is
    accepted; IPv6 answers are ignored. Without an answer within O(timeout) the task fails.
  - Sends mDNS queries on O(interfaces); when empty, on the interfaces in the E(KCRYPT_MDNS_INTERFACES)
    environment variable of the managed host, else on every interface, as a Kairos node does.
  - Read-only; it never changes the host.
author:
  - kairos.kcrypt contributors (@kairos-io)
extends_documentation_fragment:
  - kairos.kcrypt.attributes
requirements:
  - zeroconf >= 0.131 (Python library on the managed host)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  host:
    description:
      - The C(.local) name of the KMS, as nodes write it in C(challenger_server), for example V(kms.local).
      - A C(:port) suffix is accepted and ignored for the lookup.
      - Required unless O(challenger_server) is given.
    type: str
  challenger_server:
    description:
      - A challenger URL with a C(.local) host, for example V(http://kms.local:8082). The returned RV(url)
        is this URL with its host replaced by the discovered C(ip:port), as upstream's client does.
      - Mutually exclusive with O(host).
    type: str
  scheme:
    description:
      - URL scheme of the returned RV(url) when O(host) is given.
    type: str
    choices: [http, https]
    default: http
  interfaces:
    description:
      - Network interfaces (names such as V(eth0)) or IPv4 addresses to send mDNS queries on.
      - V(all) sends them on every interface, as upstream's client does.
      - When empty, the environment variable E(KCRYPT_MDNS_INTERFACES) on the managed host is used,
        then every interface.
    type: list
    elements: str
    default: []
  timeout:
    description:
      - Seconds to wait for a matching answer. Upstream's client waits 15 seconds.
    type: float
    default: 15.0
  service_type:
    description:
      - The DNS-SD service type to browse.
    type: str
    default: _kcrypt._tcp
notes:
  - The KMS can announce itself with the challenger's mDNS option, or with upstream's
    C(simple-mdns-server --serviceType _kcrypt._tcp --hostName kms.local).
  - Clients connect to the discovered IP address with the original host in the C(Host) header, so a
    TLS certificate of the KMS needs the IP address as a subject alternative name.
seealso:
  - name: Kairos partition encryption
    description: Upstream documentation of kcrypt and the challenger.
    link: https://kairos.io/docs/advanced/partition_encryption/
"""

EXAMPLES = r"""
- name: Find the KMS on the node's LAN
  kairos.kcrypt.kairos_kms_discover:
    host: kms.local
    interfaces: [eth0]
  register: kms

- name: Show where it is
  ansible.builtin.debug:
    msg: "KMS at {{ kms.url }} (Host header {{ kms.host_header }})"

- name: Rewrite a configured challenger URL the way the node does
  kairos.kcrypt.kairos_kms_discover:
    challenger_server: https://kms.local:8443
    interfaces: [eth0]
    timeout: 5
  register: kms
"""

RETURN = r"""
url:
  description: The URL to reach the KMS at its discovered address.
  returned: success
  type: str
  sample: http://192.168.1.20:8082
address:
  description: The IPv4 address from the announcement's A record.
  returned: success
  type: str
  sample: 192.168.1.20
port:
  description: The port from the announcement's SRV record.
  returned: success
  type: int
  sample: 8082
host_header:
  description: The original host (and port, if the URL had one) to send as the C(Host) header.
  returned: success
  type: str
  sample: kms.local:8443
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError


def discover(params):
    """Resolve the KMS and describe where it is (upstream's queryMDNS for a challenger URL)."""
    if params["timeout"] <= 0:
        raise KcryptError("timeout must be a positive number of seconds")
    if params["challenger_server"]:
        host = mdns.url_host(params["challenger_server"])
    else:
        host = params["host"]
    address, port = mdns.resolve(
        host, timeout=params["timeout"], interfaces=params["interfaces"] or None, service_type=params["service_type"]
    )
    if params["challenger_server"]:
        url = mdns.rewrite_url(params["challenger_server"], address, port)
    else:
        url = "%s://%s:%d" % (params["scheme"], address, port)
    return {"url": url, "address": address, "port": port, "host_header": host}


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(
            host=dict(type="str"),
            challenger_server=dict(type="str"),
            scheme=dict(type="str", choices=["http", "https"], default="http"),
            interfaces=dict(type="list", elements="str", default=[]),
            timeout=dict(type="float", default=mdns.DEFAULT_TIMEOUT),
            service_type=dict(type="str", default=mdns.SERVICE_TYPE),
        ),
        mutually_exclusive=[("host", "challenger_server")],
        required_one_of=[("host", "challenger_server")],
        supports_check_mode=True,
    )
    result = run_or_fail(module, discover, module.params)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
