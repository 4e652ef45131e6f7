# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""WebSocket and HTTP on a bare socket, byte by byte (RFC 6455), for tests that send what no library would:
unmasked frames, bytes pipelined behind the handshake, malformed requests, floods of pings.

Nothing here is clever: it writes exactly the bytes it is given and reads frames as RFC 6455 §5.2 lays
them out, so a test sees what the server really sent.
"""

from __future__ import annotations

import base64
import os
import socket
import struct

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode, payload=b"", masked=True, fin=True, rsv=0, mask=None):
    """One frame: FIN, RSV bits, opcode, length, optional masking key, (masked) payload."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, (0x80 if masked else 0) | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, (0x80 if masked else 0) | 126, length)
    else:
        header = struct.pack("!BBQ", first, (0x80 if masked else 0) | 127, length)
    if not masked:
        return header + payload
    mask = mask or os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_request(path="/tpm-attestation", headers=None, key=None, host="127.0.0.1"):
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: %s" % key, "Sec-WebSocket-Version: 13"]
    lines += ["%s: %s" % item for item in (headers or {"label": "COS_PERSISTENT", "name": "", "uuid": ""}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class RawSocket:
    """A TCP connection with a read buffer: HTTP responses and WebSocket frames as the server wrote them."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0, source=None):
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.buffer = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, size):
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection (%d bytes buffered)" % len(self.buffer))
            self.buffer += chunk

    def _take(self, size):
        self._fill(size)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_http(self):
        """(status, {lower-case header: value}, body) of one response (body by Content-Length, else until EOF)."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection before an HTTP response (%r)" % self.buffer[:200])
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, dummy, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 101:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        body = self.buffer
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        self.buffer = b""
        return status, headers, body

    def upgrade(self, path="/tpm-attestation", headers=None, key=None, pipelined=b""):
        """Send the opening handshake (plus ``pipelined`` bytes in the same write); returns the response."""
        self.send(upgrade_request(path, headers, key) + pipelined)
        return self.read_http()

    def read_frame(self):
        """(opcode, payload) of the next frame; server frames are never masked."""
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._take(8))
        if second & 0x80:
            raise AssertionError("the server masked a frame (RFC 6455 5.1 forbids it)")
        return first & 0x0F, self._take(length)

    def read_until_close(self):
        """Frames up to and including the close frame: [(opcode, payload)], or the frames read before EOF."""
        frames = []
        try:
            while True:
                opcode, payload = self.read_frame()
                frames.append((opcode, payload))
                if opcode == OP_CLOSE:
                    return frames
        except (EOFError, ConnectionError, socket.timeout):
            return frames

    def closed_by_server(self, timeout=10.0):
        """True once the server closes the TCP connection (EOF or reset) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionError:
            return True
        except socket.timeout:
            return False


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
