# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options of the node modules that say where a partition's LUKS key comes from.

module_utils/ansible_common.py KEY_SOURCE_SPEC; modules that take it also take the kairos.kcrypt.tpm
and kairos.kcrypt.offline_key fragments (the TPM and the offline passphrase of V(tpm)).
"""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  key_source:
    description:
      - Where the LUKS key of each partition comes from.
      - V(tpm) is Kairos' offline mode. One random passphrase for all partitions is stored in the TPM NV
        index O(nv_index), encrypted with the RSA key at O(c_index). It is created on first use.
        The NV blob is byte-compatible with the blobs Kairos nodes write.
      - V(kms) is Kairos' online mode. The node proves its TPM to the kcrypt challenger at
        O(challenger_server) and gets one passphrase per partition. A new TPM may be enrolled on first use.
      - V(passphrase) uses O(passphrase).
      - V(tpm) and V(kms) use the TPM at O(tpm_device).
      - V(auto) decides as a Kairos node does, from its configuration (C(#cloud-config) files in C(/oem),
        C(/sysroot/oem) and C(/run/cos/oem), and the kernel command line). If C(kcrypt.challenger.challenger_server)
        is set or C(kcrypt.challenger.mdns) is true, it uses V(kms), otherwise V(tpm). The configured
        C(challenger_server), C(mdns), C(certificate), C(nv_index), C(c_index) and C(tpm_device) are used
        unless the task sets these options itself.
    type: str
    choices: [tpm, kms, passphrase, auto]
    default: tpm
  passphrase:
    description:
      - The LUKS passphrase when O(key_source=passphrase). It is used as is, with no trailing newline added or removed.
    type: str
  tpm_layout:
    description:
      - How a missing key at O(c_index) and a new offline NV index are created. Existing keys and indices
        are always used as they are, and blobs of both layouts are always read.
      - V(go-tpm) is what newest Kairos writes (tpm-helpers on go-tpm, kcrypt-discovery-challenger
        v0.12 and later), with NV name algorithm SHA-256 and a key template whose C(unique) is 256 zero bytes.
      - V(tpmk) is what Kairos clients up to v0.11 wrote, with NV name algorithm SHA-1 and an empty C(unique).
        Choose it when older Kairos tools on the node may re-create the key.
      - The two templates give different keys from the same TPM, so a blob needs the key it was made with.
      - Unset means V(go-tpm). Used by O(key_source=tpm), and by O(key_source=kms) with the legacy protocol.
    type: str
    choices: [go-tpm, tpmk]
  challenger_server:
    description:
      - URL of the kcrypt challenger (KMS), for example V(https://kms.example.com:8082).
      - Required with O(key_source=kms). With O(mdns), the host must end in C(.local).
    type: str
  certificate:
    description:
      - CA certificate the KMS certificate must chain to, added to the system trust store.
      - Give PEM text, as Kairos' C(kcrypt.challenger.certificate) holds it, or the path of a PEM file on the node.
    type: str
  mdns:
    description:
      - Resolve the C(.local) host of O(challenger_server) with mDNS (service C(_kcrypt._tcp)).
      - The default is V(false).
    type: bool
  mdns_interfaces:
    description:
      - Network interfaces (names such as V(eth0), or IPv4 addresses) to send the mDNS query on.
      - Empty means the E(KCRYPT_MDNS_INTERFACES) environment variable, then every interface, as upstream
        Kairos does.
    type: list
    elements: str
  kms_protocol:
    description:
      - The KMS protocol to use.
      - V(attestation) is the protocol of kcrypt-challenger v0.12 and later (WebSocket C(/tpm-attestation)).
      - V(legacy) is the protocol of v0.2 to v0.11 (C(/getPass) and C(/postPass)). The Kairos Helm chart still deploys a legacy server.
      - The two protocols do not interoperate, so pick the one your KMS speaks.
      - The default is V(attestation).
    type: str
    choices: [attestation, legacy]
  kms_attempts:
    description:
      - How many times to try the KMS before giving up.
      - The task does not retry when the KMS refuses the TPM, for example when it is quarantined.
    type: int
    default: 30
  kms_retry_delay:
    description:
      - Seconds to wait between KMS attempts.
    type: float
    default: 1.0
notes:
  - Keys are passed to C(cryptsetup) on stdin, never on its command line, and never appear in results.
"""
