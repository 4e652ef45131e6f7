# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bundle the challenger's code into one reproducible Python zip application.

    kcrypt_bundle.py --collection ROOT --output kcrypt-challenger.pyz

The archive holds what the server needs and nothing else: the ``common`` and ``kms``
packages of ``plugins/module_utils`` and the challenger's CLI (``cli/challenger.py``,
``cli/challenger_admin.py``), under their import names
``ansible_collections/kairos/kcrypt/plugins/module_utils/...`` (with an ``__init__.py`` per
folder, so no other ``ansible_collections`` is needed), and a ``__main__.py`` running the
``kcrypt-challenger`` CLI. Node code (tpm, client, node) is not shipped. Entries are sorted and carry a fixed timestamp, so the same code
always gives the same bytes: the role copies the bundle and changes nothing when the code
did not change. Used by the ``challenger`` role (on the controller) and by
deploy/container/Containerfile. Prints the archive's SHA-256.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import zipfile

PACKAGE = "ansible_collections/kairos/kcrypt/plugins/module_utils"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MAIN = (
    "# kcrypt-challenger: the kairos.kcrypt KMS and its store administration (bundled by kcrypt_bundle.py)\n"
    "import sys\n\n"
    "from ansible_collections.kairos.kcrypt.plugins.module_utils.cli.challenger import main\n\n"
    "sys.exit(main())\n"
)


# What the server imports (docs/developing.md: kms depends on common only; the CLI on both).
SHIPPED = ("common/*.py", "kms/*.py", "cli/__init__.py", "cli/challenger.py", "cli/challenger_admin.py")
# Deployment steps the role runs as modules (kairos_challenger_tls, kairos_k8s_objects), not the server.
NOT_SHIPPED = ("kms/tls_material.py", "kms/kube_apply.py")


def entries(collection):
    root = os.path.join(collection, "plugins", "module_utils")
    skipped = {os.path.join(root, name) for name in NOT_SHIPPED}
    sources = sorted({path for pattern in SHIPPED for path in glob.glob(os.path.join(root, pattern))} - skipped)
    if not any(path.endswith(os.path.join("cli", "challenger.py")) for path in sources):
        raise SystemExit("%s does not look like the kairos.kcrypt collection (no cli/challenger.py)" % collection)
    parts = PACKAGE.split("/")
    for depth in range(1, len(parts) + 1):  # regular packages all the way down
        yield "/".join(parts[:depth]) + "/__init__.py", b""
    for path in sources:
        with open(path, "rb") as handle:
            yield "%s/%s" % (PACKAGE, os.path.relpath(path, root).replace(os.sep, "/")), handle.read()
    yield "__main__.py", MAIN.encode()


def build(collection, output):
    tmp = output + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(entries(collection)):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    os.replace(tmp, output)
    with open(output, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description="bundle the kcrypt challenger into a zip application")
    parser.add_argument("--collection", required=True, help="root of the kairos.kcrypt collection")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    sys.stdout.write(build(os.path.abspath(args.collection), args.output) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
