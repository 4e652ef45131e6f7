# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stopping a process a test started (never anything else): SIGTERM, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def stop(process, timeout=10):
    """Stop ``process`` (a Popen this run started) and reap it; nothing if it has already ended."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
