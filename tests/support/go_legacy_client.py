# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A legacy Kairos node's view of /getPass and /postPass: tpm-helpers' ``Connection`` and ``Get``, step by step.

Read from kairos-io/tpm-helpers ``get.go`` at e914e08 (the legacy API; v0.11.4 pins f7a3fcc of the same
code) with the gorilla/websocket calls it makes:

1. dial with the ``Authorization: Bearer TPM…`` header; a refused handshake is an error
   (``… (Status: 503 Service Unavailable)``);
2. ``conn.NextReader()``: the next data frame, text or binary (gorilla answers pings and turns a close
   frame or a dropped connection into an error) → ``reading challenge: <error>``;
3. ``json.NewDecoder(msg).Decode(&challenge)`` into ``Challenge{EC *attest.EncryptedCredential}``: the
   first JSON value of the frame; field names match case-insensitively; unknown fields are ignored;
   ``EC`` stays nil when absent or null → ``unmarshaling Challenge: <error>`` for malformed JSON;
4. ``getChallengeResponse(c, challenge.EC, …)`` calls ``aik.ActivateCredential(tpm, *ec)``: with a nil
   ``EC`` that is a nil pointer dereference, i.e. a **panic** of the node's process, not an error;
5. the answer is written as one binary frame (``json.NewEncoder``: JSON and a newline);
6. ``Get`` then reads one more frame, the payload → ``reading payload from tpm get: <error>``.

Errors are returned as GoError with gorilla's wording; step 4's panic is raised as GoPanic, which a test
must never see.
"""

from __future__ import annotations

import json

import websocket

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import messages as protocol

GORILLA_CLOSE_TEXT = {1000: "normal", 1002: "protocol error", 1006: "abnormal closure", 1008: "policy violation",
                      1009: "message too big", 1011: "internal server error"}


class GoError(Exception):
    """An error the Go client returns (and retries)."""


class GoPanic(Exception):
    """The Go client would have crashed: the node process dies instead of retrying."""


def _next_reader(ws):
    """gorilla ``NextReader``: the next text or binary frame's data; control frames handled, close → error."""
    while True:
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            raise GoError("websocket: close 1006 (abnormal closure): unexpected EOF") from None
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return data
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
            reason = data[2:].decode("utf-8", "replace")
            raise GoError("websocket: close %d (%s)%s" % (code, GORILLA_CLOSE_TEXT.get(code, "?"), (": " + reason) if reason else ""))
        # ping (websocket-client has answered it, as gorilla's default handler does) or pong: keep reading


def _decode_challenge(data):
    """``json.NewDecoder(msg).Decode(&Challenge{})``: the EC object, or None when Go leaves it nil."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    try:
        value, _end = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError as error:
        raise GoError("unmarshaling Challenge: %s" % error) from None
    if value is None:
        return None  # decoding null into a struct leaves it zero
    if not isinstance(value, dict):
        raise GoError("unmarshaling Challenge: json: cannot unmarshal %s into Go value of type tpm.Challenge" % type(value).__name__)
    for key, field in value.items():
        if key.lower() == "ec":
            return field
    return None


def connection(url, token, headers=None, activate=None, timeout=10):
    """tpm-helpers ``Connection``: dial, read the challenge, answer it. Returns the open WebSocket.

    ``activate(ec_dict)`` plays the TPM's ActivateCredential and returns the answer frame's bytes.
    """
    header = ["Authorization: %s" % token] + ["%s: %s" % item for item in (headers or {}).items()]
    try:
        ws = websocket.create_connection(url, header=header, timeout=timeout, suppress_origin=True)
    except websocket.WebSocketBadStatusException as error:
        raise GoError("websocket: bad handshake (Status: %s)" % error.status_code) from None
    try:
        try:
            frame = _next_reader(ws)
        except GoError as error:
            raise GoError("reading challenge: %s" % error) from None
        ec = _decode_challenge(frame)
        if ec is None:
            raise GoPanic("runtime error: invalid memory address or nil pointer dereference "
                          "(ActivateCredential(*challenge.EC) with the frame %r)" % bytes(frame)[:200])
        ws.send_binary(activate(ec))
    except BaseException:
        ws.close()
        raise
    return ws


def get(url, token, headers=None, activate=None, timeout=10):
    """tpm-helpers ``Get``: ``Connection``, then the payload frame (bytes)."""
    ws = connection(url, token, headers, activate, timeout)
    try:
        try:
            return _next_reader(ws)
        except GoError as error:
            raise GoError("reading payload from tpm get: %s" % error) from None
    finally:
        ws.close()


def soft_tpm_activation(soft_tpm):
    """``activate`` for a SoftTPM: the answer frame tpm-helpers writes for this challenge."""

    def activate(ec):
        credential = protocol.EncryptedCredential.from_json(ec)
        return protocol.legacy_answer(soft_tpm.activate_credential(credential.credential, credential.secret))

    return activate
