# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection as a new user gets it, outside the checkout.

Built with ``ansible-galaxy collection build``, installed with ``install -p`` into a directory of the
test, run by FQCN (``ansible-playbook kairos.kcrypt.lab_up``) from a directory that is not the
checkout, with Ansible's own defaults (ANSIBLE_CONFIG names an empty file: no yaml result format, the
stock callback) and no other ANSIBLE_* setting: the lab comes up without writing into the collection,
``kairos.kcrypt.provision`` with a hand-written inventory naming the KMS host prints a summary a person
can read, and ``kairos.kcrypt.lab_down`` alone leaves no process (the KMS included), loop device,
namespace or file of the lab.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import subprocess
import sys

import pytest
import yaml

from support.lab import force_remove, leftovers, processes
from support.playbook import ROOT
from support.ports import free_port
from support.process import alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (loop devices, swtpm, cryptsetup)")

BIN = os.path.dirname(sys.executable)


class Installed:
    def __init__(self, base):
        self.base = str(base)
        self.collections = os.path.join(self.base, "collections")
        self.home = os.path.join(self.collections, "ansible_collections", "kairos", "kcrypt")
        self.lab_dir = "/tmp/kcrypt-installed-%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.lab_name = "ki%s" % secrets.token_hex(2)
        self.inventory = os.path.join(self.lab_dir, "inventory.yml")
        config = os.path.join(self.base, "ansible.cfg")
        open(config, "w").close()
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
        self.env.update({
            "ANSIBLE_CONFIG": config,  # Ansible's defaults, not the checkout's ansible.cfg
            "ANSIBLE_COLLECTIONS_PATH": self.collections,
            "ANSIBLE_NOCOLOR": "1",
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        })
        self.env.pop("KCRYPT_TPM_DEVICE", None)

    def run(self, *args, timeout=900):
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, cwd=self.base,
                              timeout=timeout, check=False)

    def files(self):
        found = set()
        for top, dirs, names in os.walk(self.home):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            found.update(os.path.join(top, name) for name in names)
        return found


@pytest.fixture(scope="class")
def installed(tmp_path_factory):
    state = Installed(tmp_path_factory.mktemp("installed"))
    build = state.run("ansible-galaxy", "collection", "build", ROOT, "--output-path", state.base)
    assert build.returncode == 0, build.stderr + build.stdout
    tarball = glob.glob(os.path.join(state.base, "kairos-kcrypt-*.tar.gz"))
    assert len(tarball) == 1, tarball
    install = state.run("ansible-galaxy", "collection", "install", "-p", state.collections, tarball[0])
    assert install.returncode == 0, install.stderr + install.stdout
    assert os.path.isfile(os.path.join(state.home, "MANIFEST.json"))
    try:
        yield state
    finally:
        state.run("ansible-playbook", "kairos.kcrypt.lab_down", "-e", "lab_dir=" + state.lab_dir)
        force_remove(state.lab_dir, state.lab_name)
        shutil.rmtree(state.base, ignore_errors=True)


def summary_block(stdout):
    """The output of the summary task, up to the next play."""
    start = stdout.index("TASK [Summary, one line per node]")
    end = stdout.index("PLAY [", start)
    return stdout[start:end]


# the tests of this class build on each other, in order (scripts/test.sh: --dist loadscope)
@pytest.mark.slow(minutes=4)
class TestInstalledCollection:
    def test_lab_up_writes_its_inventory_outside_the_collection(self, installed):
        before = installed.files()
        run = installed.run("ansible-playbook", "kairos.kcrypt.lab_up", "-e", "lab_dir=" + installed.lab_dir,
                            "-e", "lab_name=" + installed.lab_name, "-e", "lab_node_count=2")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        # an installed collection keeps the inventory in the lab directory, not in itself
        assert "inventory %s" % installed.inventory in run.stdout, run.stdout[-2000:]
        with open(installed.inventory) as handle:
            hosts = yaml.safe_load(handle)["all"]["children"]["kcrypt_nodes"]["hosts"]
        assert sorted(hosts) == ["node1", "node2"]
        assert installed.files() == before, installed.files() ^ before

    def test_provision_with_a_hand_written_inventory_prints_a_readable_summary(self, installed):
        kms_inventory = os.path.join(installed.base, "kms.yml")
        with open(kms_inventory, "w") as handle:
            handle.write("all:\n  children:\n    kcrypt_challenger:\n      hosts:\n        localhost:\n"
                         "          ansible_connection: local\n"
                         "          ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n")
        run = installed.run("ansible-playbook", "-i", installed.inventory, "-i", kms_inventory,
                            "kairos.kcrypt.provision", "-e", "challenger_port=%d" % free_port())
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
        block = summary_block(run.stdout)
        # one line of output per node, each a list item of its own: no JSON string full of \n
        assert "\\n" not in block, block
        lines = block.splitlines()
        header = [line for line in lines if "NODE" in line and "TPM HASH" in line and "OUTCOME" in line]
        assert len(header) == 1, block
        for node in ("node1", "node2"):
            mine = [line for line in lines if re.search(r'"%s\s' % node, line)]
            assert len(mine) == 1, block
            assert re.search(r"\b[0-9a-f]{16}\b", mine[0]) and " encrypted " in mine[0], mine[0]
        # the KMS runs from the lab directory
        assert any("/kms/" in argv for _pid, argv in processes(installed.lab_dir)), processes(installed.lab_dir)

    def test_lab_down_removes_the_kms_and_the_lab(self, installed):
        kms = [pid for pid, argv in processes(installed.lab_dir) if "/kms/" in argv]
        assert len(kms) >= 2, kms  # the supervisor and the server
        before = installed.files()
        run = installed.run("ansible-playbook", "kairos.kcrypt.lab_down", "-e", "lab_dir=" + installed.lab_dir)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert leftovers(installed.lab_dir, installed.lab_name) == []
        assert not any(alive(pid) for pid in kms), kms
        assert installed.files() == before
