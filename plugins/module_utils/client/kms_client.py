# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Node side of both Kairos protocols: fetch a partition passphrase from a challenger.

Private to the collection. Used by the kairos_luks_* modules, the
``kcrypt-discovery-challenger`` CLI and the VM tests. The contract
(docs/developing.md, "Client"):

    passphrase = get_passphrase(ClientConfig("https://kms:8082", certificate=PEM), PartitionRef(label="COS_PERSISTENT"))

Behaviour follows upstream's clients (spec §2.A "Client behaviour", §2.B):

* newest protocol: one transient AK per call, reused across attempts; 30 attempts
  1 s apart; a fresh WebSocket per attempt (10 s dial timeout); a KMS ``error``
  answer ends the call with ``AttestationRejected`` ("attestation failed: ...",
  never retried); PCRs 0, 7, 11 of the SHA-256 bank are quoted. Unlike upstream
  HEAD the quote is bound to the activation secret (upstream's pending fix,
  §2.A.2): servers that do not check the qualifying data ignore it, servers
  that do require it, so there is nothing to negotiate. The init also carries
  the EK certificate and the CA certificates the TPM keeps in NV
  (``ek_certificate``, ``ek_chain``), which upstream servers ignore;
* legacy protocol: ``/getPass`` with the Bearer TPM token; ``generated_by: tpm``
  passphrases are decrypted by the TPM key at ``c_index``; ``No secret found
  for`` makes the node generate a passphrase, encrypt it to that key and post it
  to ``/postPass``, then fetch it back;
* ``challenger_server`` may end in slashes (stripped, checklist 5); ``certificate``
  is PEM text added to the system trust store (checklist 38). A certificate the
  trust store cannot verify fails at once, with Go's wording
  (``x509: certificate signed by unknown authority``) in the message;
* ``mdns``: the ``.local`` host is resolved with mdns.resolve_url and dialled as
  ``ip:port`` with the original ``Host`` header (spec §7);
* a busy KMS (HTTP 503 before the upgrade, e.g. at its ``max_connections``) is
  retried after its ``Retry-After`` (at most 10 s) instead of ``retry_delay``,
  stretched by a random 0-50 % so a fleet refused at one moment does not come
  back at one moment. It still counts as an attempt: a call stays bounded.

``escrow_recovery_key`` stores a partition's recovery key in a kairos.kcrypt KMS (``/recovery-escrow``,
ours): the newest protocol's messages 1-3, the proof carrying the key, with the same retries.
"""

from __future__ import annotations

import dataclasses
import random
import socket
import ssl
import time
from dataclasses import dataclass

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError
from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns, messages
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm import blob
from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import DEFAULT_C_INDEX, DEFAULT_TPM_LAYOUT, TPM

websocket = optional_import("websocket")

PROTOCOL_ATTESTATION = "attestation"
PROTOCOL_LEGACY = "legacy"
CLIENT_PROTOCOLS = (PROTOCOL_ATTESTATION, PROTOCOL_LEGACY)
DIAL_TIMEOUT = 10.0  # upstream abandons the WebSocket dial after 10 s
UNKNOWN_AUTHORITY = "x509: certificate signed by unknown authority"
MAX_LEGACY_GENERATIONS = 3  # upstream resets its attempt counter after every post; we bound it
MAX_RETRY_AFTER = 10.0  # seconds: a KMS (or a proxy in front of it) cannot park a booting node for long
RETRY_JITTER = 0.5  # a busy KMS's Retry-After is stretched by up to 50 %, so refused nodes come back spread out
# OpenSSL verify codes meaning "no trusted issuer", which Go reports as an unknown authority.
# 7 (signature failure): a trusted CA with the issuer's name did not sign it (e.g. a CA re-made
# under the same name); Go's chain building reports that as an unknown authority too.
_UNKNOWN_ISSUER_CODES = (2, 7, 18, 19, 20, 21)


class AttestationRejected(KcryptError):
    """The KMS refused this TPM (quarantine, PCR/EK mismatch, unknown TPM...). Never retried."""


class KmsBusy(KcryptError):
    """The KMS answered 503 before the upgrade: retried after ``retry_after`` seconds (its Retry-After)."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value):
    """A Retry-After header as seconds within [0, MAX_RETRY_AFTER]; None for a missing or unusable value
    (an HTTP date, which a KMS does not send, is treated as missing)."""
    text = str(value or "").strip()
    if not text.isdigit() or len(text) > 6:
        return None
    return min(float(text), MAX_RETRY_AFTER)


class _Fatal(KcryptError):
    """An error retrying cannot fix (the KMS certificate is not trusted, the config is wrong)."""


@dataclass
class ClientConfig:
    challenger_server: str = ""
    certificate: str = ""  # an extra CA, added to the system trust store: PEM text, or the path of a PEM file
    mdns: bool = False
    tpm_device: str = ""
    c_index: int = DEFAULT_C_INDEX
    tpm_layout: str = DEFAULT_TPM_LAYOUT  # how the key at c_index is created if absent (legacy generated keys)
    attempts: int = 30
    retry_delay: float = 1.0
    protocol: str = PROTOCOL_ATTESTATION
    defer_pcr_enrollment: bool = False
    timeout: float = 30.0  # seconds to wait for each KMS message
    mdns_interfaces: object = None  # None: mdns module default ($KCRYPT_MDNS_INTERFACES, else every interface); names or IPv4 addresses
    mdns_timeout: float = 15.0

    def validate(self):
        if not self.challenger_server:
            raise _Fatal("challenger_server is empty: set kcrypt.challenger.challenger_server to the KMS URL, e.g. http://kms.example:8082")
        scheme = self.challenger_server.split("://", 1)[0].lower() if "://" in self.challenger_server else ""
        if scheme not in ("http", "https", "ws", "wss"):
            raise _Fatal("challenger_server %r must start with http:// or https://" % self.challenger_server)
        if self.protocol not in CLIENT_PROTOCOLS:
            raise _Fatal("protocol must be one of %s, not %r" % (", ".join(CLIENT_PROTOCOLS), self.protocol))
        if int(self.attempts) < 1:
            raise _Fatal("attempts must be at least 1")
        if self.mdns:  # upstream checks the name before anything else
            mdns.check_local(mdns.url_host(self.challenger_server))


def certificate_pem(value):
    """The PEM text of ``certificate``: PEM as is (upstream), or read from a file path (our convenience)."""
    value = value or ""
    if not value.strip() or "-----BEGIN" in value:
        return value
    path = value.strip()
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise KcryptError(
            "certificate must be PEM text (-----BEGIN CERTIFICATE-----...) or the path of a PEM file; "
            "cannot read %s: %s" % (path, getattr(error, "strerror", None) or error)
        ) from None
    if "-----BEGIN" not in text:
        raise KcryptError("certificate file %s holds no PEM data" % path)
    return text


def _logger(log):
    if log is None:
        return lambda message: None
    if hasattr(log, "debug"):
        return log.debug
    return log


def endpoint_url(server, path):
    """Upstream's attestationEndpointURL: trailing slashes stripped, first ``http`` → ``ws``."""
    base = server.rstrip("/")
    return base.replace("http", "ws", 1) + path


def _close_reason(data):
    if len(data) >= 2:
        code = int.from_bytes(data[:2], "big")
        reason = data[2:].decode("utf-8", "replace")
        return "code %d%s" % (code, (": " + reason) if reason else "")
    return "no close code"


class _KmsExchange:
    """Connection handling shared by both protocols: URL, TLS, mDNS, timeouts, error wording."""

    def __init__(self, config, partition, log):
        self.config = config
        self.partition = partition
        self.log = log
        self._resolved = None  # (base URL, extra headers) once mDNS answered
        self._tls = None

    def _base(self):
        server = self.config.challenger_server.rstrip("/")
        if not self.config.mdns:
            return server, {}
        if self._resolved is None:
            try:
                url, headers = mdns.resolve_url(server, timeout=self.config.mdns_timeout,
                                                interfaces=self.config.mdns_interfaces, log=self.log)
            except mdns.MDNSError as error:
                raise _Fatal(str(error)) from None  # upstream: a hard error, resolved once, never retried
            self.log("mDNS: %s is %s" % (server, url))
            self._resolved = (url, headers)
        return self._resolved

    def _tls_context(self):
        if self._tls is None:
            context = ssl.create_default_context()
            if self.config.certificate:
                try:
                    context.load_verify_locations(cadata=self.config.certificate)
                except (ssl.SSLError, ValueError) as error:
                    raise _Fatal("certificate is not a PEM CA certificate: %s" % error) from None
            self._tls = context
        return self._tls

    def connect(self, path, extra_headers=None):
        require("websocket", "to talk to the KMS")
        base, mdns_headers = self._base()
        url = endpoint_url(base, path)
        headers = ["%s: %s" % item for item in self.partition.headers().items()]
        headers += ["%s: %s" % item for item in (extra_headers or {}).items()]
        options = {"header": headers, "timeout": DIAL_TIMEOUT, "suppress_origin": True}
        if mdns_headers.get("Host"):
            options["host"] = mdns_headers["Host"]
        sslopt = {"context": self._tls_context()} if url.startswith("wss") else None
        ws = websocket.WebSocket(sslopt=sslopt, enable_multithread=False, skip_utf8_validation=True)
        try:
            ws.connect(url, **options)
        except ssl.SSLCertVerificationError as error:
            ws.close()
            raise _Fatal(self._certificate_error(url, error)) from None
        except websocket.WebSocketBadStatusException as error:
            ws.close()
            said = _short_text(getattr(error, "resp_body", None))  # e.g. why a KMS disabled this protocol
            if error.status_code == 404 and path == messages.RECOVERY_ESCROW_PATH:
                raise _Fatal("%s answers 404%s: this KMS cannot escrow recovery keys (it is not a kairos.kcrypt challenger, "
                             "an older one, or one that does not serve the attestation protocol); keep the recovery key on "
                             "the controller (recovery_escrow=controller)" % (url, ' "%s"' % said if said else "")) from None
            if error.status_code == 503:  # busy (max_connections): no work was done, come back later
                headers = getattr(error, "resp_headers", None) or {}
                retry_after = retry_after_seconds(headers.get("retry-after"))
                raise KmsBusy("the KMS at %s is busy: HTTP 503%s" % (url, ' "%s"' % said if said else ""),
                              retry_after) from None
            hint = "is challenger_server the KMS origin, without a path?"
            if error.status_code == 404:  # the two protocol generations do not negotiate (checklist 50)
                hint += (" A KMS of the other protocol generation answers 404 too: set protocol to %s"
                         % ("legacy for Kairos <= v0.11 KMS" if path == messages.ATTESTATION_PATH else "attestation for a v0.12+ KMS"))
            raise KcryptError("bad handshake with %s: HTTP %s%s (%s)" % (url, error.status_code, ' "%s"' % said if said else "",
                                                                         hint)) from None
        except (websocket.WebSocketException, OSError) as error:
            ws.close()
            raise KcryptError("cannot connect to %s: %s" % (url, error or type(error).__name__)) from None
        ws.settimeout(self.config.timeout)
        self.log("connected to %s" % url)
        return ws

    @staticmethod
    def _certificate_error(url, error):
        detail = getattr(error, "verify_message", "") or str(error)
        if getattr(error, "verify_code", None) in _UNKNOWN_ISSUER_CODES:
            return "%s: %s (%s); set kcrypt.challenger.certificate to the PEM of the CA that signed the KMS certificate" % (
                url, UNKNOWN_AUTHORITY, detail)
        return "%s: x509: the KMS certificate is not valid: %s" % (url, detail)

    def receive(self, ws, what):
        """The next data frame, or KcryptError naming what was expected."""
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=True)
                if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    return data
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise KcryptError("the KMS closed the connection instead of sending the %s (%s)" % (what, _close_reason(data)))
                if opcode == websocket.ABNF.OPCODE_PING:
                    ws.pong(data)
        except websocket.WebSocketTimeoutException:
            raise KcryptError("no %s from the KMS within %gs" % (what, self.config.timeout)) from None
        except (websocket.WebSocketConnectionClosedException, socket.error) as error:
            raise KcryptError("the connection to the KMS broke while waiting for the %s: %s" % (what, error or "closed")) from None
        except websocket.WebSocketException as error:
            raise KcryptError("reading the %s from the KMS failed: %s" % (what, error)) from None

    def send(self, ws, data, what):
        try:
            if isinstance(data, bytes):
                ws.send_binary(data)
            else:
                ws.send(data)
        except (websocket.WebSocketException, OSError) as error:
            raise KcryptError("sending the %s to the KMS failed: %s" % (what, error or type(error).__name__)) from None


def _short_text(body, limit=300):
    """The first line of an HTTP error body, printable and bounded, for an error message ("" if none)."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= limit else line[:limit] + "..."


def retry_pause(config, error):
    """Seconds to wait before the next attempt: ``retry_delay``, or a busy KMS's Retry-After with jitter."""
    if not isinstance(error, KmsBusy):
        return config.retry_delay
    return max(error.retry_after or 0.0, config.retry_delay) * (1 + RETRY_JITTER * random.random())  # nosec: jitter, not crypto


def _retry(config, attempt, log, describe, failed="no passphrase for"):
    """Call ``attempt()`` up to ``config.attempts`` times; AttestationRejected and _Fatal end at once."""
    last = None
    for number in range(1, int(config.attempts) + 1):
        try:
            return attempt()
        except AttestationRejected:
            raise
        except _Fatal as error:
            raise KcryptError(str(error)) from None
        except KcryptError as error:
            last = error
            log("attempt %d/%d failed: %s" % (number, config.attempts, error))
        if number < int(config.attempts):
            pause = retry_pause(config, last)
            if isinstance(last, KmsBusy):
                log("the KMS asked to retry after %s s; waiting %.1f s" % (
                    "?" if last.retry_after is None else "%g" % last.retry_after, pause))
            time.sleep(pause)
    raise KcryptError("%s %s from %s after %d attempts; last error: %s"
                      % (failed, describe, config.challenger_server, config.attempts, last))


class _Attestation(_KmsExchange):
    """Newest protocol (spec §2.A)."""

    def __init__(self, config, partition, log, tpm):
        super().__init__(config, partition, log)
        self.tpm = tpm
        ek = tpm.endorsement_key()
        # Our addition to the init (upstream servers ignore it): the EK certificate and its CAs from NV, so a
        # KMS that admits only genuine TPMs can check the manufacturer's signature.
        chain = tpm.ek_certificate_chain() if ek.certificate is not None else ()
        self.ak = tpm.create_ak()  # one transient AK per call, reused by every attempt
        params = messages.AttestationParameters.from_attestation_key(self.ak)
        self.init = messages.write_json(messages.init_message(
            ek.spki_der, params, config.defer_pcr_enrollment, ek_certificate=ek.certificate_der, ek_chain=chain))
        log("TPM hash %s, %s, transient AK created" % (
            ek.tpm_hash, "EK certificate and %d CA certificate(s) from NV" % len(chain) if ek.certificate is not None
            else "no EK certificate"))

    def _exchange(self, path, proof_message, parse_response):
        """Messages 1 to 4 on ``path``: ``proof_message(secret, pcr_quote)`` makes message 3, ``parse_response`` reads 4."""
        ws = self.connect(path)
        try:
            self.send(ws, self.init, "attestation init")
            challenge = messages.load_json_object(self.receive(ws, "challenge"), "attestation.AttestationChallenge")
            try:
                credential = messages.parse_challenge(challenge)
            except messages.ProtocolError as error:
                raise KcryptError("handling challenge: %s" % error) from None
            secret = self.tpm.activate_credential(self.ak, credential.credential, credential.secret)
            quote, signature = self.tpm.quote(self.ak, messages.QUOTE_PCRS, qualifying_data=secret)
            pcrs = self.tpm.pcr_read(messages.QUOTE_PCRS)
            pcr_quote = messages.PCRQuote(messages.QUOTE_VERSION, quote, signature, pcrs)
            self.send(ws, messages.write_json(proof_message(secret, pcr_quote)), "proof")
            return parse_response(messages.load_json_object(self.receive(ws, "response"), "attestation.AttestationResponse"))
        except messages.ProtocolError as error:
            raise KcryptError("the KMS sent a malformed message: %s" % error) from None
        finally:
            ws.close()

    def attempt(self):
        passphrase, error = self._exchange(messages.ATTESTATION_PATH, messages.proof_message, messages.parse_response)
        if error:
            raise AttestationRejected("attestation failed: %s" % error)
        if not passphrase:
            raise KcryptError("server returned empty passphrase without error message")
        return passphrase


class _Escrow(_Attestation):
    """``/recovery-escrow``: the newest protocol's proof, carrying the recovery key of the partition."""

    def __init__(self, config, partition, log, tpm, recovery_key):
        super().__init__(config, partition, log, tpm)
        self.recovery_key = recovery_key

    def attempt(self):
        error = self._exchange(messages.RECOVERY_ESCROW_PATH,
                               lambda secret, pcr_quote: messages.escrow_message(secret, pcr_quote, self.recovery_key),
                               messages.parse_escrow_response)
        if error:
            raise AttestationRejected("the KMS refused to escrow the recovery key: %s" % error)
        return True


class _Legacy(_KmsExchange):
    """Legacy protocol (spec §2.B): /getPass, and /postPass for TPM-encrypted generated keys."""

    def __init__(self, config, partition, log, tpm):
        super().__init__(config, partition, log)
        self.tpm = tpm
        ek = tpm.endorsement_key()
        self.ak = tpm.create_ak()
        params = messages.AttestationParameters.from_attestation_key(self.ak)
        # Upstream sends the EK certificate's PEM when the TPM has one, else the public key's.
        self.token = messages.legacy_token(ek.certificate_pem or ek.public_pem, params)
        self.generations = 0
        log("TPM hash %s, legacy protocol" % ek.tpm_hash)

    def _authenticated(self, path):
        ws = self.connect(path, {"Authorization": self.token})
        try:
            frame = self.receive(ws, "TPM challenge")
            try:
                credential = messages.parse_legacy_challenge(frame)
            except messages.ProtocolError as error:
                raise KcryptError(str(error)) from None
            secret = self.tpm.activate_credential(self.ak, credential.credential, credential.secret)
            self.send(ws, messages.legacy_answer(secret), "challenge response")
        except BaseException:
            ws.close()
            raise
        return ws

    def _get(self):
        ws = self._authenticated(messages.GET_PASS_PATH)
        try:
            return messages.parse_legacy_payload(self.receive(ws, "passphrase"))
        except messages.ProtocolError as error:
            raise KcryptError("the KMS sent a malformed payload: %s" % error) from None
        finally:
            ws.close()

    def _post(self):
        """Generate a passphrase, encrypt it to the TPM key at c_index and store it on the KMS."""
        encrypted = blob.encrypt_blob(self.tpm, blob.new_tpm_passphrase(), self.config.c_index, self.config.tpm_layout)
        ws = self._authenticated(messages.POST_PASS_PATH)
        try:
            payload = {"passphrase": messages.b64url_encode(encrypted), "error": "", "generated_by": messages.GENERATED_BY_TPM}
            self.send(ws, messages.write_json(payload), "passphrase")
            # Upstream's server answers only on failure; wait for its close to learn which.
            try:
                answer = messages.parse_legacy_payload(self.receive(ws, "post result"))
            except KcryptError:  # also ProtocolError: no error payload came back
                return  # closed without an error: stored (or an existing secret was kept)
            if answer["error"]:
                raise KcryptError("the KMS did not store the generated passphrase: %s" % answer["error"])
        finally:
            ws.close()

    def attempt(self):
        payload = self._get()
        if payload["passphrase"]:
            if payload["generated_by"] == messages.GENERATED_BY_TPM:
                try:
                    encrypted = messages.b64url_decode(payload["passphrase"])
                except messages.ProtocolError as error:
                    raise AttestationRejected(str(error)) from None
                return blob.decrypt_blob(self.tpm, encrypted, self.config.c_index)
            return payload["passphrase"].encode("utf-8")
        error = payload["error"]
        if messages.NO_SECRET_FOUND in error:
            self.generations += 1
            if self.generations > MAX_LEGACY_GENERATIONS:
                raise _Fatal("the KMS keeps answering %r after %d posted passphrases" % (error, MAX_LEGACY_GENERATIONS))
            self.log("no passphrase stored for this partition yet: generating one")
            self._post()
            return self.attempt()
        if UNKNOWN_AUTHORITY in error:
            raise _Fatal(error)
        raise KcryptError(error or "the KMS returned neither a passphrase nor an error")


def _prepared(config):
    try:
        config.validate()
    except _Fatal as error:
        raise KcryptError(str(error)) from None
    return dataclasses.replace(config, certificate=certificate_pem(config.certificate))


def escrow_recovery_key(config, partition, recovery_key, log=None):
    """Store ``recovery_key`` (bytes) for ``partition`` in the kairos.kcrypt KMS of ``config``.

    The KMS keeps it for administrators and never serves it to a node. Raises AttestationRejected
    when the KMS refuses (not retried), KcryptError when every attempt failed or the KMS has no escrow.
    """
    if not messages.MIN_RECOVERY_KEY_SIZE <= len(recovery_key) <= messages.MAX_RECOVERY_KEY_SIZE:
        raise KcryptError("a recovery key must be %d to %d bytes" % (messages.MIN_RECOVERY_KEY_SIZE, messages.MAX_RECOVERY_KEY_SIZE))
    log = _logger(log)
    config = _prepared(config)
    with TPM(config.tpm_device) as tpm:
        exchange = _Escrow(config, partition, log, tpm, recovery_key)
        return _retry(config, exchange.attempt, log, partition.describe(), failed="could not escrow the recovery key of")


def get_passphrase(config, partition, log=None):
    """The passphrase bytes for ``partition`` (a PartitionRef) from the KMS in ``config``.

    Raises AttestationRejected when the KMS refuses (not retried), KcryptError
    when every attempt failed (the message says why the last one did).
    """
    log = _logger(log)
    config = _prepared(config)
    with TPM(config.tpm_device) as tpm:
        exchange = (_Legacy if config.protocol == PROTOCOL_LEGACY else _Attestation)(config, partition, log, tpm)
        return _retry(config, exchange.attempt, log, partition.describe())
