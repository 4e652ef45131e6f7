# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared pytest set-up: the checkout importable as ansible_collections.kairos.kcrypt, and swtpm fixtures."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mDNS queries default to every interface (upstream's behaviour); no test traffic may leave this machine.
os.environ.setdefault("KCRYPT_MDNS_INTERFACES", "127.0.0.1")
sys.path.insert(0, os.path.join(ROOT, "bin"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import _checkout  # noqa: E402  (bin/_checkout.py: makes the checkout importable)

_checkout.setup()

from support.swtpm import SwTPMFactory  # noqa: E402


@pytest.fixture(scope="session")
def swtpm_factory(tmp_path_factory):
    """Call ``swtpm_factory(ek_cert=True, fresh=False)`` for a started swtpm; all are stopped at session end."""
    factory = SwTPMFactory(str(tmp_path_factory.mktemp("swtpm")))
    yield factory
    factory.stop_all()


@pytest.fixture
def swtpm(swtpm_factory):
    """A started swtpm with an RSA EK certificate in NV, stopped after the test."""
    tpm = swtpm_factory(ek_cert=True)
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm_plain(swtpm_factory):
    """A started swtpm without EK certificate (the EK comes from the TCG template), stopped after the test."""
    tpm = swtpm_factory(ek_cert=False)
    yield tpm
    tpm.stop()


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture
def subprocess_env():
    """Environment for running the checkout's CLIs and ansible from tests."""
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = os.path.join(ROOT, "ansible.cfg")
    env.pop("KCRYPT_TPM_DEVICE", None)
    return env


def pytest_collection_modifyitems(items):
    """Tests marked ``slow`` first, the longest first (the mark's ``minutes``, about how long its class or module takes).

    scripts/test.sh runs pytest-xdist with ``--dist loadscope --no-loadscope-reorder``, which hands out classes and
    modules in this order: a long class started last keeps one worker busy after the others have finished.
    """
    def minutes(item):
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("minutes", 1) if mark else 0

    items.sort(key=lambda item: -minutes(item))  # stable: the order within a class or module stays
