# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures of the node tests (import them into a test module): loop disks, mounts, tpm2-tools.

Everything a fixture creates is removed in its finally, by the name or device it recorded.
"""

from __future__ import annotations

import os
import shutil

import pytest

from support.loopdisk import LoopDisk, sh


def fast_options(**overrides):
    """LUKS options with the cheap test PBKDF (production defaults: docs/node.md, "PBKDF default")."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.node.luks import LuksOptions

    values = dict(pbkdf="pbkdf2", iterations=1000)
    values.update(overrides)
    return LuksOptions(**values)


@pytest.fixture
def loop_disks(tmp_path):
    """``loop_disks([("oem", 40), ("persistent", 0)], size_mib=128)`` -> an attached LoopDisk; detached at the end."""
    if not shutil.which("losetup") or os.geteuid() != 0:
        pytest.skip("needs root and losetup")
    disks = []

    def make(layout, size_mib=None):
        disk = LoopDisk(str(tmp_path), layout, size_mib)
        disks.append(disk)
        return disk.attach()

    try:
        yield make
    finally:
        for disk in disks:
            disk.detach()


@pytest.fixture
def mounter(tmp_path):
    """``mounter(device)`` mounts it on a fresh directory and returns the path; unmounted at the end."""
    mounted = []

    def mount(device):
        target = tmp_path / ("mnt%d" % len(mounted))
        target.mkdir()
        sh("mount", device, str(target))
        mounted.append(str(target))
        return str(target)

    try:
        yield mount
    finally:
        for target in reversed(mounted):
            sh("umount", target, check=False)


def tpm2_tools(tcti, *args, **kwargs):
    """Run a tpm2-tools command against the swtpm at ``tcti``."""
    return sh(*args, env={"TPM2TOOLS_TCTI": tcti}, **kwargs)


@pytest.fixture(scope="module")
def node(swtpm_factory):
    """A swtpm with an EK certificate and its TPM hash; one identity for the module (AKs are per call)."""
    from ansible_collections.kairos.kcrypt.plugins.module_utils.tpm.device import TPM

    tpm = swtpm_factory(ek_cert=True, fresh=True)
    with TPM(tpm.tcti) as handle:
        tpm.tpm_hash = handle.endorsement_key().tpm_hash
    yield tpm
    tpm.stop()
