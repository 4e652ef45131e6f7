# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What only the embedded store has: the key file, encryption at rest, files shared by processes."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st, store_factory
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore

SECRET = b"correct horse battery staple 0123456789"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_private_and_wal(tmp_path):
    path = str(tmp_path / "sub" / "kms.db")
    with SQLiteStore(path) as store:
        store.create_secret(st.new_secret("s", {"passphrase": SECRET}))
        assert mode(path) == 0o600 and mode(path + ".key") == 0o600
        assert mode(str(tmp_path / "sub")) == 0o700
        assert store._read("PRAGMA journal_mode")[0][0] == "wal"
        assert os.path.exists(path + "-wal") and mode(path + "-wal") == 0o600


def test_secrets_are_encrypted_at_rest(tmp_path):
    path = str(tmp_path / "kms.db")
    with SQLiteStore(path) as store:
        store.create_secret(st.new_secret("s", {"passphrase": SECRET}))
        store.create_volume(st.new_volume("v", "a" * 64, [{"label": "COS_PERSISTENT"}]))
    raw = b""
    for name in os.listdir(str(tmp_path)):
        with open(str(tmp_path / name), "rb") as handle:
            raw += handle.read()
    assert SECRET not in raw
    assert b"a" * 64 in raw  # the volume is plain JSON (not secret), so the check above means something


def test_key_file_option_and_reopen(tmp_path):
    path, key = str(tmp_path / "kms.db"), str(tmp_path / "keys" / "kms.key")
    with SQLiteStore(path, key_file=key) as store:
        store.create_secret(st.new_secret("s", {"passphrase": SECRET}))
    assert os.path.exists(key) and not os.path.exists(path + ".key")
    with SQLiteStore(path, key_file=key) as store:
        assert store.get_secret("s")["data"]["passphrase"] == SECRET


def test_wrong_key_file_is_detected_at_open(tmp_path):
    path = str(tmp_path / "kms.db")
    SQLiteStore(path).close()
    SQLiteStore(str(tmp_path / "other.db")).close()
    with pytest.raises(st.StoreError, match="does not belong to the store"):
        SQLiteStore(path, key_file=str(tmp_path / "other.db.key"))


def test_missing_key_file_is_not_replaced(tmp_path):
    path = str(tmp_path / "kms.db")
    SQLiteStore(path).close()
    os.rename(path + ".key", path + ".key.bak")
    with pytest.raises(st.StoreError, match="key file .* is missing.*restore"):
        SQLiteStore(path)
    assert not os.path.exists(path + ".key")


def test_a_ciphertext_moved_to_another_name_does_not_decrypt(tmp_path):
    path = str(tmp_path / "kms.db")
    with SQLiteStore(path) as store:
        store.create_secret(st.new_secret("victim", {"passphrase": SECRET}))
        store.create_secret(st.new_secret("attacker", {"passphrase": b"x"}))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE secrets SET nonce = (SELECT nonce FROM secrets WHERE name = 'victim'), "
                 "ciphertext = (SELECT ciphertext FROM secrets WHERE name = 'victim') WHERE name = 'attacker'")
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store:
        with pytest.raises(st.StoreError, match="cannot be decrypted"):
            store.get_secret("attacker")
        assert store.get_secret("victim")["data"]["passphrase"] == SECRET


def test_relative_path_and_bad_urls_are_refused(tmp_path):
    with pytest.raises(st.StoreError, match="absolute"):
        store_factory.open_store("sqlite://relative/kms.db")
    with pytest.raises(st.StoreError, match="unsupported store URL"):
        store_factory.open_store("mysql://db")
    assert store_factory.parse_store_url("sqlite:///var/lib/k/kms.db?key_file=/etc/k.key") == ("sqlite", "/var/lib/k/kms.db", {"key_file": "/etc/k.key"})
    assert store_factory.parse_store_url("/var/lib/k/kms.db")[0] == "sqlite"
    assert store_factory.parse_store_url("kubernetes://?namespace=ns&context=c") == ("kubernetes", "", {"namespace": "ns", "context": "c"})


CONTENDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import _checkout
_checkout.setup()
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.store_sqlite import SQLiteStore
from ansible_collections.kairos.kcrypt.plugins.module_utils.kms import store as st
s = SQLiteStore(sys.argv[2])
won = 0
for i in range(int(sys.argv[3])):
    try:
        s.create_secret(st.new_secret("n%d" % i, {"passphrase": sys.argv[4].encode()}))
        won += 1
    except st.AlreadyExists:
        pass
print(won)
"""


def test_processes_starting_together_share_one_key_and_never_double_create(tmp_path, repo_root):
    path = str(tmp_path / "kms.db")
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, os.path.join(repo_root, "bin"), path, "150", "p%d" % i],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outputs]
    assert sum(int(o[0]) for o in outputs) == 150  # every name created exactly once
    with SQLiteStore(path) as store:
        assert all(store.get_secret("n%d" % i) for i in range(150))  # all readable with the one key file
    assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")] == []
