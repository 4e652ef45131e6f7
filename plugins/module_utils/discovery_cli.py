# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``kcrypt-discovery-challenger``: the node CLI, a drop-in for upstream's (spec §1.3, §5.4).

Private to the collection. With no subcommand it prints the TPM hash with no
newline and exits 0; on error it writes ``Error: <message>`` to stderr and
exits 1.
"""

from __future__ import annotations

import argparse
import sys

from ansible_collections.kairos.kcrypt.plugins.module_utils.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import TPM

PROG = "kcrypt-discovery-challenger"


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print this node's TPM hash, or fetch a partition passphrase from a kcrypt challenger.",
    )
    parser.add_argument("--debug", action="store_true", help="verbose logging to stderr")
    parser.add_argument(
        "--tpm-device",
        default="",
        help="TPM device path or TCTI string (default: $KCRYPT_TPM_DEVICE, /dev/tpmrm0, /dev/tpm0)",
    )
    return parser


def print_tpm_hash(args, out):
    with TPM(args.tpm_device) as tpm:
        out.write(tpm.endorsement_key().tpm_hash)


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print_tpm_hash(args, out)
    except KcryptError as error:
        err.write("Error: %s\n" % error)
        return 1
    out.flush()
    return 0
