# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Golden vectors of the compatibility contract (spec §11) that need no TPM: the EK template and its
policy digest, the SPKI encoding of the TPM hash, the SealedVolume CRD schema."""

from __future__ import annotations

import hashlib
import os
import struct

import tpm2_pytss as tss
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import identity
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store, volume_attestation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
EK_AUTH_POLICY = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"  # spec §1.1 "8371…69AA"
TPM_CC_POLICY_SECRET = 0x00000151
TPM_RH_ENDORSEMENT = 0x4000000B


def _no_nv(index):
    raise NoSuchIndex(index)


def test_ek_template_is_the_tcg_default_rsa2048_template():
    """Checklist 2: what tpm.endorsement_key() creates when the TPM has no EK certificate."""
    cert, template = create_ek_template("EK-RSA2048", _no_nv)
    area = template.publicArea
    assert cert is None
    assert area.type == tss.TPM2_ALG.RSA and area.nameAlg == tss.TPM2_ALG.SHA256
    assert area.objectAttributes == (
        tss.TPMA_OBJECT.FIXEDTPM | tss.TPMA_OBJECT.FIXEDPARENT | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | tss.TPMA_OBJECT.ADMINWITHPOLICY | tss.TPMA_OBJECT.RESTRICTED | tss.TPMA_OBJECT.DECRYPT)
    assert bytes(area.authPolicy).hex() == EK_AUTH_POLICY
    detail = area.parameters.rsaDetail
    assert (detail.symmetric.algorithm, detail.symmetric.keyBits.aes, detail.symmetric.mode.aes) == (
        tss.TPM2_ALG.AES, 128, tss.TPM2_ALG.CFB)
    assert (detail.scheme.scheme, detail.keyBits, detail.exponent) == (tss.TPM2_ALG.NULL, 2048, 0)
    assert bytes(area.unique.rsa) == b"\x00" * 256
    nonce = b"vendor-nonce"
    template = create_ek_template("EK-RSA2048", lambda index: nonce if index == 0x01C00003 else _no_nv(index))[1]
    assert bytes(template.publicArea.unique.rsa) == nonce + b"\x00" * (256 - len(nonce))


def test_ek_auth_policy_is_policy_secret_of_the_endorsement_hierarchy():
    """The 8371…69AA digest from first principles: PolicySecret(TPM_RH_ENDORSEMENT), empty policyRef."""
    step = hashlib.sha256(b"\x00" * 32 + struct.pack(">II", TPM_CC_POLICY_SECRET, TPM_RH_ENDORSEMENT)).digest()
    assert hashlib.sha256(step).hexdigest() == EK_AUTH_POLICY


def test_tpm_hash_is_over_der_spki_with_null_parameters():
    """Checklist 1: SHA-256 of the DER SubjectPublicKeyInfo, rsaEncryption OID with NULL parameters."""
    key = rsa.generate_private_key(65537, 2048).public_key()
    der = identity.spki_der(key)
    # SEQUENCE { SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }, BIT STRING { RSAPublicKey } }
    assert der[:4] == b"\x30\x82\x01\x22" and der[4:19] == bytes.fromhex("300d06092a864886f70d0101010500")
    assert der[19:24] == b"\x03\x82\x01\x0f\x00"
    numbers = key.public_numbers()
    assert der[24:] == (b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00" + numbers.n.to_bytes(256, "big") + b"\x02\x03\x01\x00\x01")
    assert identity.tpm_hash(key) == hashlib.sha256(der).hexdigest()
    assert identity.is_tpm_hash(identity.tpm_hash(key)) and not identity.is_tpm_hash(identity.tpm_hash(key).upper())


def _properties(schema):
    """The property tree of an OpenAPI schema as nested dicts (arrays by their items, maps as '*')."""
    if schema.get("type") == "array":
        return [_properties(schema["items"])]
    if "additionalProperties" in schema:
        return {"*": schema["additionalProperties"]["type"]}
    if schema.get("type") == "object":
        return {key: _properties(value) for key, value in (schema.get("properties") or {}).items()}
    return schema["type"]


def test_crd_has_upstreams_names_and_schema():
    """Checklist 35: sealedvolumes.keyserver.kairos.io, v1alpha1, namespaced, status subresource,
    spec keys exactly upstream's (and the store validates against the same keys)."""
    with open(os.path.join(ROOT, "deploy", "kubernetes", "crd.yaml")) as handle:
        crd = yaml.safe_load(handle)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "sealedvolumes.keyserver.kairos.io" == "%s.%s" % (store.PLURAL, store.GROUP)
    assert spec["group"] == "keyserver.kairos.io" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "SealedVolume", "listKind": "SealedVolumeList", "plural": "sealedvolumes",
                             "singular": "sealedvolume"}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"], version["subresources"]) == ("v1alpha1", True, True, {"status": {}})
    schema = version["schema"]["openAPIV3Schema"]
    ours = _properties(schema["properties"]["spec"])
    added = ours["attestation"]["pcrValues"]
    assert added.pop("relearnUntil") == added.pop("relearnTo") == {"*": "string"}  # our addition: PCR upgrade windows
    assert ours == UPSTREAM_SPEC  # everything else is upstream's schema
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert not version["schema"]["openAPIV3Schema"].get("required") and "required" not in schema["properties"]["spec"]

    assert _store_schema(store.SPEC_KEYS) == _properties(schema["properties"]["spec"])  # the store writes what the CRD holds


# Upstream's SealedVolume spec (spec §4, controller-gen output of kcrypt-challenger HEAD), as _properties() shows it.
UPSTREAM_SPEC = {
    "TPMHash": "string",
    "partitions": [{"label": "string", "deviceName": "string", "uuid": "string",
                    "secret": {"name": "string", "path": "string"}}],
    "quarantined": "boolean",
    "attestation": {"ekPublicKey": "string", "pcrValues": {"pcrs": {"*": "string"}},
                    "enrolledAt": "string", "lastVerifiedAt": "string"},
}


def _prune(value, schema):
    """What a structural CRD schema keeps of ``value`` (the API server drops unknown fields)."""
    if isinstance(schema, list):
        return [_prune(item, schema[0]) for item in value]
    if isinstance(schema, dict) and "*" in schema:
        return dict(value)
    if isinstance(schema, dict):
        return {key: _prune(item, schema[key]) for key, item in value.items() if key in schema}
    return value


def test_upstreams_crd_accepts_our_volumes_and_prunes_only_the_upgrade_windows():
    """A volume with an open PCR window under upstream's CRD: the window maps are pruned, nothing else; the old
    value is then enforced (the window is closed, never the check)."""
    old, new = "a" * 64, "b" * 64
    spec = {"TPMHash": "f" * 64, "partitions": [{"label": "COS_PERSISTENT", "secret": {"name": "s", "path": "passphrase"}}],
            "attestation": {"ekPublicKey": "PEM", "enrolledAt": "2026-12-01T00:00:00Z",
                            "pcrValues": {"pcrs": {"0": "", "7": old}, "relearnUntil": {"7": "2999-01-01T00:00:00Z"},
                                          "relearnTo": {"7": new}}}}
    pruned = _prune(spec, UPSTREAM_SPEC)
    assert pruned["attestation"]["pcrValues"] == {"pcrs": {"0": "", "7": old}}
    spec["attestation"]["pcrValues"] = {"pcrs": {"0": "", "7": old}}
    assert pruned == spec
    volume_attestation.verify_pcrs(pruned["attestation"]["pcrValues"], {"0": old, "7": old})
    with pytest.raises(volume_attestation.PolicyRejection, match="PCR7 changed"):
        volume_attestation.verify_pcrs(pruned["attestation"]["pcrValues"], {"0": old, "7": new})


def _store_schema(keys):
    """store.SPEC_KEYS in the shape of _properties()."""
    if isinstance(keys, list):
        return [_store_schema(keys[0])]
    if isinstance(keys, dict):
        return {key: _store_schema(value) for key, value in keys.items()}
    return {str: "string", bool: "boolean", "pcrs": {"*": "string"}}[keys]
