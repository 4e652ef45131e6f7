#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: kairos_tpm_nv
short_description: Check, read or clean up the TPM NV area of Kairos' offline encryption mode
version_added: 0.1.0
description:
  - In offline mode, Kairos keeps the partition passphrase in a TPM NV index, encrypted with an RSA key in
    the TPM. This module checks the index, reads it, or cleans it up.
  - It does what C(kairos-agent kcrypt checknv), C(readnv) and C(cleanupnv) do.
  - Cleaning up destroys the only TPM copy of the passphrase. Partitions encrypted with it can then be opened
    only with a recovery key or another key slot. This is why the module requires O(confirm=true) for it.
options:
  operation:
    description:
      - V(check) reports whether the index holds data, and how much. It decrypts nothing.
      - V(read) decrypts the blob with the key at O(c_index) and reports whether that works in RV(decryptable).
        A blob that does not decrypt is reported, not failed. Use C(failed_when) to fail on it.
        The passphrase is returned only when O(return_passphrase=true).
      - V(cleanup) removes the index (C(NV_UndefineSpace)). It needs O(confirm=true).
    type: str
    choices: [check, read, cleanup]
    default: check
  confirm:
    description:
      - Must be V(true) for O(operation=cleanup). It plays the role of C(--i-know-what-i-am-doing).
    type: bool
    default: false
  return_passphrase:
    description:
      - With O(operation=read), return the decrypted passphrase in RV(passphrase).
      - "The task must set C(no_log: true). The module refuses to return the passphrase otherwise."
    type: bool
    default: false
extends_documentation_fragment:
  - kairos.kcrypt.tpm
  - kairos.kcrypt.offline_key
  - kairos.kcrypt.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
seealso:
  - module: kairos.kcrypt.kairos_luks_encrypt
author:
  - kairos.kcrypt contributors (@kairos-io)
"""

EXAMPLES = r"""
- name: Is there an offline passphrase in the TPM?
  kairos.kcrypt.kairos_tpm_nv:
    operation: check
  register: nv

- name: Check that the blob still decrypts (for example after changing c_index)
  kairos.kcrypt.kairos_tpm_nv:
    operation: read

- name: Remove a stale NV blob before re-installing the node
  kairos.kcrypt.kairos_tpm_nv:
    operation: cleanup
    confirm: true
"""

RETURN = r"""
nv_index:
  description: The NV index, in hex.
  returned: always
  type: str
  sample: "0x1500000"
exists:
  description: Whether the index holds data. For V(cleanup), whether it held data before the task.
  returned: always
  type: bool
size:
  description: Size of the blob in bytes. A Kairos blob has 256.
  returned: when O(operation=check)
  type: int
c_index:
  description: The handle of the key that decrypts the blob, in hex.
  returned: when O(operation=read)
  type: str
  sample: "0x81000008"
decryptable:
  description: Whether the key at O(c_index) decrypts the blob.
  returned: when O(operation=read)
  type: bool
error:
  description: Why the blob could not be decrypted (wrong O(c_index), or a blob from another TPM).
  returned: when O(operation=read) and RV(decryptable) is false while the index exists
  type: str
passphrase:
  description: The decrypted passphrase.
  returned: when O(operation=read), O(return_passphrase=true) and the index exists
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kairos.kcrypt.plugins.module_utils.ansible_common import OFFLINE_KEY_SPEC, TPM_SPEC, generate_argspec, run_or_fail
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import nv_area


def run(module):
    """(changed, result) of the requested operation."""
    params = module.params
    if params["operation"] == "check":
        return False, nv_area.check(params["tpm_device"], params["nv_index"])
    if params["operation"] == "read":
        if params["return_passphrase"] and not module.no_log:
            raise KcryptError("return_passphrase=true puts the passphrase in the result: set 'no_log: true' on the task")
        status, passphrase = nv_area.read(params["tpm_device"], params["nv_index"], params["c_index"])
        result = dict(status)
        if passphrase is not None and params["return_passphrase"]:
            result["passphrase"] = passphrase.decode("utf-8", "replace")
        elif passphrase is not None:
            module.no_log_values.add(passphrase.decode("utf-8", "replace"))
        return False, result
    cleaned = nv_area.cleanup(params["tpm_device"], params["nv_index"], params["confirm"], module.check_mode)
    return cleaned["existed"], {"nv_index": cleaned["nv_index"], "exists": cleaned["existed"]}


def main():
    module = AnsibleModule(
        argument_spec=generate_argspec(
            TPM_SPEC,
            OFFLINE_KEY_SPEC,
            operation=dict(type="str", default="check", choices=["check", "read", "cleanup"]),
            confirm=dict(type="bool", default=False),
            return_passphrase=dict(type="bool", default=False, no_log=False),
        ),
        supports_check_mode=True,
    )
    changed, result = run_or_fail(module, run, module)
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
