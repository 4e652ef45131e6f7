# -*- coding: utf-8 -*-
# Copyright (c) kairos.kcrypt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""mDNS discovery of a KMS named ``*.local`` (spec §7, checklist 47-49), on zeroconf.

Private to the collection. Two sides:

- ``Announcer`` — what upstream's simple-mdns-server does, for the challenger:
  instance = the OS host name, service ``_kcrypt._tcp.local.``, SRV target = the
  configured ``.local`` host name, one IPv4 A record, TXT ``An instance of <type>``.
  Legacy unicast queries (hashicorp/mdns ``Lookup``, the upstream client, asks from an
  ephemeral port) also get an answer with PTR, SRV, A and TXT in that order, which
  hashicorp's client needs to complete the entry (``_LegacyUnicastAnswerer``).
- ``resolve`` / ``resolve_url`` — what upstream's newest client does: browse
  ``_kcrypt._tcp.local.``, accept only an entry whose SRV target is ``<host>.``
  and that carries A, SRV and TXT records (IPv4 only); a non-``.local`` host fails
  at once, no answer fails after the timeout (no fallback to plain DNS).

Interfaces: like upstream, a node queries on every interface unless told
otherwise, so an upstream config with ``mdns: true`` finds its KMS on the LAN.
``kcrypt.challenger.mdns_interfaces`` (or ``$KCRYPT_MDNS_INTERFACES``, or
``--mdns-interfaces``) narrows it to interface names or IPv4 addresses; without
any of them the default is every interface (``all``), not 127.0.0.1. The project's
tests and scripts set ``KCRYPT_MDNS_INTERFACES=127.0.0.1`` so their queries never
leave the machine. The announcer has no default: it answers only
on the interfaces it is given, as simple-mdns-server does.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from ansible_collections.kairos.kcrypt.plugins.module_utils.common.deps import optional_import, require
from ansible_collections.kairos.kcrypt.plugins.module_utils.common.errors import KcryptError

# Lazy: every KMS client imports this module, and zeroconf costs ~0.1 s of CPU to import, which a
# fleet pays in every module run of every node; only a *.local server needs it.
zeroconf = optional_import("zeroconf", lazy=True)
ifaddr = optional_import("ifaddr", lazy=True)  # installed with zeroconf

SERVICE_TYPE = "_kcrypt._tcp"
DOMAIN = "local."
DEFAULT_TIMEOUT = 15.0  # upstream's MDNSTimeout
ALL_INTERFACES = "all"
DEFAULT_INTERFACES = (ALL_INTERFACES,)  # upstream queries every interface
ENV_INTERFACES = "KCRYPT_MDNS_INTERFACES"
# Upstream's texts (kcrypt/discovery/client/mdns.go); callers and tests match on them.
NOT_LOCAL_ERROR = 'domain should end in ".local" when using mdns'
NOT_FOUND_ERROR = "mDNS resolution failed: no mDNS server found for %s (searched for service type %s)"


class MDNSError(KcryptError):
    """mDNS resolution or announcement failed."""


def _require():
    require("zeroconf", "for mDNS discovery")


def full_service_type(service_type=SERVICE_TYPE):
    """``_kcrypt._tcp`` → ``_kcrypt._tcp.local.``"""
    service_type = service_type.rstrip(".")
    if service_type.endswith(".local"):
        service_type = service_type[: -len(".local")]
    return "%s.%s" % (service_type, DOMAIN)


def fqdn(name):
    """``kms.local`` → ``kms.local.`` (hashicorp/mdns ``dns.Fqdn``)."""
    return name if name.endswith(".") else name + "."


def split_interfaces(value):
    """A config/flag/env value (list or comma/space separated string) → list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return [str(item).strip() for item in value if str(item).strip()]


def configured_interfaces(value=None, environ=None):
    """The interfaces to use: ``value`` if given, else ``$KCRYPT_MDNS_INTERFACES``, else all (upstream)."""
    items = split_interfaces(value)
    if not items:
        items = split_interfaces((os.environ if environ is None else environ).get(ENV_INTERFACES, ""))
    return items or list(DEFAULT_INTERFACES)


def _adapters():
    require("ifaddr", "to look up network interface addresses")
    return {adapter.nice_name: adapter for adapter in ifaddr.get_adapters()}


def _ipv4_of(adapter):
    return [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]


def interface_addresses(interfaces=None):
    """IPv4 addresses for zeroconf's ``interfaces=``, from names (``eth0``) or addresses.

    Returns the list, or the string ``all`` when the caller explicitly asked for every
    interface. ``0.0.0.0`` and IPv6 are refused: the first would let the kernel pick,
    the second is ignored upstream.
    """
    items = configured_interfaces(interfaces)
    if ALL_INTERFACES in [item.lower() for item in items]:
        if len(items) > 1:
            raise MDNSError("mdns interfaces: %r cannot be combined with other interfaces" % ALL_INTERFACES)
        return ALL_INTERFACES
    addresses = []
    adapters = None
    for item in items:
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            address = None
        if address is not None:
            if address.version != 4 or address.is_unspecified:
                raise MDNSError("mdns interfaces: %s is not a usable IPv4 interface address" % item)
            found = [item]
        else:
            if adapters is None:
                adapters = _adapters()
            if item not in adapters:
                raise MDNSError(
                    "mdns interfaces: no network interface named %s (known: %s)" % (item, ", ".join(sorted(adapters)))
                )
            found = _ipv4_of(adapters[item])
            if not found:
                raise MDNSError("mdns interfaces: interface %s has no IPv4 address" % item)
        addresses.extend(address for address in found if address not in addresses)
    return addresses


def _zeroconf(interfaces):
    """A Zeroconf bound to ``interfaces`` (IPv4 only), running its own thread."""
    _require()
    addresses = interface_addresses(interfaces)
    choice = zeroconf.InterfaceChoice.All if addresses == ALL_INTERFACES else addresses
    try:
        return zeroconf.Zeroconf(interfaces=choice, ip_version=zeroconf.IPVersion.V4Only, use_asyncio=False)
    except OSError as error:
        raise MDNSError("cannot open mDNS sockets on %s: %s" % (addresses, error)) from None


MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
LEGACY_UNICAST_TTL = 10  # RFC 6762 §6.7: at most 10 s in answers to legacy unicast queries
_FLAGS_RESPONSE_AA = 0x8400


class _LegacyUnicastAnswerer:
    """Answers legacy unicast queries (source port not 5353: hashicorp/mdns ``Lookup``, i.e. every upstream
    Kairos client) for our service with PTR, SRV, A and TXT in that order, in the answer section.

    zeroconf answers them too, but orders the additional records by set iteration, so half the
    time the A record comes before the SRV one; hashicorp's client then files the address under the
    host name and never completes the entry. This second, ordered answer lets it complete (the SRV's
    alias persists across messages). Runs a thread on its own 5353 socket (SO_REUSEPORT, like
    zeroconf's), joined to the group on the announcer's interfaces.
    """

    def __init__(self, info, interface_ips):
        self.info = info
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(("", MDNS_PORT))
        for address in (["0.0.0.0"] if interface_ips == ALL_INTERFACES else interface_ips):
            membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(address)
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kcrypt-mdns-legacy-unicast", daemon=True)
        self._thread.start()

    def _answer(self, data):
        try:
            query = zeroconf.DNSIncoming(data)
        except Exception:  # not a DNS message: nothing to answer
            return None
        if not query.valid or not query.is_query():
            return None
        questions = [q for q in query.questions if q.name.lower() == self.info.type.lower() and q.type in (12, 255)]  # PTR, ANY
        if not questions:
            return None
        out = zeroconf.DNSOutgoing(_FLAGS_RESPONSE_AA, False, query.id)
        for question in questions:
            out.add_question(question)
        records = [self.info.dns_pointer(LEGACY_UNICAST_TTL), self.info.dns_service(LEGACY_UNICAST_TTL)]
        records += self.info.dns_addresses(LEGACY_UNICAST_TTL, zeroconf.IPVersion.V4Only)
        records.append(self.info.dns_text(LEGACY_UNICAST_TTL))
        for record in records:
            out.add_answer_at_time(record, 0)
        return out.packets()

    def _serve(self):
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(9000)
            except socket.timeout:
                continue
            except OSError:
                return
            if source[1] == MDNS_PORT:
                continue  # a full mDNS querier: zeroconf's multicast answer is for it
            for packet in self._answer(data) or ():
                try:
                    self.sock.sendto(packet, source)
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Announcer:
    """Announces a KMS the way upstream's simple-mdns-server does.

    ``host_name`` is the ``.local`` name nodes put in ``challenger_server``; ``port`` the
    challenger's port; ``addresses`` the IPv4 address(es) for the A record (default: the
    first address of ``interfaces``); ``interfaces`` where to answer (names or IPv4
    addresses; default ``addresses``). ``instance`` defaults to the OS host name.
    """

    def __init__(self, host_name="kms.local", port=8082, addresses=None, interfaces=None,
                 service_type=SERVICE_TYPE, instance=None):
        if not host_name or not host_name.rstrip(".").endswith(".local"):
            raise MDNSError("mDNS host name %r must end in .local" % (host_name,))
        if not isinstance(port, int) or not 0 < port < 65536:
            raise MDNSError("mDNS port must be an integer between 1 and 65535, got %r" % (port,))
        self.host_name = fqdn(host_name)
        self.port = port
        self.service_type = full_service_type(service_type)
        self.instance = instance or socket.gethostname()
        self.interfaces = split_interfaces(interfaces) or split_interfaces(addresses)
        if not self.interfaces:
            raise MDNSError("mDNS announcer: give the interfaces or the addresses to announce on")
        self.addresses = split_interfaces(addresses)
        self._zc = None
        self._info = None
        self._legacy = None

    @property
    def name(self):
        """The instance's full service name, e.g. ``node1._kcrypt._tcp.local.`` (as registered, once started)."""
        if self._info is not None:
            return self._info.name  # zeroconf renames the instance if another host uses the name
        return "%s.%s" % (self.instance, self.service_type)

    def _service_info(self, interface_ips):
        addresses = self.addresses or [interface_ips[0]]
        for address in addresses:
            try:
                if ipaddress.ip_address(address).version != 4:
                    raise ValueError
            except ValueError:
                raise MDNSError("mDNS announcer: %r is not an IPv4 address" % (address,)) from None
        # TXT exactly as hashicorp/mdns: one string "An instance of <service type>".
        txt = "An instance of %s" % self.service_type[: -len("." + DOMAIN)]
        return zeroconf.ServiceInfo(
            self.service_type,
            self.name,
            port=self.port,
            server=self.host_name,
            addresses=[socket.inet_aton(address) for address in addresses],
            properties={txt: None},
        )

    def start(self):
        _require()
        if self._zc is not None:
            return self
        interface_ips = interface_addresses(self.interfaces)
        if interface_ips == ALL_INTERFACES and not self.addresses:
            raise MDNSError("mDNS announcer: with interfaces 'all', give the address to announce")
        info = self._service_info(interface_ips)
        zc = _zeroconf(self.interfaces)
        try:
            zc.register_service(info, allow_name_change=True)
        except Exception as error:
            zc.close()
            raise MDNSError("cannot announce %s on mDNS: %s" % (self.name, error)) from None
        try:
            legacy = _LegacyUnicastAnswerer(info, interface_ips)
        except OSError as error:
            zc.unregister_service(info)
            zc.close()
            raise MDNSError("cannot answer legacy unicast mDNS queries on %s: %s" % (interface_ips, error)) from None
        self._zc, self._info, self._legacy = zc, info, legacy
        return self

    def stop(self):
        if self._zc is None:
            return
        try:
            self._legacy.close()
            self._zc.unregister_service(self._info)
        finally:
            self._zc.close()
            self._zc = self._info = self._legacy = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def check_local(host):
    """The host name without port, or MDNSError with upstream's text when it is not ``*.local``."""
    hostname = host.split(":")[0]
    if not hostname.rstrip(".").endswith(".local"):
        raise MDNSError(NOT_LOCAL_ERROR)
    return hostname.rstrip(".")


def resolve(host, timeout=DEFAULT_TIMEOUT, interfaces=None, service_type=SERVICE_TYPE, log=None):
    """(IPv4 address, port) of the ``_kcrypt._tcp`` instance whose SRV target is ``host``.

    ``host`` is a ``.local`` name, optionally with ``:port`` (ignored). Raises MDNSError
    with upstream's texts when the name is not ``.local`` or nothing answers in time.
    """
    hostname = check_local(host)
    expected = fqdn(hostname).lower()
    type_ = full_service_type(service_type)
    log = log or (lambda *args: None)
    zc = _zeroconf(interfaces)
    names = queue.Queue()
    wanted = (zeroconf.ServiceStateChange.Added, zeroconf.ServiceStateChange.Updated)

    # zeroconf calls handlers with these keyword names; it runs them on its own thread,
    # where blocking requests are not allowed, so only queue the name here.
    def on_change(zeroconf, service_type, name, state_change):  # noqa: ARG001
        if state_change in wanted:
            names.put(name)

    deadline = time.monotonic() + timeout
    browser = None
    try:
        browser = zeroconf.ServiceBrowser(zc, type_, handlers=[on_change])
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                name = names.get(timeout=remaining)
            except queue.Empty:
                break
            info = zeroconf.ServiceInfo(type_, name)
            remaining_ms = int(max(deadline - time.monotonic(), 0.1) * 1000)
            if not info.request(zc, min(remaining_ms, 3000)):
                log("mdns entry %s is incomplete (needs A, SRV and TXT records), ignored" % name)
                continue
            addresses = info.parsed_addresses(zeroconf.IPVersion.V4Only)
            if (info.server or "").lower() != expected:
                log("%s didn't match %s" % (info.server, fqdn(hostname)))
                continue
            if not addresses or not info.port:
                log("mdns entry %s has no IPv4 address or port, ignored" % name)
                continue
            log("%s matches %s" % (info.server, fqdn(hostname)))
            return addresses[0], info.port
    finally:
        if browser is not None:
            browser.cancel()
        zc.close()
    log("no reply from mdns after %ss timeout" % timeout)
    where = interface_addresses(interfaces)
    raise MDNSError(
        (NOT_FOUND_ERROR % (hostname, service_type))
        + " on interfaces %s (the mDNS interfaces setting chooses where to search)"
        % (where if where == ALL_INTERFACES else ", ".join(where))
    )


def url_host(url):
    """The ``host[:port]`` of a challenger URL (what upstream sends as the ``Host`` header)."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise MDNSError("challenger_server %r is not a URL (expected e.g. http://kms.local:8082)" % (url,))
    return parts.netloc.rsplit("@", 1)[-1]


def rewrite_url(url, ip, port):
    """``url`` with its host replaced by ``ip:port``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, "%s:%d" % (ip, port), parts.path, parts.query, parts.fragment))


def resolve_url(url, timeout=DEFAULT_TIMEOUT, interfaces=None, log=None):
    """Upstream's queryMDNS: (URL with host replaced by ``ip:port``, {"Host": original host[:port]}).

    TLS then verifies against the IP, so a KMS certificate needs an IP SAN (as upstream).
    """
    host = url_host(url)
    ip, port = resolve(host, timeout=timeout, interfaces=interfaces, log=log)
    return rewrite_url(url, ip, port), {"Host": host}
