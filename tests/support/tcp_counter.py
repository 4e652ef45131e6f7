# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A TCP listener on 127.0.0.1 that counts connections: to count a client's attempts exactly.

``CountingListener()`` accepts and closes every connection at once (each client attempt
fails and is counted); ``CountingListener(forward_to=port)`` relays every connection to a
real server on 127.0.0.1. Stops its thread and sockets on exit.
"""

from __future__ import annotations

import socket
import threading


class CountingListener:
    def __init__(self, forward_to=None):
        self.forward_to = forward_to
        self.count = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads = []
        self._conns = []
        self._thread = threading.Thread(target=self._serve, name="tcp-counter", daemon=True)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn = self._sock.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            self.count += 1
            if self.forward_to is None:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.forward_to), timeout=5)
            except OSError:
                conn.close()
                continue
            self._conns += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                thread = threading.Thread(target=self._pipe, args=(src, dst), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for thread in self._threads:
            thread.join(5)
        for conn in self._conns:
            conn.close()
