# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""README's commands, run as written from the checkout's root.

Every command of README's ``sh`` blocks (and the build-and-install line of its prose) is either run
here or listed in NOT_RUN with the reason, so a command added to README, or changed there, fails
this test until it is run or explained. Only what this machine needs is substituted, and each
substitution is named: a software TPM instead of /dev/tpmrm0 or port 2321, free ports on 127.0.0.1
instead of 0.0.0.0:8082/8443, a temporary directory instead of /var/lib or /srv, the test's own
certificate, and an install directory of the test instead of ~/.ansible.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import ssl
import time
import urllib.request

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.kms.settings import MAX_WORKERS
from support.playbook import ROOT
from support.ports import free_port
from support.process import stop

with open(os.path.join(ROOT, "README.md")) as _handle:
    README = _handle.read()

BIN = os.path.dirname(sys.executable)

NOT_RUN = {
    "./scripts/setup.sh && ./scripts/provision.sh":
        "installs Debian packages and the virtualenv (CI runs it: .ci/run); provision.sh runs the lab, "
        "provision.yml and lab_down, which test_fleet_provision.py and test_installed_collection.py run",
    "./scripts/test.sh": "the whole test suite, this test included",
    "ansible-playbook -i fleet.yml playbooks/provision.yml":
        "needs the reader's inventory of real hosts; test_installed_collection.py runs provision with a "
        "hand-written inventory",
}

TPM_COMMANDS = [
    "ansible localhost -m kairos_tpm_hash",
    "ansible localhost -m kairos.kcrypt.kairos_tpm_hash -a 'pcrs=0,7,11 tpm_device=swtpm:host=127.0.0.1,port=2321'",
    "bin/kcrypt-discovery-challenger --tpm-device /dev/tpmrm0",
]

SERVE_COMMANDS = [
    ".venv/bin/python bin/kcrypt-challenger serve --listen 0.0.0.0:8082 --store sqlite:///var/lib/kcrypt-challenger/kms.db",
    ".venv/bin/python bin/kcrypt-challenger serve --listen 0.0.0.0:8443 --store sqlite:///srv/kms.db "
    "--tls-cert tls.crt --tls-key tls.key --enrollment registered-only",
    ".venv/bin/python bin/kcrypt-challenger serve --listen 0.0.0.0:8082 --store sqlite:///srv/kms.db --workers auto",
]

BUILD_AND_INSTALL = "ansible-galaxy collection build && ansible-galaxy collection install kairos-kcrypt-*.tar.gz"


def sh_commands(text):
    """The commands of the ``sh`` blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def env_for_checkout(extra=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # "with .venv/bin on PATH", as README says
    env.pop("KCRYPT_TPM_DEVICE", None)
    env.update(extra or {})
    return env


def run_here(command, env, timeout=300):
    return subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_every_readme_command_is_run_or_explained():
    listed = set(NOT_RUN) | set(TPM_COMMANDS) | set(SERVE_COMMANDS)
    assert set(sh_commands(README)) == listed, set(sh_commands(README)) ^ listed
    assert "`%s`" % BUILD_AND_INSTALL in README


@pytest.fixture(scope="module")
def tpm(swtpm_factory):
    instance = swtpm_factory(ek_cert=True)
    yield instance
    instance.stop()


def test_tpm_commands(tpm):
    # README: "KCRYPT_TPM_DEVICE on the target does the same" as tpm_device, for ad-hoc use
    env = env_for_checkout({"KCRYPT_TPM_DEVICE": tpm.tcti, "TSS2_LOG": "all+NONE"})
    short, fqcn, discovery = TPM_COMMANDS
    plugin = run_here(discovery.replace("/dev/tpmrm0", tpm.tcti), env)
    assert plugin.returncode == 0, plugin.stderr
    assert re.fullmatch(r"[0-9a-f]{64}", plugin.stdout), repr(plugin.stdout)  # no newline either

    by_short_name = run_here(short, env)
    assert by_short_name.returncode == 0, by_short_name.stdout + by_short_name.stderr
    assert plugin.stdout in by_short_name.stdout, by_short_name.stdout

    by_fqcn = run_here(fqcn.replace("port=2321", "port=%d" % tpm.port), env)
    assert by_fqcn.returncode == 0, by_fqcn.stdout + by_fqcn.stderr
    assert plugin.stdout in by_fqcn.stdout
    for pcr in ("0", "7", "11"):
        assert re.search(r"""['"]?%s['"]?: ['"]?[0-9a-f]{64}""" % pcr, by_fqcn.stdout), by_fqcn.stdout


def wait_healthy(process, url, timeout=90):
    context = ssl._create_unverified_context() if url.startswith("https") else None  # liveness only
    deadline = time.monotonic() + timeout  # generous: a loaded 2-core machine imports slowly
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited with %s" % process.returncode
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2, context=context) as response:
                return response.status
        except OSError:
            time.sleep(0.2)
    raise AssertionError("no answer on %s/healthz" % url)


@pytest.mark.parametrize("command", SERVE_COMMANDS, ids=["plain", "tls-registered-only", "workers-auto"])
def test_serve_commands(command, tmp_path):
    port = free_port()
    here = (command.replace("0.0.0.0:8082", "127.0.0.1:%d" % port).replace("0.0.0.0:8443", "127.0.0.1:%d" % port)
            .replace("sqlite:///var/lib/kcrypt-challenger/", "sqlite://%s/var-lib/" % tmp_path)
            .replace("sqlite:///srv/", "sqlite://%s/srv/" % tmp_path)
            .replace(" tls.crt", " %s/tls.crt" % tmp_path).replace(" tls.key", " %s/tls.key" % tmp_path))
    assert here != command
    if "--tls-cert" in command:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kms",
                        "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")],
                       check=True, capture_output=True)
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(shlex.split(here), cwd=ROOT, env=env_for_checkout(), stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        scheme = "https" if "--tls-cert" in command else "http"
        assert wait_healthy(process, "%s://127.0.0.1:%d" % (scheme, port)) == 200
    finally:
        stop(process, timeout=20)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "listening on %s://127.0.0.1:%d" % (scheme, port) in output, output
    store = here.split("sqlite://", 1)[1].split()[0]
    assert os.path.isfile(store), output  # the store's directory is made when missing
    if "--workers" in command:  # auto: one server process per core this process may run on
        assert "workers %d" % min(MAX_WORKERS, len(os.sched_getaffinity(0))) in output, output


def test_build_and_install(tmp_path):
    build, install = BUILD_AND_INSTALL.split(" && ")
    env = env_for_checkout()
    built = subprocess.run(shlex.split(build) + ["--output-path", str(tmp_path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = [name for name in os.listdir(tmp_path) if re.fullmatch(r"kairos-kcrypt-.*\.tar\.gz", name)]
    assert len(tarball) == 1, tarball
    # the test installs into a directory of its own, not the reader's ~/.ansible/collections
    command = shlex.split(install.replace("kairos-kcrypt-*.tar.gz", tarball[0])) + ["-p", str(tmp_path / "c")]
    installed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert os.path.isfile(tmp_path / "c" / "ansible_collections" / "kairos" / "kcrypt" / "MANIFEST.json")
