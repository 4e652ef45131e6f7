# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where Kairos' offline mode keeps its passphrase (module_utils/ansible_common.py OFFLINE_KEY_SPEC)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  nv_index:
    description:
      - TPM NV index of the offline passphrase blob (Kairos C(kcrypt.nv_index)).
      - Hex, octal or decimal, as in the Kairos configuration.
      - When unset, V(0x1500000), as upstream Kairos.
    type: str
  c_index:
    description:
      - Persistent handle of the TPM RSA key that encrypts the offline passphrase (Kairos C(kcrypt.c_index)).
        When the passphrase is first stored, the key is created there if it is absent.
      - Unlike upstream Kairos, a non-default handle is honoured when encrypting as well as when decrypting.
      - When unset, V(0x81000008), as upstream Kairos.
    type: str
"""
