# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The challenger role through the real playbook, on this host (no systemd: supervised mode).

One deployment (its own directories, port and service user) is made for the class and
changed by the tests in order: plain HTTP, idempotence, check mode, a settings change
through the restart handler, generated TLS, crash recovery, the admin command, removal.
Whatever happens, the fixture stops the server it started and removes the user and files.
The systemd unit is rendered separately and checked with systemd-analyze.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import resource
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from support import playbook
from support.process import alive, children
from support.ports import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="deploys a service user and a daemon (root)")

WHEELS = os.path.expanduser(os.environ.get("KCRYPT_CACHE", "~/.cache/kcrypt") + "/wheels")


def get(url, cafile=None, timeout=5):
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return response.status, response.read().decode()


def wait_healthy(url, cafile=None, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(url, cafile)
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_pid(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return 0


def uid_of(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid in /proc/%d/status" % pid)


def open_files(pid):
    """(soft, hard) RLIMIT_NOFILE of ``pid``, from /proc/PID/limits."""
    with open("/proc/%d/limits" % pid) as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/%d/limits" % pid)


def expected_open_files(limit):
    """(soft, hard) the supervisor's --open-files gives the server here: the limit, or the hard limit we cannot raise."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/self/status") as handle:
        effective = int([line.split()[1] for line in handle if line.startswith("CapEff:")][0], 16)
    if effective & (1 << 24) or hard == resource.RLIM_INFINITY or hard >= limit:  # CAP_SYS_RESOURCE
        return limit, limit
    return hard, hard


def mode_owner(path):
    info = os.stat(path)
    return stat.S_IMODE(info.st_mode), pwd.getpwuid(info.st_uid).pw_name


def published(run):
    """challenger_result as the role set it."""
    results = run.task_results("Publish how to reach the challenger")
    assert results, run
    return results[-1]["ansible_facts"]["challenger_result"]


@pytest.fixture(scope="class")
def kms():
    base = "/tmp/kcrypt-challenger-test-%d" % os.getpid()
    os.makedirs(base, mode=0o755)
    os.chmod(base, 0o755)  # the service user must reach the virtualenv and the bundle
    user = "kcrypt-t%d" % (os.getpid() % 100000)
    port = free_port()
    variables = {
        "challenger_install_dir": base + "/opt",
        "challenger_config_dir": base + "/etc",
        "challenger_store_dir": base + "/lib",
        "challenger_log_dir": base + "/log",
        "challenger_run_dir": base + "/run",
        "challenger_user": user,
        "challenger_listen_address": "127.0.0.1",
        "challenger_port": port,
        # the system Python: the service user must be able to run the virtualenv's interpreter
        # (a pyenv Python under /root is out of its reach)
        "challenger_python": "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable,
        # one virtualenv for every test here: also the packages of mDNS and the Kubernetes store
        "challenger_python_packages": ["aiohttp>=3.9", "cryptography>=42", "PyYAML>=6", "tpm2-pytss>=2.1",
                                       "zeroconf>=0.131", "kubernetes>=28"],
        "challenger_pip_extra_args": ("--find-links %s" % WHEELS) if os.path.isdir(WHEELS) else "",
        "challenger_manage_system_packages": True,  # python3-venv and the tpm2-pytss build dependencies
    }
    state = {"base": base, "user": user, "port": port, "vars": variables,
             "pidfile": base + "/run/kcrypt-challenger.pid", "url": "http://127.0.0.1:%d" % port}
    try:
        yield state
    finally:
        if os.path.exists(base + "/opt") or os.path.exists(base + "/lib"):  # the last test did not get to purge
            playbook.playbook("playbooks/challenger.yml", dict(variables, challenger_state="absent", challenger_purge=True))
        for pidfile in (state["pidfile"], state["pidfile"] + ".child"):
            pid = read_pid(pidfile)
            try:
                ours = pid and base.encode() in open("/proc/%d/cmdline" % pid, "rb").read()
            except OSError:
                ours = False
            if ours:  # the role could not stop it: stop exactly this process
                os.kill(pid, signal.SIGKILL)
        if subprocess.run(["id", user], capture_output=True, check=False).returncode == 0:
            subprocess.run(["userdel", user], check=False)
        try:
            grp.getgrnam(user)
            subprocess.run(["groupdel", user], check=False)
        except KeyError:
            pass
        shutil.rmtree(base, ignore_errors=True)


def deploy(kms, check=False, **overrides):
    run = playbook.playbook("playbooks/challenger.yml", dict(kms["vars"], **overrides), check=check)
    assert run.rc == 0, run
    return run


# the tests of this class build on each other, in order (scripts/test.sh: --dist loadscope keeps a class on one worker)
@pytest.mark.slow(minutes=9)
class TestChallengerOnThisHost:
    def test_deploy_plain_http(self, kms):
        run = deploy(kms)
        assert run.changed > 0
        assert get(kms["url"] + "/healthz")[0] == 200
        assert get(kms["url"] + "/readyz")[0] == 200
        result = published(run)
        assert result["service_mode"] == "supervised"
        assert result["ca_certificate"] == ""
        # the server runs as the service user, supervised, with its PID files
        child = read_pid(kms["pidfile"] + ".child")
        assert child and uid_of(child) == pwd.getpwnam(kms["user"]).pw_uid
        assert read_pid(kms["pidfile"]) and uid_of(read_pid(kms["pidfile"])) == 0
        # the supervisor gives the server LimitNOFILE (challenger_open_files_limit): 65536, or as much as this
        # host lets root set (without CAP_SYS_RESOURCE the hard limit cannot be raised)
        assert open_files(child) == expected_open_files(65536)
        # tight permissions on the store and its at-rest key, owned by the service user
        lib = kms["vars"]["challenger_store_dir"]
        assert mode_owner(lib) == (0o700, kms["user"])
        assert mode_owner(lib + "/kms.db") == (0o600, kms["user"])
        assert mode_owner(lib + "/kms.db.key") == (0o600, kms["user"])
        config = kms["vars"]["challenger_config_dir"] + "/config.yaml"
        assert mode_owner(config) == (0o640, "root")
        assert grp.getgrgid(os.stat(config).st_gid).gr_name == kms["user"]
        assert "Ansible managed" in open(config).read()

    def test_second_run_changes_nothing(self, kms):
        child = read_pid(kms["pidfile"] + ".child")
        run = deploy(kms)
        assert run.changed == 0, run
        assert read_pid(kms["pidfile"] + ".child") == child  # not restarted

    def test_check_mode_predicts_a_settings_change_without_making_it(self, kms):
        config = kms["vars"]["challenger_config_dir"] + "/config.yaml"
        before = open(config).read()
        child = read_pid(kms["pidfile"] + ".child")
        run = deploy(kms, check=True, challenger_log_level="debug")
        assert run.changed_tasks() == ["localhost | kairos.kcrypt.challenger : Write the server settings"], run
        assert open(config).read() == before
        assert read_pid(kms["pidfile"] + ".child") == child

    def test_settings_change_restarts_through_the_handler(self, kms):
        child = read_pid(kms["pidfile"] + ".child")
        run = deploy(kms, challenger_log_level="debug", challenger_workers=2, challenger_protocols=["attestation"],
                     challenger_max_partitions_per_tpm=4)
        assert run.changed > 0
        handler = run.task_results("Restart the supervised challenger")
        assert handler and handler[-1].get("changed"), run
        assert get(kms["url"] + "/healthz")[0] == 200
        new_child = read_pid(kms["pidfile"] + ".child")
        assert new_child and new_child != child
        config = open(kms["vars"]["challenger_config_dir"] + "/config.yaml").read()
        assert "log_level: debug" in config and "workers: 2" in config
        assert "protocols:\n- attestation\nmax_partitions_per_tpm: 4\n" in config
        with pytest.raises(urllib.error.HTTPError) as refused:  # the legacy protocol is off
            get(kms["url"] + "/getPass")
        assert refused.value.code == 404 and "legacy protocol is disabled" in refused.value.read().decode()
        # from here on the server runs as a supervisor of two workers, all as the service user
        workers = children(new_child)
        assert len(workers) == 2 and {uid_of(pid) for pid in workers} == {pwd.getpwnam(kms["user"]).pw_uid}
        kms["vars"].update(challenger_log_level="debug", challenger_workers=2, challenger_protocols=["attestation"],
                           challenger_max_partitions_per_tpm=4)

    def test_generated_tls(self, kms):
        run = deploy(kms, challenger_tls="generate")
        assert run.changed > 0
        tls = kms["vars"]["challenger_config_dir"] + "/tls"
        https = "https://127.0.0.1:%d/healthz" % kms["port"]
        assert wait_healthy(https, cafile=tls + "/ca.crt")[0] == 200
        with pytest.raises((OSError, urllib.error.URLError)):  # no plain HTTP any more
            get(kms["url"] + "/healthz")
        with pytest.raises(urllib.error.URLError):  # and the certificate is not trusted without the CA
            get(https)
        assert mode_owner(tls + "/ca.key") == (0o600, "root")
        assert mode_owner(tls + "/server.key") == (0o600, kms["user"])
        assert published(run)["ca_certificate"] == open(tls + "/ca.crt").read()
        assert published(run)["url"].startswith("https://")
        again = deploy(kms, challenger_tls="generate")
        assert again.changed == 0, again
        kms["vars"]["challenger_tls"] = "generate"
        kms["url"] = "https://127.0.0.1:%d" % kms["port"]
        kms["cafile"] = tls + "/ca.crt"

    def test_new_names_and_mdns(self, kms):
        """A new name re-issues the server certificate (CA kept); the mDNS announcement is found
        the way the node client resolves it. One run for both, to keep the suite short."""
        pytest.importorskip("zeroconf")
        from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns

        tls = kms["vars"]["challenger_config_dir"] + "/tls"
        ca_before = open(tls + "/ca.crt").read()
        cert_before = open(tls + "/server.crt").read()
        name = "kms-%d.local" % os.getpid()
        kms["vars"].update(challenger_tls_extra_san=["DNS:kms.example.test"], challenger_mdns_host=name,
                           challenger_mdns_interfaces=["127.0.0.1"])
        run = deploy(kms)
        assert run.changed > 0
        assert open(tls + "/ca.crt").read() == ca_before
        assert open(tls + "/server.crt").read() != cert_before
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(open(tls + "/server.crt", "rb").read())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"kms.example.test", name}.issubset(names.get_values_for_type(x509.DNSName))
        assert wait_healthy(kms["url"] + "/healthz", kms["cafile"])[0] == 200
        assert mdns.resolve(name, timeout=20, interfaces=["127.0.0.1"]) == ("127.0.0.1", kms["port"])

    def test_supervisor_restarts_a_crashed_server(self, kms):
        child = read_pid(kms["pidfile"] + ".child")
        assert child > 0  # never os.kill(0, ...): that would hit this test's own process group
        workers = children(child)
        os.kill(child, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG) and free the port
        deadline = time.monotonic() + 30
        while read_pid(kms["pidfile"] + ".child") in (0, child):
            assert time.monotonic() < deadline, "the supervisor did not restart the server"
            time.sleep(0.2)
        assert wait_healthy(kms["url"] + "/healthz", kms.get("cafile"))[0] == 200
        while [pid for pid in workers if alive(pid)]:  # the old workers finish their graceful shutdown
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.2)
        assert len(workers) == 2

    def test_rerun_starts_a_stopped_server(self, kms):
        supervisor = read_pid(kms["pidfile"])
        assert supervisor > 0
        os.kill(supervisor, signal.SIGTERM)  # a clean stop: the supervisor does not restart it
        deadline = time.monotonic() + 20
        while alive(supervisor):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises((OSError, urllib.error.URLError)):
            get(kms["url"] + "/healthz", kms.get("cafile"))
        run = deploy(kms)
        assert run.changed > 0
        assert get(kms["url"] + "/healthz", kms.get("cafile"))[0] == 200

    def test_admin_command_uses_the_host_settings(self, kms):
        command = kms["vars"]["challenger_install_dir"] + "/bin/kcrypt-challenger"
        result = subprocess.run(["setpriv", "--reuid", kms["user"], "--regid", kms["user"], "--init-groups", "--",
                                 command, "list", "-o", "json"], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []

    def test_ek_certificate_settings_install_the_ca_bundle(self, kms, tmp_path):
        """challenger_ek_ca (a PEM file and a directory) becomes one bundle the server reads at start; taking the
        CAs off the list removes the bundle (a CA no longer listed is no longer trusted)."""
        from support import ek_pki
        from support.soft_tpm import key_pool

        root_key, inter_key = key_pool(2)
        root = ek_pki.ca_certificate("Vendor EK Root CA", root_key)
        (tmp_path / "root.pem").write_bytes(ek_pki.pem(root))
        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "intermediate.crt").write_bytes(
            ek_pki.pem(ek_pki.ca_certificate("Vendor EK Intermediate CA", inter_key, root, root_key)))
        bundle = kms["vars"]["challenger_config_dir"] + "/ek-ca.pem"
        options = {"challenger_ek_certificate": "require", "challenger_ek_ca": [str(tmp_path / "root.pem"), str(tmp_path / "more")]}
        run = deploy(kms, **options)
        assert run.changed > 0
        assert mode_owner(bundle) == (0o644, "root") and open(bundle).read().count("BEGIN CERTIFICATE") == 2
        config = open(kms["vars"]["challenger_config_dir"] + "/config.yaml").read()
        assert "ek_certificate: require" in config and bundle in config
        assert wait_healthy(kms["url"] + "/healthz", kms.get("cafile"))[0] == 200
        log = open(kms["vars"]["challenger_log_dir"] + "/kcrypt-challenger.log").read()
        assert "ek certificate require with 2 trusted CA(s)" in log.rsplit("listening on", 1)[-1]
        assert deploy(kms, **options).changed == 0
        assert deploy(kms).changed > 0  # back to off
        assert not os.path.exists(bundle)
        assert wait_healthy(kms["url"] + "/healthz", kms.get("cafile"))[0] == 200

    def test_absent_stops_the_server_and_keeps_the_store(self, kms):
        run = deploy(kms, challenger_state="absent")
        assert run.changed > 0
        with pytest.raises((OSError, urllib.error.URLError)):
            get(kms["url"] + "/healthz", kms.get("cafile"))
        assert not os.path.exists(kms["pidfile"])
        assert not os.path.exists(kms["vars"]["challenger_install_dir"])
        assert not os.path.exists(kms["vars"]["challenger_config_dir"])
        lib = kms["vars"]["challenger_store_dir"]
        assert os.path.exists(lib + "/kms.db") and os.path.exists(lib + "/kms.db.key")
        assert pwd.getpwnam(kms["user"])
        run = deploy(kms, challenger_state="absent", challenger_purge=True)
        assert not os.path.exists(lib)
        with pytest.raises(KeyError):
            pwd.getpwnam(kms["user"])


def test_systemd_unit_is_valid_and_hardened(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    install = tmp_path / "opt"
    (install / "venv" / "bin").mkdir(parents=True)
    (install / "venv" / "bin" / "python").symlink_to(sys.executable)  # systemd-analyze checks ExecStart exists
    run = playbook.playbook("tests/integration/playbooks/render_challenger_unit.yml", {
        "challenger_systemd_unit_dir": str(tmp_path), "challenger_install_dir": str(install),
    })
    assert run.rc == 0, run
    unit = tmp_path / "kcrypt-challenger.service"
    text = unit.read_text()
    for line in ("Restart=on-failure", "LimitNOFILE=65536\n", "NoNewPrivileges=true", "ProtectSystem=strict", "ProtectHome=true",
                 "PrivateTmp=true", "CapabilityBoundingSet=\n", "ReadWritePaths=/var/lib/kcrypt-challenger\n",
                 "User=kcrypt-challenger", "ExecStart=%s/venv/bin/python %s/kcrypt-challenger.pyz serve "
                 "--config /etc/kcrypt-challenger/config.yaml" % (install, install)):
        assert line in text, line
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                              capture_output=True, text=True, check=False)
    last = [line for line in security.stdout.splitlines() if "Overall exposure level" in line]
    assert last, security.stdout + security.stderr
    exposure = float(last[0].split(":")[1].split()[0])
    assert exposure <= 2.0, last[0]  # "OK" starts below 5.0; a hardened unit is well under it
