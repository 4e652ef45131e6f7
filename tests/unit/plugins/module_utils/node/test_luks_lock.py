# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""In-place encryptions of devices sharing a LUKS UUID take turns (cryptsetup would refuse the second)."""

from __future__ import annotations

import threading
import time

from ansible_collections.kairos.kcrypt.plugins.module_utils.node import luks


def test_same_uuid_waits_other_uuid_does_not(monkeypatch, tmp_path):
    monkeypatch.setattr(luks, "REENCRYPT_LOCK_DIR", str(tmp_path))
    events = []

    def second(uuid, name):
        with luks.reencryption_lock(uuid):
            events.append(name)

    with luks.reencryption_lock("1234-uuid"):
        same = threading.Thread(target=second, args=("1234-uuid", "same"))
        other = threading.Thread(target=second, args=("5678-uuid", "other"))
        same.start()
        other.start()
        other.join(5)
        time.sleep(0.3)
        # a different UUID is not held up; the same UUID waits for the holder
        assert events == ["other"]
        events.append("first done")
    same.join(5)
    assert events == ["other", "first done", "same"]
    assert (tmp_path / "kcrypt-reencrypt-1234-uuid.lock").exists()


def test_no_uuid_no_lock(monkeypatch, tmp_path):
    monkeypatch.setattr(luks, "REENCRYPT_LOCK_DIR", str(tmp_path))
    with luks.reencryption_lock(None):
        pass
    assert list(tmp_path.iterdir()) == []


def test_encrypt_in_place_holds_the_lock(monkeypatch, tmp_path):
    monkeypatch.setattr(luks, "REENCRYPT_LOCK_DIR", str(tmp_path))
    held = []

    def fake_run(argv, what, stdin=b"", **kwargs):
        # the lock is held while cryptsetup runs: a non-blocking attempt on it fails
        import fcntl
        import os
        descriptor = os.open(str(tmp_path / "kcrypt-reencrypt-abc.lock"), os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(descriptor)

    monkeypatch.setattr(luks, "run", fake_run)
    luks.encrypt_in_place("/dev/null", b"key", luks.LuksOptions(), uuid="abc", label="COS_PERSISTENT")
    assert held == [True]
