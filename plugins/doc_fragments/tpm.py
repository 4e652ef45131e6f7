# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The option of every module that opens a TPM (module_utils/ansible_common.py TPM_SPEC)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  tpm_device:
    description:
      - The TPM to use on the target, as a device path (V(/dev/tpmrm0)), a swtpm UNIX socket path,
        or a TCTI string such as V(swtpm:host=127.0.0.1,port=2321) or V(device:/dev/tpm0).
      - When unset or empty, the E(KCRYPT_TPM_DEVICE) environment variable of the target is used, then
        V(/dev/tpmrm0), then V(/dev/tpm0), as upstream Kairos does.
    type: str
requirements:
  - tpm2-pytss >= 2.1 (Python, on the target) and the tpm2-tss ESAPI libraries (C(libtss2-esys))
  - cryptography >= 41 (Python, on the target)
"""
