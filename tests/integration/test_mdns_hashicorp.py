# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mDNS against hashicorp/mdns, on raw packets (dnspython), not zeroconf (checklist 47 and 49, issue 13 item 9).

Upstream's client is hashicorp/mdns v1.0.7 ``mdns.Lookup`` (kcrypt-discovery-challenger
cmd/discovery/client/mdns.go): it queries from an ephemeral port, so a responder must answer as RFC 6762
§6.7 says for legacy unicast queries, to that port. Upstream's announcer, simple-mdns-server, is a
hashicorp/mdns server: it answers every query unicast to the querier, from port 5353, with id 0 and all
records in the Answer section. tests/support/hashicorp_mdns.py builds and reads those packets the way
hashicorp's client.go, server.go and zone.go do. Traffic stays on 127.0.0.1 or in namespaces made here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import dns.rdatatype
import pytest

from ansible_collections.kairos.kcrypt.plugins.module_utils.common import mdns
from support import hashicorp_mdns
from support.netns import veth_namespaces
from support.ports import free_port

HELPER = hashicorp_mdns.__file__
PEER = os.path.join(os.path.dirname(HELPER), "mdns_peer.py")


@pytest.mark.parametrize("hash_seed", ["0", "1", "2", "3", "4", "5"])
def test_legacy_unicast_ptr_query_gets_ptr_srv_txt_a_at_the_querier_port(hash_seed):
    """Our announcer (the challenger's --mdns-host) answers mdns.Lookup's query at its ephemeral port, and
    hashicorp's client completes the entry from what arrives within its 1 s Lookup window. zeroconf orders
    the additional records by set iteration (so by the process's string-hash seed): when A comes before SRV,
    hashicorp files the address under the host name and the instance stays incomplete. The announcer runs
    with several seeds to cover both orders."""
    host = "kms-%s.local" % uuid.uuid4().hex[:8]
    port = free_port()
    instance = "node-%s" % uuid.uuid4().hex[:6]
    announcer = subprocess.Popen([sys.executable, PEER, "announce", host, str(port), "127.0.0.1", "127.0.0.1", instance],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONHASHSEED=hash_seed))
    try:
        assert announcer.stdout.readline().strip() == "ready"
        query, source_port, received = hashicorp_mdns.query_ptr("_kcrypt._tcp.local.", "127.0.0.1", wait=1.0)
    finally:
        announcer.stdin.close()
        announcer.wait(timeout=10)
    name = "%s._kcrypt._tcp.local." % instance
    ours = [message for message, source in received if source == ("127.0.0.1", 5353) and any(
        rdata.target.to_text() == name for rrset in message.answer for rdata in rrset if rrset.rdtype == dns.rdatatype.PTR)]
    assert ours, "no answer reached the querier's port %d: %r" % (source_port, received)
    assert source_port != 5353
    for message in ours:
        assert message.id == query.id  # RFC 6762 §6.7: the legacy query's id and question are echoed
        assert [q.to_text() for q in message.question] == [q.to_text() for q in query.question]
        types = {rrset.rdtype for rrset in list(message.answer) + list(message.additional)}
        assert {dns.rdatatype.PTR, dns.rdatatype.SRV, dns.rdatatype.TXT, dns.rdatatype.A} <= types
    # decoded exactly as hashicorp's client loop does, over everything that arrived
    found = [entry for entry in hashicorp_mdns.entries(ours) if entry["Name"] == name]
    assert len(found) == 1, [m.to_text() for m in ours]
    entry = found[0]
    assert (entry["Host"], entry["Port"], entry["AddrV4"]) == (host + ".", port, "127.0.0.1")
    assert entry["InfoFields"] == ["An instance of _kcrypt._tcp"]
    assert entry["Host"] == mdns.fqdn(host)  # upstream's client then accepts it: entry.Host == hostname + "."


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)


@needs_netns
def test_resolver_accepts_unicast_answers_from_a_hashicorp_responder():
    """A simple-mdns-server-like responder (namespace a) answers our resolver's queries unicast from
    port 5353 to the querier; our resolver (namespace b) accepts them. Namespaces keep the unicast
    reply from landing on another local 5353 socket."""
    with veth_namespaces("kcrypt-hmdns") as pair:
        responder = subprocess.Popen(
            pair.exec_args("a") + [sys.executable, HELPER, "respond", "upstream-box", "_kcrypt._tcp", "kms-hc.local", "30000", pair.addr_a],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert responder.stdout.readline().strip() == "ready", responder.stderr.read()
            capture = subprocess.Popen(pair.exec_args("a") + ["tcpdump", "-c", "1", "-n", "-i", pair.if_a, "udp", "src", "port", "5353"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) if shutil.which("tcpdump") else None
            found = subprocess.run(
                pair.exec_args("b") + [sys.executable, PEER, "resolve", "kms-hc.local", "10", pair.if_b],
                capture_output=True, text=True, timeout=30, check=False,
            )
            assert (found.returncode, found.stdout.strip()) == (0, "%s 30000" % pair.addr_a), found.stdout + found.stderr
            if capture is not None:  # where tcpdump exists, show the reply went unicast to the querier
                out = capture.communicate(timeout=10)[0]
                assert "%s.5353 > %s.5353" % (pair.addr_a, pair.addr_b) in out
        finally:
            responder.stdin.close()
            try:
                responder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                responder.kill()
                responder.wait()
