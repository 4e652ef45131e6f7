# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Print the passphrase the KMS store holds for a TPM hash and partition label (no newline).

Reads `kcrypt-challenger export --include-secrets` on stdin, so molecule's verify can test the
stored key against the disk through a pipe without the key passing through Ansible.
"""

import base64
import sys

import yaml


def main(tpm_hash, label):
    docs = [doc for doc in yaml.safe_load_all(sys.stdin) if doc]
    volume = next(doc for doc in docs if doc["kind"] == "SealedVolume" and doc["spec"]["TPMHash"] == tpm_hash)
    partition = next(part for part in volume["spec"]["partitions"] if part.get("label") == label)
    # the legacy protocol records no reference: the Secret then has upstream's name <volume>-<label>
    ref = partition.get("secret") or {}
    name = ref.get("name") or ("%s-%s" % (volume["metadata"]["name"], label)).lower().replace("_", "-")
    secret = next(doc for doc in docs if doc["kind"] == "Secret" and doc["metadata"]["name"] == name)
    sys.stdout.write(base64.b64decode(secret["data"][ref.get("path") or "passphrase"]).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
