# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Drive the test VM by hand (the tests use the same code through tests/vm/conftest.py).

  .venv/bin/python tests/vm/run.py build                       build the image if missing; print where it is and its figures
  .venv/bin/python tests/vm/run.py boot -c 'cryptsetup --version'
  .venv/bin/python tests/vm/run.py boot --node /tmp/n1 --disk new script.sh
  .venv/bin/python tests/vm/run.py boot --node /tmp/n1 --disk /tmp/n1/disk0.img --forward 8080 -i

A node directory keeps the TPM state (``tpm/``, provisioned on first use) and the
console logs, so boots of one node share their TPM like a real machine. ``--disk new``
makes ``<node>/disk.img`` with a COS_PERSISTENT partition. ``-i`` gives an
interactive shell on the console (``poweroff -f`` to leave). The project checkout is
at /kcrypt in the guest, the script's directory at /job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

from support.swtpm import provision  # noqa: E402
from vm import image  # noqa: E402
from vm.machine import Machine, VMError, make_persistent_disk  # noqa: E402


def build(_args):
    img = image.ensure_image()
    manifest = img.manifest
    print(json.dumps({
        "directory": img.directory,
        "kernel": manifest["kernel"],
        "kernel_mib": round(manifest["kernel_bytes"] / 2**20, 1),
        "initrd_mib": round(manifest["initrd_bytes"] / 2**20, 1),
        "build_timings_s": manifest["timings"],
        "wheels": manifest["wheels"],
        "debs": len(manifest["debs"]),
    }, indent=1))
    return 0


def boot(args):
    node_dir = args.node or tempfile.mkdtemp(prefix="kcrypt-vm-node-")
    os.makedirs(node_dir, exist_ok=True)
    state = os.path.join(node_dir, "tpm")
    if not os.path.exists(os.path.join(state, "tpm2-00.permall")):
        provision(state, ek_cert=True)
    disks = []
    for disk in args.disk:
        if disk == "new":
            disk = os.path.join(node_dir, "disk%d.img" % len(disks))
            make_persistent_disk(disk)
        disks.append(disk)
    if args.interactive:
        payload = "exec setsid cttyhack sh -l\n"
    elif args.command:
        payload = args.command + "\n"
    else:
        with open(args.script) as handle:
            payload = handle.read()
    machine = Machine(image.ensure_image(), node_dir, state, disks=disks, forwards=args.forward)
    previous = [n for n in os.listdir(node_dir) if n.startswith("boot") and n.endswith(".console.log")]
    name = "boot%d" % (len(previous) + 1)  # keep the logs of earlier boots of this node
    if args.interactive:
        machine.boot(payload, name=name, interactive=True, timeout=None)
        return 0
    try:
        result = machine.boot(payload, name=name, timeout=args.timeout, echo=print if args.verbose else None)
    except VMError as error:
        print(error, file=sys.stderr)
        return 2
    if not args.verbose:
        print(result.output)
    print(json.dumps({"exit": result.exit_code, "results": result.results, "seconds": round(result.seconds, 1),
                      "stamps": result.stamps, "console_log": result.console_log, "node": node_dir}, indent=1),
          file=sys.stderr)
    return result.exit_code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command_name", required=True)
    commands.add_parser("build", help="build the image if missing and describe it").set_defaults(func=build)
    run = commands.add_parser("boot", help="boot once and run a shell script in the guest")
    run.add_argument("script", nargs="?", help="shell script to run as the guest's payload")
    run.add_argument("-c", "--command", help="shell command(s) to run instead of a script")
    run.add_argument("-i", "--interactive", action="store_true", help="a shell on the console instead of a payload")
    run.add_argument("--node", help="node directory (TPM state, logs); default: a new temporary one")
    run.add_argument("--disk", action="append", default=[], help="raw disk image to attach, or 'new'")
    run.add_argument("--forward", action="append", type=int, default=[], help="host loopback port reachable at 10.0.2.2")
    run.add_argument("--timeout", type=int, default=300)
    run.add_argument("-v", "--verbose", action="store_true", help="stream the whole console")
    run.set_defaults(func=boot)
    args = parser.parse_args(argv)
    if args.command_name == "boot" and not (args.script or args.command or args.interactive):
        parser.error("boot needs a script, -c COMMAND or -i")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
