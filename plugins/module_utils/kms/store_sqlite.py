# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The embedded store: SealedVolumes and Secrets in one SQLite file (the default).

Private to the collection.

* WAL journal, ``synchronous=FULL`` (an acknowledged enrolment survives a power cut:
  losing it would lose the passphrase of a disk that is already encrypted), and a
  busy timeout, so several server processes and the admin tools can share the file.
* SealedVolumes are JSON documents in the CRD shape; the TPM hash is a column with
  an index. Names are primary keys, so a second create of the same name fails with
  AlreadyExists whichever process tries it.
* ``resourceVersion`` is a counter shared by all documents (like etcd's revision),
  bumped in the same transaction as the write; ``update_*`` only succeeds when the
  caller's resourceVersion is still current (optimistic concurrency).
* Secret data is encrypted with AES-256-GCM. The key lives in a key file (default
  ``<db>.key``) created 0600 on first start; the Secret's name is authenticated
  with it, so a ciphertext copied to another row does not decrypt. A check value
  in the database detects a wrong key file at open time. The key is never logged.
* Recovery keys have their own table (``recovery_secrets``, authenticated as ``recovery:<name>``, so a row
  copied into ``secrets`` does not decrypt): the passphrase paths, which read ``secrets`` only, cannot
  return one. Reveals are recorded in ``audit_events``. One file and one key cannot keep the server from
  reading the recovery table: docs/store.md, "Recovery keys", says what does.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import uuid

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store import (
    DEFAULT_NAMESPACE,
    AlreadyExists,
    Conflict,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
    audit_event,
    ensure_private_dir,
    normalize_secret,
    normalize_volume,
    now_rfc3339,
    resource_version,
)

aead = optional_import("cryptography.hazmat.primitives.ciphers.aead")

SCHEMA_VERSION = "1"
KEY_CHECK_PLAINTEXT = b"kcrypt.kairos.io store key check v1"
RECOVERY_DOMAIN = b"recovery:"  # authenticated with a recovery Secret's name: it decrypts only as one

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sealed_volumes (
    name TEXT PRIMARY KEY,
    tpm_hash TEXT NOT NULL,
    resource_version INTEGER NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sealed_volumes_by_tpm_hash ON sealed_volumes (tpm_hash, name);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    resource_version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    type TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recovery_secrets (
    name TEXT PRIMARY KEY,
    resource_version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    type TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
"""


class SQLiteStore(Store):
    def __init__(self, path, key_file=None, namespace=None, busy_timeout=30, create=True):
        require("cryptography", "to encrypt Secrets in the embedded store")
        if not os.path.isabs(path):
            raise StoreError("the SQLite store needs an absolute path, got %r" % path)
        if not create and not os.path.exists(path):
            raise StoreUnavailable("there is no store at %s (check the path; the server or `add` creates it)" % path)
        self.path = path
        self.key_file = key_file or path + ".key"
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.busy_timeout = float(busy_timeout)
        self.url = "sqlite://" + path
        self._local = threading.local()
        self._connections = []
        self._connections_lock = threading.Lock()
        self._create_database_file()
        self._init_schema()
        self._aead = aead.AESGCM(self._load_or_create_key())

    # -- connections -------------------------------------------------------

    def _create_database_file(self):
        ensure_private_dir(self.path)
        try:  # 0600 from the start; SQLite gives -wal/-shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreUnavailable("cannot create the store database %s: %s" % (self.path, exc.strerror))

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # never reuse a connection across fork()
            try:
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = %d" % int(self.busy_timeout * 1000))
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise StoreUnavailable("cannot open the store database %s: %s" % (self.path, exc))
            self._local.conn = conn
            self._local.pid = os.getpid()
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _read(self, sql, args=()):
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable("reading the store %s failed: %s" % (self.path, exc))

    def _write(self, work):
        """Run ``work(conn)`` in one IMMEDIATE transaction (one writer at a time across processes)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailable("the store %s is busy or unavailable: %s" % (self.path, exc))
        try:
            result = work(conn)
            conn.execute("COMMIT")
            return result
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            raise
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StoreUnavailable("writing the store %s failed: %s" % (self.path, exc))
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _next_version(conn):
        conn.execute("INSERT INTO meta (key, value) VALUES ('resource_version', '1') "
                     "ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)")
        return int(conn.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()[0])

    def _init_schema(self):
        def work(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError("the store %s has schema version %s; this version of kairos.kcrypt reads version %s"
                                 % (self.path, row[0], SCHEMA_VERSION))

        self._write(work)

    # -- the encryption key ------------------------------------------------

    def _load_or_create_key(self):
        check = self._read("SELECT value FROM meta WHERE key = 'key_check'")
        if not os.path.exists(self.key_file):
            if check:
                raise StoreError("the key file %s is missing, but the store %s holds Secrets encrypted with it: "
                                 "restore the key file from your backup" % (self.key_file, self.path))
            self._create_key_file()
        key = self._read_key_file()
        cipher = aead.AESGCM(key)
        if not check:
            nonce = os.urandom(12)
            value = base64.b64encode(nonce + cipher.encrypt(nonce, KEY_CHECK_PLAINTEXT, b"key-check")).decode("ascii")
            self._write(lambda conn: conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('key_check', ?)", (value,)))
            check = self._read("SELECT value FROM meta WHERE key = 'key_check'")
        raw = base64.b64decode(check[0][0])
        try:
            cipher.decrypt(raw[:12], raw[12:], b"key-check")
        except Exception:
            raise StoreError("the key file %s does not belong to the store %s (its Secrets cannot be decrypted with it)"
                             % (self.key_file, self.path))
        return key

    def _create_key_file(self):
        """Write a fresh 256-bit key, atomically: the first of several starting processes wins."""
        ensure_private_dir(self.key_file)
        temp = "%s.%d.%s.tmp" % (self.key_file, os.getpid(), uuid.uuid4().hex[:8])
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, base64.b64encode(os.urandom(32)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, self.key_file)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)

    def _read_key_file(self):
        try:
            with open(self.key_file, "rb") as handle:
                key = base64.b64decode(handle.read().strip(), validate=True)
        except (OSError, ValueError) as exc:
            raise StoreError("cannot read the store key file %s: %s" % (self.key_file, getattr(exc, "strerror", None) or "not base64"))
        if len(key) != 32:
            raise StoreError("the store key file %s must hold 32 bytes (base64); it holds %d" % (self.key_file, len(key)))
        return key

    def _encrypt(self, name, data, domain=b"secret:"):
        nonce = os.urandom(12)
        plaintext = json.dumps({k: base64.b64encode(v).decode("ascii") for k, v in data.items()}).encode("utf-8")
        return nonce, self._aead.encrypt(nonce, plaintext, domain + name.encode("utf-8"))

    def _decrypt(self, name, nonce, ciphertext, domain=b"secret:"):
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, domain + name.encode("utf-8"))
        except Exception:
            raise StoreError("Secret %s in %s cannot be decrypted (tampered with, or written with another key)" % (name, self.path))
        return {k: base64.b64decode(v) for k, v in json.loads(plaintext.decode("utf-8")).items()}

    # -- Store interface ---------------------------------------------------

    def ping(self):
        self._read("SELECT 1 FROM meta LIMIT 1")

    def _volume_from_row(self, row):
        doc = json.loads(row[1])
        doc["metadata"]["resourceVersion"] = str(row[0])
        doc["metadata"]["namespace"] = self.namespace
        return doc

    def list_volumes(self):
        return [self._volume_from_row(r) for r in self._read("SELECT resource_version, document FROM sealed_volumes ORDER BY name")]

    def volumes_for(self, tpm_hash):
        rows = self._read("SELECT resource_version, document FROM sealed_volumes WHERE tpm_hash = ? ORDER BY name", (tpm_hash,))
        return [self._volume_from_row(r) for r in rows]

    def get_volume(self, name):
        rows = self._read("SELECT resource_version, document FROM sealed_volumes WHERE name = ?", (name,))
        return self._volume_from_row(rows[0]) if rows else None

    @staticmethod
    def _stored_volume(doc):
        stored = dict(doc)
        stored["metadata"] = {k: v for k, v in doc["metadata"].items() if k not in ("resourceVersion", "namespace")}
        return json.dumps(stored, sort_keys=True)

    def create_volume(self, doc):
        doc = normalize_volume(doc)
        name = doc["metadata"]["name"]
        doc["metadata"].setdefault("uid", str(uuid.uuid4()))
        doc["metadata"]["creationTimestamp"] = now_rfc3339()

        def work(conn):
            version = self._next_version(conn)
            conn.execute("INSERT INTO sealed_volumes (name, tpm_hash, resource_version, document) VALUES (?, ?, ?, ?)",
                         (name, doc["spec"].get("TPMHash", ""), version, self._stored_volume(doc)))
            return version

        try:
            version = self._write(work)
        except sqlite3.IntegrityError:
            raise AlreadyExists("SealedVolume %s already exists" % name)
        doc["metadata"]["resourceVersion"] = str(version)
        doc["metadata"]["namespace"] = self.namespace
        return doc

    def update_volume(self, doc):
        doc = normalize_volume(doc)
        name = doc["metadata"]["name"]
        expected = resource_version(doc)
        if not expected:
            raise Conflict("SealedVolume %s: an update needs the resourceVersion it was read at" % name)

        def work(conn):
            row = conn.execute("SELECT resource_version, document FROM sealed_volumes WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound("SealedVolume %s does not exist" % name)
            if str(row[0]) != expected:
                raise Conflict("SealedVolume %s changed since it was read (resourceVersion %s, now %s)" % (name, expected, row[0]))
            old = json.loads(row[1])["metadata"]
            for key in ("uid", "creationTimestamp"):  # assigned by the store, kept across updates
                if key in old:
                    doc["metadata"][key] = old[key]
            version = self._next_version(conn)
            conn.execute("UPDATE sealed_volumes SET tpm_hash = ?, resource_version = ?, document = ? WHERE name = ?",
                         (doc["spec"].get("TPMHash", ""), version, self._stored_volume(doc), name))
            return version

        version = self._write(work)
        doc["metadata"]["resourceVersion"] = str(version)
        doc["metadata"]["namespace"] = self.namespace
        return doc

    def delete_volume(self, name):
        return self._write(lambda conn: conn.execute("DELETE FROM sealed_volumes WHERE name = ?", (name,)).rowcount) > 0

    def get_secret(self, name):
        rows = self._read("SELECT resource_version, metadata, type, nonce, ciphertext FROM secrets WHERE name = ?", (name,))
        if not rows:
            return None
        version, metadata, kind, nonce, ciphertext = rows[0]
        metadata = json.loads(metadata)
        metadata.update({"name": name, "namespace": self.namespace, "resourceVersion": str(version)})
        return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": kind,
                "data": self._decrypt(name, nonce, ciphertext)}

    @staticmethod
    def _stored_secret_metadata(doc):
        return json.dumps({k: v for k, v in doc["metadata"].items() if k not in ("name", "namespace", "resourceVersion")}, sort_keys=True)

    def create_secret(self, doc):
        doc = normalize_secret(doc)
        name = doc["metadata"]["name"]
        doc["metadata"].setdefault("uid", str(uuid.uuid4()))
        doc["metadata"]["creationTimestamp"] = now_rfc3339()
        nonce, ciphertext = self._encrypt(name, doc["data"])

        def work(conn):
            version = self._next_version(conn)
            conn.execute("INSERT INTO secrets (name, resource_version, metadata, type, nonce, ciphertext) VALUES (?, ?, ?, ?, ?, ?)",
                         (name, version, self._stored_secret_metadata(doc), doc["type"], nonce, ciphertext))
            return version

        try:
            version = self._write(work)
        except sqlite3.IntegrityError:
            raise AlreadyExists("Secret %s already exists" % name)
        doc["metadata"].update({"resourceVersion": str(version), "namespace": self.namespace})
        return doc

    def update_secret(self, doc):
        doc = normalize_secret(doc)
        name = doc["metadata"]["name"]
        expected = resource_version(doc)
        if not expected:
            raise Conflict("Secret %s: an update needs the resourceVersion it was read at" % name)
        nonce, ciphertext = self._encrypt(name, doc["data"])

        def work(conn):
            row = conn.execute("SELECT resource_version, metadata FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound("Secret %s does not exist" % name)
            if str(row[0]) != expected:
                raise Conflict("Secret %s changed since it was read" % name)
            old = json.loads(row[1])
            for key in ("uid", "creationTimestamp"):
                if key in old:
                    doc["metadata"][key] = old[key]
            version = self._next_version(conn)
            conn.execute("UPDATE secrets SET resource_version = ?, metadata = ?, type = ?, nonce = ?, ciphertext = ? WHERE name = ?",
                         (version, self._stored_secret_metadata(doc), doc["type"], nonce, ciphertext, name))
            return version

        version = self._write(work)
        doc["metadata"].update({"resourceVersion": str(version), "namespace": self.namespace})
        return doc

    def delete_secret(self, name):
        return self._write(lambda conn: conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount) > 0

    def put_recovery_secret(self, doc):
        doc = normalize_secret(doc)
        name = doc["metadata"]["name"]
        doc["metadata"]["creationTimestamp"] = now_rfc3339()
        nonce, ciphertext = self._encrypt(name, doc["data"], RECOVERY_DOMAIN)

        def work(conn):
            conn.execute("INSERT INTO recovery_secrets (name, resource_version, metadata, type, nonce, ciphertext) "
                         "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET resource_version = excluded.resource_version, "
                         "metadata = excluded.metadata, type = excluded.type, nonce = excluded.nonce, ciphertext = excluded.ciphertext",
                         (name, self._next_version(conn), self._stored_secret_metadata(doc), doc["type"], nonce, ciphertext))

        self._write(work)

    def get_recovery_secret(self, name):
        rows = self._read("SELECT resource_version, metadata, type, nonce, ciphertext FROM recovery_secrets WHERE name = ?", (name,))
        if not rows:
            return None
        version, metadata, kind, nonce, ciphertext = rows[0]
        metadata = json.loads(metadata)
        metadata.update({"name": name, "namespace": self.namespace, "resourceVersion": str(version)})
        return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": kind,
                "data": self._decrypt(name, nonce, ciphertext, RECOVERY_DOMAIN)}

    def record_audit_event(self, event):
        event = audit_event(**event)
        self._write(lambda conn: conn.execute("INSERT INTO audit_events (event) VALUES (?)", (json.dumps(event, sort_keys=True),)))
        return event

    def audit_events(self):
        return [json.loads(row[0]) for row in self._read("SELECT event FROM audit_events ORDER BY id")]

    def close(self):
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections = []
        self._local = threading.local()
