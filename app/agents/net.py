"""Where agents may connect: public addresses only, unless the operator opts in.

An agent's webhook ``url`` or openai ``base_url`` is chosen by a tenant, so without a check
the server would make requests on their behalf to its own loopback, the private network or a
cloud metadata service (SSRF). The rules:

* A host that is numeric in any notation (``127.1``, ``2130706433``, ``0x7f000001``,
  ``0177.0.0.1``, ``[::ffff:127.0.0.1]``, with or without a trailing dot or an IPv6 zone id) is
  parsed here, the way ``inet_aton`` and the WHATWG URL parser read it, and is never handed to
  DNS. ``localhost`` and ``*.localhost`` are loopback by definition.
* Such hosts are refused when an agent is saved (``check_url``), and again at request time.
* A host name is resolved at request time, every address it resolves to is checked, and the
  connection goes to a checked address (``SafeSession``): there is no second lookup for DNS
  rebinding to exploit. TLS still verifies the certificate against the name (and sends it as
  SNI), because only the socket is opened by address.

``AGENT_ALLOW_PRIVATE_NETWORKS=1`` lifts the address rule (a local Ollama, a webhook on the
same host); the other rules (no redirects, no proxies from the environment) stay.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Iterable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Ranges refused on top of what ``ipaddress`` calls non-global (belt and braces: the
#: library's tables have changed between Python versions).
_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)]
#: IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class DestinationRefused(Exception):
    """An agent tried to reach an address the server does not connect to."""


class InvalidHost(ValueError):
    """A host that looks numeric but is no valid address (refused, never resolved)."""


def _ipv4_part(text: str) -> int:
    if text[:2].lower() == "0x":
        return int(text[2:] or "0", 16)
    if len(text) > 1 and text.startswith("0"):
        if not all(c in "01234567" for c in text):
            raise InvalidHost(f"{text!r} is not an octal number")
        return int(text, 8)
    return int(text, 10)


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host stands for, in any inet_aton notation, or None when
    the host is a name. A host whose last label is a number is numeric (the WHATWG rule):
    if it is not a valid address it raises InvalidHost rather than going to DNS."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing dot: "127.0.0.1."
    if not parts or not _NUMBER.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMBER.match(p) for p in parts):
        raise InvalidHost(f"{host!r} is not a valid IPv4 address")
    numbers = [_ipv4_part(p) for p in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise InvalidHost(f"{host!r} is not a valid IPv4 address")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def parse_host(host: str) -> Address | None:
    """The address a URL's host is, if it is an IP literal in any notation; None for a name.

    ``host`` is the URL's host without userinfo or port; IPv6 may come with or without
    brackets and with a zone id (``fe80::1%eth0``, ``%25`` encoded or not)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        literal = re.split("%", host, maxsplit=1)[0]  # a zone id says which interface, not where
        try:
            return ipaddress.IPv6Address(literal)
        except ValueError:
            raise InvalidHost(f"{host!r} is not a valid IPv6 address") from None
    return parse_ipv4(host)


def is_local_name(host: str) -> bool:
    """``localhost`` and its subdomains (RFC 6761), trailing dot or not."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """Whether an agent may connect to ``address`` without the private-networks opt-in."""
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(address.compressed.split("%")[0])  # drop a scope id
        inner = _embedded_ipv4(address)
        if inner is not None and not is_public(inner):
            return False
        if address.ipv4_mapped is not None:
            return True  # the mapped IPv4 address was public
    if (address.is_private or address.is_loopback or address.is_link_local
            or address.is_multicast or address.is_reserved or address.is_unspecified
            or not address.is_global):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return False
    return not any(address in network for network in _BLOCKED
                   if network.version == address.version)


def url_host(url: str) -> str:
    """The host of a URL, without userinfo, port or brackets (``""`` if it has none)."""
    netloc = urlsplit(url).netloc
    host = netloc.rpartition("@")[2]  # userinfo: "user@127.0.0.1" goes to 127.0.0.1
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def check_url(url: str, allow_private: bool) -> None:
    """At save time: ValueError when the URL's host is a refused literal or ``localhost``.
    Host names are not resolved here; they are checked on every request."""
    host = url_host(url)
    if not host:
        raise ValueError("The URL has no host.")
    try:
        address = parse_host(host)
    except InvalidHost:
        raise ValueError("The URL's host is not a valid address.") from None
    if allow_private:
        return
    if is_local_name(host) or (address is not None and not is_public(address)):
        raise ValueError("Destination not allowed: agents may only reach public addresses "
                         "(the operator can allow private networks with "
                         "AGENT_ALLOW_PRIVATE_NETWORKS=1).")


def resolve(host: str, port: int, allow_private: bool) -> list[tuple]:
    """The addresses to connect to for ``host``, every one of them checked.

    Returns ``getaddrinfo``-style tuples. A numeric host is parsed here and never looked up.
    Raises DestinationRefused if any address is refused (a name that resolves to a public and
    a private address is refused as a whole), socket.gaierror if the name does not resolve."""
    try:
        literal = parse_host(host)
    except InvalidHost:
        raise DestinationRefused(host) from None
    if literal is None and is_local_name(host) and not allow_private:
        raise DestinationRefused(host)
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                  (str(literal), port) if family == socket.AF_INET else (str(literal), port, 0, 0))]
    else:
        infos = socket.getaddrinfo(host.rstrip("."), port, 0, socket.SOCK_STREAM)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    if not allow_private:
        for info in infos:
            if not is_public(ipaddress.ip_address(info[4][0].split("%")[0])):
                raise DestinationRefused(host)
    return infos


def _connect(infos: Iterable[tuple], timeout, source_address, socket_options) -> socket.socket:
    """Connect to the first address that answers (all of them already checked)."""
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if isinstance(timeout, (int, float)):  # not urllib3's "default" sentinel
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as exc:
            error = exc
            if sock is not None:
                sock.close()
    raise error or OSError("could not connect")


class _CheckedConnectionMixin:
    """``_new_conn`` that resolves once, checks every address, and connects to one of them."""

    allow_private = False

    def _new_conn(self) -> socket.socket:
        try:
            infos = resolve(self._dns_host, self.port, self.allow_private)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        try:
            return _connect(infos, self.timeout, self.source_address, self.socket_options)
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out.") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") \
                from exc


def _classes(allow_private: bool):
    http_conn = type("CheckedHTTPConnection", (_CheckedConnectionMixin, HTTPConnection),
                     {"allow_private": allow_private})
    https_conn = type("CheckedHTTPSConnection", (_CheckedConnectionMixin, HTTPSConnection),
                      {"allow_private": allow_private})
    http_pool = type("CheckedHTTPConnectionPool", (HTTPConnectionPool,),
                     {"ConnectionCls": http_conn})
    https_pool = type("CheckedHTTPSConnectionPool", (HTTPSConnectionPool,),
                      {"ConnectionCls": https_conn})
    return {"http": http_pool, "https": https_pool}


_POOLS = {True: _classes(True), False: _classes(False)}


class CheckedAdapter(HTTPAdapter):
    """A requests adapter whose connections go only to checked addresses."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS[self.allow_private])


def session(allow_private: bool) -> requests.Session:
    """A requests Session for agent traffic: checked destinations, no proxies from the
    environment (a proxy would connect on our behalf, unchecked). Callers pass
    ``allow_redirects=False``: a redirect's target would not be checked before the request."""
    result = requests.Session()
    result.trust_env = False
    # trust_env also dropped the CA bundle settings, which are harmless: keep them.
    result.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") \
        or True
    adapter = CheckedAdapter(allow_private)
    result.mount("http://", adapter)
    result.mount("https://", adapter)
    return result
