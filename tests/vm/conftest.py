# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures for tests that boot the QEMU VM (see docs/vm.md).

Every test that uses ``vm_image`` (directly or through ``vm_node``) gets the
``vm`` marker (registered in pytest.ini): select with ``pytest -m vm``, skip with
``-m "not vm"``.
A failing VM test lists the console logs of its boots (kept under its tmp dir).
"""

from __future__ import annotations

import os
import shutil

import pytest

from support.swtpm import provision
from vm import image as vm_image_module
from vm.machine import Machine, make_persistent_disk


def pytest_collection_modifyitems(items):
    slots = [i for i, item in enumerate(items) if "vm_image" in getattr(item, "fixturenames", ())]
    for index in slots:
        items[index].add_marker(pytest.mark.vm)
    # Longest first (a module's VM_BOOTS says how many boots its tests take), so that with
    # pytest-xdist the long scenarios do not start last and leave one worker idle at the end.
    ordered = sorted((items[i] for i in slots), key=lambda item: -getattr(item.module, "VM_BOOTS", 1))
    for index, item in zip(slots, ordered):
        items[index] = item


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    machines = getattr(item, "_vm_machines", [])
    if report.failed and machines:
        lines = []
        for machine in machines:
            for boot in machine.boots:
                lines.append("%s: exit %s after %.1f s: %s" % (boot.name, boot.exit_code, boot.seconds, boot.console_log))
            lines.append("(machine directory, with the console log of an unfinished boot: %s)" % machine.directory)
        last = [b for m in machines for b in m.boots][-1:] or None
        if last:
            lines.append("--- end of %s ---\n%s" % (last[0].console_log, last[0].tail()))
        report.sections.append(("VM console logs", "\n".join(lines)))


@pytest.fixture(scope="session")
def vm_image():
    """The cached VM image (kernel + initramfs); built on first use (~15 s plus downloads)."""
    return vm_image_module.ensure_image(log=lambda message: print(message, flush=True))


@pytest.fixture(scope="session")
def vm_tpm_template(tmp_path_factory):
    """A provisioned swtpm state (RSA EK with certificate), copied for each VM node."""
    path = str(tmp_path_factory.mktemp("vm-tpm") / "template")
    provision(path, ek_cert=True)
    return path


@pytest.fixture
def vm_node(vm_image, vm_tpm_template, tmp_path, request):
    """Make a VM node: ``vm_node(name="node", disks=(...), forwards=(...))`` → Machine.

    Each node has its own copy of the session's TPM state (same EK, same TPM hash,
    separate NV and PCRs) in ``<tmp_path>/<name>/tpm``; boots' console logs are
    kept in ``<tmp_path>/<name>/``.
    """
    machines = []
    request.node._vm_machines = machines

    def make(name="node", disks=(), forwards=(), memory=512, timeout=300):
        directory = str(tmp_path / name)
        os.makedirs(directory)
        state = os.path.join(directory, "tpm")
        shutil.copytree(vm_tpm_template, state)
        machine = Machine(vm_image, directory, state, disks=disks, forwards=forwards, memory=memory, timeout=timeout)
        machines.append(machine)
        return machine

    return make


@pytest.fixture
def persistent_disk(tmp_path):
    """A 128 MiB raw disk: GPT partition ``persistent`` with ext4 labelled COS_PERSISTENT (the guest's /dev/vda1)."""
    path = str(tmp_path / "disk.img")
    make_persistent_disk(path)
    return path


@pytest.fixture
def host_cli(repo_root, subprocess_env):
    """Run one of the checkout's bin/ entry points on the host: ``host_cli("kcrypt", "--json", ...)`` → CompletedProcess."""
    import subprocess
    import sys

    def run(program, *args, check=True, stdin=None):
        result = subprocess.run(
            [sys.executable, os.path.join(repo_root, "bin", program)] + list(args),
            input=stdin, capture_output=True, text=True, env=subprocess_env, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError("%s %s failed (%d): %s%s" % (program, " ".join(args), result.returncode, result.stdout, result.stderr))
        return result

    return run
