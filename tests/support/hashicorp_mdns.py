# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""hashicorp/mdns v1.0.7 (what kcrypt-discovery-challenger and simple-mdns-server use) on raw DNS
packets with dnspython, independent of zeroconf, for compatibility tests (checklist 47, 49).

* ``query_ptr`` sends the PTR query ``mdns.Lookup`` sends (client.go ``query``: one question, no QU bit,
  RD clear, from an ephemeral UDP port to 224.0.0.251:5353) and collects the datagrams that come back
  to that port.
* ``entries`` turns received messages into ServiceEntry dicts exactly as client.go's loop does:
  Answer then Extra records; PTR names an entry, SRV aliases its target to it, A/TXT fill the entry
  named by the record; an entry counts only when ``complete()`` (address, port and a TXT record).
* Run as a script, ``respond INSTANCE SERVICE HOST PORT IP`` answers like server.go + zone.go
  (``MDNSService.Records``): every record in the Answer section (PTR, SRV, A, TXT), id 0 unless the
  question has the QU bit, and always sent unicast to the querier's address and port from the
  5353 socket (``sendResponse``). It prints ``ready``, then serves until stdin closes.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import sys
import time

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NSEC
import dns.rrset


def _nsec_from_wire(cls, rdclass, rdtype, parser, origin=None):
    next_name = parser.get_name(origin, True)  # decompress, as miekg/dns UnpackDomainName does in every name
    return cls(rdclass, rdtype, next_name, dns.rdtypes.ANY.NSEC.Bitmap.from_wire_parser(parser))


# dnspython refuses a compression pointer in NSEC's next name (RFC 6840); mDNS responders use one
# (RFC 6762 §18.14 allows it) and miekg/dns, hashicorp's DNS library, follows it. Parse like miekg.
dns.rdtypes.ANY.NSEC.NSEC.from_wire_parser = classmethod(_nsec_from_wire)

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
DEFAULT_TTL = 120  # zone.go defaultTTL


def query_ptr(service, interface_ip, wait=3.0):
    """(source port, [(message, (address, port))]): a Lookup's PTR query and what reaches its port."""
    query = dns.message.make_query(service, dns.rdatatype.PTR)
    query.id = random.randint(1, 0xFFFF)  # miekg dns.Id()
    query.flags &= ~dns.flags.RD  # m.RecursionDesired = false
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((interface_ip, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.sendto(query.to_wire(), (MDNS_GROUP, MDNS_PORT))
        received = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            ready = select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]
            if not ready:
                break
            data, source = sock.recvfrom(65536)
            received.append((dns.message.from_wire(data), source))
        return query, sock.getsockname()[1], received
    finally:
        sock.close()


def entries(messages):
    """Complete ServiceEntry dicts from messages, in the order hashicorp's client would deliver them."""
    inprogress, delivered = {}, []

    def ensure(name):
        if name not in inprogress:
            inprogress[name] = {"Name": name, "Host": "", "Port": 0, "AddrV4": None, "InfoFields": None, "sent": False}
        return inprogress[name]

    for message in messages:
        entry = None
        for rrset in list(message.answer) + list(message.additional):
            for rdata in rrset:
                owner = rrset.name.to_text()
                if rrset.rdtype == dns.rdatatype.PTR:
                    entry = ensure(rdata.target.to_text())
                elif rrset.rdtype == dns.rdatatype.SRV:
                    target = rdata.target.to_text()
                    if target != owner:
                        inprogress[target] = ensure(owner)  # alias()
                    entry = ensure(owner)
                    entry["Host"], entry["Port"] = target, rdata.port
                elif rrset.rdtype == dns.rdatatype.TXT:
                    entry = ensure(owner)
                    entry["InfoFields"] = [part.decode() for part in rdata.strings]
                elif rrset.rdtype == dns.rdatatype.A:
                    entry = ensure(owner)
                    entry["AddrV4"] = rdata.address
        if entry is None:
            continue
        if entry["AddrV4"] and entry["Port"] and entry["InfoFields"] is not None and not entry["sent"]:
            entry["sent"] = True
            delivered.append(entry)
    return delivered


# -- the responder (simple-mdns-server = hashicorp/mdns NewMDNSService + NewServer) --------------


def _zone(instance, service, host, port, ip):
    service_addr = "%s.local." % service.strip(".")
    instance_addr = "%s.%s" % (instance, service_addr)
    host = host if host.endswith(".") else host + "."

    def rr(name, rdtype, text):
        return dns.rrset.from_text(name, DEFAULT_TTL, dns.rdataclass.IN, rdtype, text)

    def instance_records(qtype):
        if qtype == dns.rdatatype.ANY:
            return instance_records(dns.rdatatype.SRV) + instance_records(dns.rdatatype.TXT)
        if qtype == dns.rdatatype.SRV:
            return [rr(instance_addr, dns.rdatatype.SRV, "10 1 %d %s" % (port, host))] + instance_records(dns.rdatatype.A)
        if qtype == dns.rdatatype.A:
            return [rr(host, dns.rdatatype.A, ip)]
        if qtype == dns.rdatatype.TXT:
            return [rr(instance_addr, dns.rdatatype.TXT, '"An instance of %s"' % service)]
        return []

    def records(question):
        name, qtype = question.name.to_text().lower(), question.rdtype
        if name == service_addr.lower() and qtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            return [rr(service_addr, dns.rdatatype.PTR, instance_addr)] + instance_records(dns.rdatatype.ANY)
        if name == instance_addr.lower():
            return instance_records(qtype)
        if name == host.lower() and qtype == dns.rdatatype.A:
            return instance_records(qtype)
        return []

    return records


def respond(instance, service, host, port, ip):
    records = _zone(instance, service, host, int(port), ip)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", MDNS_PORT))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton(ip)))
    print("ready", flush=True)
    while True:
        ready = select.select([sock, sys.stdin], [], [])[0]
        if sys.stdin in ready:
            return 0  # stdin closed: stop
        data, source = sock.recvfrom(65536)
        try:
            query = dns.message.from_wire(data)
        except Exception:  # not DNS: ignored, as server.go logs and drops it
            continue
        if query.flags & dns.flags.QR:
            continue
        multicast, unicast = [], []
        for question in query.question:
            found = records(question)
            (unicast if question.rdclass & 0x8000 else multicast).extend(found)
        for answers, id_ in ((multicast, 0), (unicast, query.id)):
            if not answers:
                continue
            response = dns.message.Message(id=id_)
            response.flags = dns.flags.QR | dns.flags.AA
            response.answer = answers
            sock.sendto(response.to_wire(), source)  # always unicast to the querier, from port 5353


if __name__ == "__main__":
    sys.exit({"respond": respond}[sys.argv[1]](*sys.argv[2:]))
