# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run one side of mDNS in its own process (e.g. inside ``ip netns exec``) for tests.

``announce HOST PORT ADDRESS INTERFACE INSTANCE`` prints ``ready`` once announced and
keeps announcing until stdin closes or SIGTERM. ``resolve HOST TIMEOUT INTERFACES``
prints ``ip port`` or ``error: <message>`` and exits 0/1.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bin"))
import _checkout  # noqa: E402

_checkout.setup()

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns  # noqa: E402


def announce(host, port, address, interface, instance):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with mdns.Announcer(host, int(port), addresses=[address], interfaces=[interface], instance=instance):
        print("ready", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    return 0


def resolve(host, timeout, interfaces):
    try:
        ip, port = mdns.resolve(host, timeout=float(timeout), interfaces=interfaces)
    except mdns.MDNSError as error:
        print("error: %s" % error, flush=True)
        return 1
    print("%s %d" % (ip, port), flush=True)
    return 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    sys.exit({"announce": announce, "resolve": resolve}[command](*args))
