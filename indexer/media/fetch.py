"""Fetching media a client names by URL (HMA's ``url=`` parameters), behind an allow-list. A server that
downloads what a client names can be turned against the network it sits in, so:

- fetching is off until the allow-list (setting ``fetch_allow``) names something: hosts (``cdn.example.com``),
  a host's subdomains (``*.example.com``), URL prefixes (``https://media.example.com/uploads/``), addresses
  or networks (``127.0.0.1``, ``10.2.0.0/16``);
- the host is resolved once and the connection goes to that address (no second lookup to rebind); an
  address that is loopback, private, link-local (cloud metadata services live there), multicast, reserved
  or unspecified is refused unless the allow-list names that address or its network;
- only http and https, no credentials in the URL; redirects are followed by hand, each one checked as the
  first URL was, at most ``MAX_REDIRECTS``;
- the answer must be 200 with an image or video type (or octet-stream: the decoder reads the bytes, never
  the type); the body is capped in bytes (a larger Content-Length is refused before reading) and the whole
  fetch in wall time (a slow drip fails at the deadline).

What comes back is bytes: the decode budget applies to them exactly as to an upload."""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit

import urllib3

from indexer.errors import FetchError

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
TYPES = ("image/", "video/", "application/octet-stream")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str]            # exact host names (lower case)
    suffixes: tuple[str, ...]        # ".example.com" for "*.example.com"
    prefixes: tuple[str, ...]        # URL prefixes, scheme and host lower case
    networks: tuple[Network, ...]    # addresses and networks named

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> AllowList:
        hosts: set[str] = set()
        suffixes, prefixes, networks = [], [], []
        for raw in (e.strip() for e in entries):
            if not raw:
                continue
            if "://" in raw:
                u = urlsplit(raw)
                if u.scheme not in ("http", "https") or not u.hostname:
                    raise ValueError(f"fetch_allow: {raw!r} is not an http(s) URL prefix")
                prefixes.append(f"{u.scheme}://{u.netloc.lower()}{u.path or '/'}")
                continue
            try:
                networks.append(ipaddress.ip_network(raw, strict=False))
                continue
            except ValueError:
                pass
            if raw.startswith("*."):
                suffixes.append(raw[1:].lower())
            else:
                hosts.add(raw.lower())
        return cls(frozenset(hosts), tuple(suffixes), tuple(prefixes), tuple(networks))

    @property
    def on(self) -> bool:
        return bool(self.hosts or self.suffixes or self.prefixes or self.networks)

    def names_url(self, url: str, host: str) -> bool:
        """Does the list name this URL (its host, a suffix of it, a prefix of it, or its literal address)?"""
        if host in self.hosts or any(host.endswith(s) for s in self.suffixes):
            return True
        u = urlsplit(url)
        norm = f"{u.scheme}://{u.netloc.lower()}{u.path or '/'}"
        if any(norm.startswith(p) for p in self.prefixes):
            return True
        try:
            return self.names_address(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            return False

    def names_address(self, addr: Address) -> bool:
        return any(addr in n for n in self.networks)


@dataclass(frozen=True)
class FetchPolicy:
    allow: AllowList
    max_bytes: int
    timeout: float  # seconds for the whole fetch, redirects included


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # after redirects


def _inner(addr: Address) -> bool:
    """Addresses a fetch must not reach unless the allow-list names them."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return _inner(addr.ipv4_mapped)
    return (addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_multicast or addr.is_reserved
            or addr.is_unspecified or not addr.is_global)


def check_url(url: object) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL flagmatch may consider fetching; FetchError otherwise."""
    if not isinstance(url, str) or not url:
        raise FetchError("url must be an http(s) URL", code="fetch_invalid")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise FetchError("url is not a well-formed URL (bad host or port)", code="fetch_invalid") from None
    if u.scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs are fetched, not {u.scheme or 'a URL without a scheme'}",
                         code="fetch_invalid")
    if not u.hostname:
        raise FetchError("url names no host", code="fetch_invalid")
    if u.username is not None or u.password is not None:
        raise FetchError("a URL with credentials in it is not fetched", code="fetch_invalid")
    return u.scheme, u.hostname.lower(), port or (443 if u.scheme == "https" else 80)


def _resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve {host}: {exc}", code="fetch_failed") from None
    return [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _pick(url: str, host: str, port: int, allow: AllowList,
          resolve: Callable[[str, int], list[Address]]) -> Address:
    if not allow.names_url(url, host):
        raise FetchError(f"{host} is not on the fetch allow-list (setting fetch_allow)", code="fetch_refused")
    addrs = resolve(host, port)
    if not addrs:
        raise FetchError(f"{host} resolves to no address", code="fetch_failed")
    literal = _literal(host)
    for a in addrs:  # every address the name gives must be fit: a mixed answer is how rebinding starts
        if _inner(a) and not allow.names_address(a) and a != literal:  # a URL written with the address names it
            raise FetchError(f"{host} resolves to {a}, an internal address the allow-list does not name",
                             code="fetch_refused")
    return addrs[0]


def fetch(url: str, policy: FetchPolicy, *,
          resolve: Callable[[str, int], list[Address]] = _resolve) -> Fetched:
    """The bytes at ``url`` under ``policy``; FetchError (with its code) when refused or failed."""
    if not policy.allow.on:
        raise FetchError("this server does not fetch URLs (setting fetch_allow is empty): upload the file instead",
                         code="fetch_off")
    deadline = time.monotonic() + policy.timeout
    for _hop in range(MAX_REDIRECTS + 1):
        scheme, host, port = check_url(url)
        addr = _pick(url, host, port, policy.allow, resolve)
        resp = _get(url, scheme, host, port, addr, deadline)
        try:
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.headers.get("Location")
                if not loc:
                    raise FetchError(f"redirect {resp.status} without a Location", code="fetch_failed")
                url = urljoin(url, loc)
                continue
            if resp.status != 200:
                raise FetchError(f"the URL answered HTTP {resp.status}", code="fetch_failed")
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if not ctype.startswith(TYPES):
                raise FetchError(f"the URL's content type {ctype or '(none)'} is not an image or video",
                                 code="fetch_not_media")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError(f"Content too large: {length} bytes (at most {policy.max_bytes})",
                                 code="fetch_too_large")
            return Fetched(_body(resp, policy.max_bytes, deadline), ctype, url)
        finally:
            resp.release_conn()
            resp.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects", code="fetch_failed")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("the URL took too long to answer (setting fetch_timeout)", code="fetch_timeout")
    return left


def _get(url: str, scheme: str, host: str, port: int, addr: Address, deadline: float) -> urllib3.BaseHTTPResponse:
    u = urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    left = _remaining(deadline)
    timeout = urllib3.Timeout(connect=left, read=left)
    pool: urllib3.HTTPConnectionPool
    if scheme == "https":
        pool = urllib3.HTTPSConnectionPool(str(addr), port, server_hostname=host, assert_hostname=host,
                                           timeout=timeout, retries=False, maxsize=1)
    else:
        pool = urllib3.HTTPConnectionPool(str(addr), port, timeout=timeout, retries=False, maxsize=1)
    hostport = host if port in (80, 443) else f"{host}:{port}"
    try:
        return pool.urlopen("GET", path, headers={"Host": hostport, "User-Agent": "flagmatch",
                                                  "Accept": "image/*, video/*"},
                            redirect=False, preload_content=False, retries=False, timeout=timeout)
    except urllib3.exceptions.TimeoutError:
        raise FetchError("the URL took too long to answer (setting fetch_timeout)", code="fetch_timeout") from None
    except urllib3.exceptions.HTTPError as exc:
        raise FetchError(f"cannot fetch the URL: {type(exc).__name__}", code="fetch_failed") from None


def _body(resp: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """The body, capped; each read returns what has arrived (a read waits at most the time left when the
    request was sent, its read timeout), so a slow drip is caught at the deadline between reads."""
    parts: list[bytes] = []
    got = 0
    while True:
        _remaining(deadline)
        try:
            chunk = resp.read1(CHUNK)  # what is there, not a full chunk: a slow drip meets the deadline
        except (urllib3.exceptions.TimeoutError, socket.timeout):
            raise FetchError("the URL took too long to answer (setting fetch_timeout)", code="fetch_timeout") \
                from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"the URL's body could not be read: {type(exc).__name__}", code="fetch_failed") \
                from None
        if not chunk:
            return b"".join(parts)
        got += len(chunk)
        if got > max_bytes:
            raise FetchError(f"Content too large: over {max_bytes} bytes", code="fetch_too_large")
        parts.append(chunk)
