#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_tpm_hash
short_description: Read a node's TPM identity (the Kairos "TPM hash")
version_added: 0.1.0
description:
  - Reads the RSA endorsement key (EK) of the node's TPM 2.0 and returns its TPM hash, the lowercase hex
    SHA-256 of the DER SubjectPublicKeyInfo of the EK public key, exactly as Kairos computes it. This is the
    value a C(SealedVolume) registers and the key-management server (challenger) identifies the node by.
  - The EK is the public key of the RSA EK certificate in NV index V(0x01c00002) when the TPM has one,
    otherwise the key the TCG default RSA-2048 EK template produces (honouring a nonce in V(0x01c00003)).
  - Optionally returns the current values of PCRs in the SHA-256 bank.
  - Read-only; the TPM is left as it was.
author:
  - kairos.kcrypt contributors (@kairos-io)
extends_documentation_fragment:
  - kairos.kcrypt.tpm
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  pcrs:
    description:
      - PCR indices (0-23) whose SHA-256 values to return in RV(pcr_values).
    type: list
    elements: int
    default: []
seealso:
  - module: kairos.kcrypt.kairos_sealedvolume
notes:
  - Needs read access to the TPM device, which usually means C(become=true).
"""

EXAMPLES = r"""
- name: Read the TPM hash of every node
  kairos.kcrypt.kairos_tpm_hash:
  register: tpm
  become: true

- name: Show it
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }}: {{ tpm.tpm_hash }}"

- name: Read the hash and the boot-state PCRs from a software TPM
  kairos.kcrypt.kairos_tpm_hash:
    tpm_device: swtpm:host=127.0.0.1,port=2321
    pcrs: [0, 7, 11]
"""

RETURN = r"""
tpm_hash:
  description: Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of the EK public key (64 characters).
  returned: success
  type: str
  sample: 7441c78f1976fb23e6a5c68f0be35be8375b135dcb36fb03cecc60f39c7660bd
ek_public_pem:
  description: The EK public key as a C(PUBLIC KEY) PEM, as the challenger stores it in C(ekPublicKey).
  returned: success
  type: str
  sample: "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA...\n-----END PUBLIC KEY-----\n"
ek_certificate_pem:
  description: The EK certificate from NV index V(0x01c00002) as PEM; null when the TPM has none.
  returned: success
  type: str
  sample: "-----BEGIN CERTIFICATE-----\nMIID...\n-----END CERTIFICATE-----\n"
pcr_values:
  description: Current SHA-256 PCR values by decimal index, lowercase hex, for the PCRs requested in O(pcrs).
  returned: success
  type: dict
  sample: {"0": "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"}
tpm_device:
  description: The TCTI string of the TPM that was read.
  returned: success
  type: str
  sample: device:/dev/tpmrm0
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import TPM_SPEC, generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM, parse_pcr_list


def read_identity(tpm_device, pcrs):
    pcrs = parse_pcr_list(pcrs)
    with TPM(tpm_device) as tpm:
        ek = tpm.endorsement_key()
        values = tpm.pcr_read(pcrs) if pcrs else {}
        return {
            "tpm_hash": ek.tpm_hash,
            "ek_public_pem": ek.public_pem,
            "ek_certificate_pem": ek.certificate_pem,
            "pcr_values": {str(index): value.hex() for index, value in sorted(values.items())},
            "tpm_device": tpm.tcti,
        }


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(TPM_SPEC, pcrs={"type": "list", "elements": "int", "default": []}),
        supports_check_mode=True,
    )
    result = run_or_fail(module, read_identity, module.params["tpm_device"], module.params["pcrs"])
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
