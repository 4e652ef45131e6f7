# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One guest connection to a host loopback port, for QEMU's ``guestfwd=tcp:ADDR:PORT-cmd:...``.

QEMU user networking starts this program once per guest connection with the
connection as stdin/stdout/stderr (one socket). It connects to 127.0.0.1:PORT and
copies bytes both ways, passing on half-closes, until both sides are done.
(The plain ``guestfwd=...-tcp:HOST:PORT`` form serves only one connection per
VM, which is not enough for a client that retries.)

Usage: relay.py PORT
"""

import ctypes
import selectors
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def relay(guest, host):
    selector = selectors.DefaultSelector()
    peers = {guest: host, host: guest}
    for sock in peers:
        selector.register(sock, selectors.EVENT_READ)
    open_reads = 2
    while open_reads:
        for key, _events in selector.select():
            source = key.fileobj
            data = source.recv(65536)
            if data:
                peers[source].sendall(data)
                continue
            selector.unregister(source)
            open_reads -= 1
            try:
                peers[source].shutdown(socket.SHUT_WR)
            except OSError:
                pass


def main():
    # End with QEMU (our parent), whatever the host side does.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    guest = socket.socket(fileno=0)
    try:
        host = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    except OSError:
        return 1  # the guest sees the connection closed, as with a refused port
    host.settimeout(None)
    try:
        relay(guest, host)
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
