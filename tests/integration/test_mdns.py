# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mDNS with real zeroconf: on 127.0.0.1, and across two network namespaces joined by a veth pair."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns
from support.netns import veth_namespaces
from support.process import stop as stop_process
from support.ports import free_port

PEER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support", "mdns_peer.py")


def unique(prefix):
    return "%s-%s.local" % (prefix, uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def loopback_kms():
    """One KMS announced on 127.0.0.1 with the default instance name (the OS host name)."""
    host = unique("kms")
    port = free_port()
    with mdns.Announcer(host, port, interfaces=["127.0.0.1"]) as announcer:
        yield host, port, announcer


def test_announced_on_loopback_is_resolved_with_upstream_records(loopback_kms):
    host, port, announcer = loopback_kms
    assert mdns.resolve(host, timeout=10, interfaces=["127.0.0.1"]) == ("127.0.0.1", port)

    # What a hashicorp/mdns client sees: instance = OS host name, SRV target = host.,
    # one A record, TXT "An instance of _kcrypt._tcp".
    zeroconf = mdns.zeroconf
    zc = zeroconf.Zeroconf(interfaces=["127.0.0.1"], ip_version=zeroconf.IPVersion.V4Only, use_asyncio=False)
    try:
        info = zeroconf.ServiceInfo("_kcrypt._tcp.local.", announcer.name)
        assert info.request(zc, 5000)
    finally:
        zc.close()
    assert announcer.instance == socket.gethostname()
    assert announcer.name.startswith(socket.gethostname())  # zeroconf renames on a clash: "vm (2)"
    assert info.server == host + "."
    assert info.port == port
    assert info.parsed_addresses() == ["127.0.0.1"]
    assert info.text == b"\x1bAn instance of _kcrypt._tcp"


def test_resolve_url_rewrites_host_and_keeps_original_host_header(loopback_kms):
    host, port = loopback_kms[:2]
    url, headers = mdns.resolve_url("https://%s:9443/" % host, timeout=10, interfaces="lo")
    assert url == "https://127.0.0.1:%d/" % port
    assert headers == {"Host": "%s:9443" % host}


def test_entry_with_other_srv_target_is_ignored():
    wanted, decoy = unique("kms"), unique("decoy")
    decoy_port, wanted_port = free_port(), free_port()
    with mdns.Announcer(decoy, decoy_port, interfaces=["127.0.0.1"], instance="decoy-" + decoy[6:14]):
        # Only the decoy answers: it must not be taken for the wanted host.
        started = time.monotonic()
        with pytest.raises(mdns.MDNSError) as failure:
            mdns.resolve(wanted, timeout=2, interfaces=["127.0.0.1"])
        assert time.monotonic() - started >= 2
        assert str(failure.value).startswith(
            "mDNS resolution failed: no mDNS server found for %s (searched for service type _kcrypt._tcp)" % wanted
        )
        with mdns.Announcer(wanted, wanted_port, interfaces=["127.0.0.1"], instance="wanted-" + wanted[4:12]):
            assert mdns.resolve(wanted, timeout=10, interfaces=["127.0.0.1"]) == ("127.0.0.1", wanted_port)


def test_non_local_host_fails_immediately_with_upstream_text():
    started = time.monotonic()
    with pytest.raises(mdns.MDNSError, match='^domain should end in ".local" when using mdns$'):
        mdns.resolve("kms.example.com:8082", timeout=10, interfaces=["127.0.0.1"])
    assert time.monotonic() - started < 1


def test_interface_selection():
    # upstream's default is every interface; the test session pins the environment variable to loopback
    assert mdns.configured_interfaces(None, environ={}) == ["all"]
    assert os.environ["KCRYPT_MDNS_INTERFACES"] == "127.0.0.1"
    assert mdns.interface_addresses(None) == ["127.0.0.1"]
    assert mdns.interface_addresses("lo") == ["127.0.0.1"]
    assert mdns.interface_addresses("lo, 127.0.0.1") == ["127.0.0.1"]
    assert mdns.interface_addresses(["all"]) == "all"  # every interface only when asked for by name
    assert mdns.configured_interfaces(None, environ={"KCRYPT_MDNS_INTERFACES": "eth7,eth8"}) == ["eth7", "eth8"]
    assert mdns.configured_interfaces("lo", environ={"KCRYPT_MDNS_INTERFACES": "eth7"}) == ["lo"]
    with pytest.raises(mdns.MDNSError, match="no network interface named nosuch0"):
        mdns.interface_addresses("nosuch0")
    with pytest.raises(mdns.MDNSError, match="0.0.0.0 is not a usable IPv4 interface address"):
        mdns.interface_addresses("0.0.0.0")
    with pytest.raises(mdns.MDNSError, match="cannot be combined"):
        mdns.interface_addresses("all,lo")


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)


@needs_netns
def test_found_across_network_namespaces():
    with veth_namespaces("kcrypt-disc") as pair:
        announcer = subprocess.Popen(
            pair.exec_args("a") + [sys.executable, PEER, "announce", "kms-ns.local", "8082", pair.addr_a, pair.if_a, "nsnode"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert announcer.stdout.readline().strip() == "ready"
            found = subprocess.run(
                pair.exec_args("b") + [sys.executable, PEER, "resolve", "kms-ns.local", "10", pair.if_b],
                capture_output=True, text=True, timeout=30, check=False,
            )
            assert (found.returncode, found.stdout.strip()) == (0, "%s 8082" % pair.addr_a), found.stderr
            # The same query on namespace b's loopback (the default) does not reach a's announcement.
            missed = subprocess.run(
                pair.exec_args("b") + [sys.executable, PEER, "resolve", "kms-ns.local", "2", "127.0.0.1"],
                capture_output=True, text=True, timeout=30, check=False,
            )
            assert missed.returncode == 1
            assert "no mDNS server found for kms-ns.local" in missed.stdout
        finally:
            announcer.stdin.close()
            try:
                announcer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                announcer.kill()
                announcer.wait()


@needs_netns
def test_challenger_announced_in_one_namespace_is_found_and_reached_from_another(tmp_path):
    """kcrypt-challenger serve --mdns-host in namespace a; resolution and /healthz from namespace b over the veth."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with veth_namespaces("kcrypt-disc") as pair, open(str(tmp_path / "kms.log"), "wb") as kms_log:
        kms = subprocess.Popen(
            pair.exec_args("a") + [
                sys.executable, os.path.join(root, "bin", "kcrypt-challenger"), "serve",
                "--listen", "%s:8082" % pair.addr_a, "--store", "sqlite://%s/kms.db" % tmp_path,
                "--mdns-host", "kms-ns.local", "--mdns-interface", pair.if_a,
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=kms_log,
        )
        try:
            found = subprocess.run(
                pair.exec_args("b") + [sys.executable, PEER, "resolve", "kms-ns.local", "15", pair.if_b],
                capture_output=True, text=True, timeout=60, check=False,
            )
            assert (found.returncode, found.stdout.strip()) == (0, "%s 8082" % pair.addr_a), (
                found.stdout, (tmp_path / "kms.log").read_text())
            health = subprocess.run(
                pair.exec_args("b") + [sys.executable, "-c",
                                       "import urllib.request;print(urllib.request.urlopen('http://%s:8082/healthz', timeout=5).status)"
                                       % pair.addr_a],
                capture_output=True, text=True, timeout=30, check=False,
            )
            assert health.stdout.strip() == "200", health.stderr
        finally:
            stop_process(kms)
