# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small HTTP servers on 127.0.0.1 for config_url tests: a directory served as files (like
upstream's ``startAssetServer``), and one that accepts connections but never answers."""

from __future__ import annotations

import functools
import http.server
import socket
import threading


class FileServer:
    """Serves ``directory`` over HTTP on 127.0.0.1 in a thread; ``url(name)`` is a file's URL."""

    def __init__(self, directory):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name):
        return "http://127.0.0.1:%d/%s" % (self.port, name)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: a config server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)  # the kernel completes handshakes; nobody reads or writes
        self.port = self.sock.getsockname()[1]

    def url(self, name="config.yaml"):
        return "http://127.0.0.1:%d/%s" % (self.port, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
