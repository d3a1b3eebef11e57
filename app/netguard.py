"""SSRF guard: endpoint URLs may not reach loopback, private, link-local or metadata addresses.

Checked twice: when an endpoint is registered (clear error for the operator) and on every connection
(`GuardedResolver`), because DNS can change after registration. The resolver hands aiohttp exactly
the addresses it checked, so a rebinding DNS answer cannot switch the target between check and
connect. IP-literal hosts bypass aiohttp's resolver, so `check_literal_host` covers those.

A host is judged by the address the C library makes of it: `inet_aton` also reads `2130706433`,
`0177.0.0.1`, `127.1`, `0x7f.1` and `0x7f000001` as 127.0.0.1, so every such spelling is normalised
to its dotted quad before the verdict (`ipv4_spelling`). Registration refuses non-canonical spellings
outright (aiohttp >= 3.14.1 refuses the decimal ones at connect time anyway).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS/GCP/Azure/OpenStack instance metadata
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6 metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud metadata
}


_ATON_CHARS = re.compile(r"^[0-9][0-9a-fA-FxX.]*$")


def ipv4_spelling(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host names in any spelling `inet_aton` accepts (1 to 4 parts, each
    decimal, 0-octal or 0x-hex), or None for a name."""
    if not _ATON_CHARS.match(host):  # also keeps inet_aton's "trailing junk after a space" away
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class ForbiddenTarget(OSError):
    """The URL resolves to an address that endpoints may not reach."""


def _unwrap(ip: IPAddress) -> IPAddress:
    # ::ffff:127.0.0.1, 64:ff9b::/96 NAT64 and 6to4 embed an IPv4 address: judge the embedded one.
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def forbidden_reason(ip_text: str) -> str | None:
    """Why an address may not be a webhook target, or None if it is a public address."""
    try:
        ip = _unwrap(ipaddress.ip_address(ip_text.split("%", 1)[0]))
    except ValueError:
        return "not an IP address"
    if ip in _METADATA:
        return "cloud metadata address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_private:
        return "private address"
    # fec0::/10: deprecated, but still routed inside some sites, and not flagged private by ipaddress.
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "non-public address"
    return None


def check_literal_host(host: str, allow_private: bool) -> None:
    if why := _literal_verdict(host, allow_private):
        raise ForbiddenTarget(why)


@functools.lru_cache(maxsize=4096)
def _literal_verdict(host: str, allow_private: bool) -> str | None:
    # Called before every request with the same few hosts: the verdict is a pure function of them.
    host = host.strip("[]")
    v4 = ipv4_spelling(host)
    if v4 is not None and str(v4) != host:
        if not allow_private and (why := forbidden_reason(str(v4))):
            return f"{host} (= {v4}) is a {why}"
        return None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: the resolver checks it at connect time
    if not allow_private and (why := forbidden_reason(host)):
        return f"{host} is a {why}"
    return None


def validate_url(
    url: str, allow_private: bool, resolve: bool = True, allowed: frozenset[str] = frozenset()
) -> str:
    """Operator-facing check of an endpoint URL; returns it normalised or raises ValueError."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url: {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"url: {url!r} has no host")
    if parts.username or parts.password:
        raise ValueError("url: credentials in the URL are not allowed; use the signature to authenticate")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"url: bad port in {url!r}") from exc
    v4 = ipv4_spelling(parts.hostname)
    if v4 is not None and str(v4) != parts.hostname and not allow_private:
        if why := forbidden_reason(str(v4)):
            raise ValueError(
                f"url: {parts.hostname} (= {v4}) is a {why}; "
                "set WEBHOOKS_ALLOW_PRIVATE_TARGETS=true for local development"
            )
    if v4 is not None and str(v4) != parts.hostname:
        raise ValueError(f"url: {parts.hostname} is a non-standard spelling of {v4}; write {v4}")
    if allow_private or target_allowed(parts.hostname, parts.port or _PORTS[parts.scheme], allowed):
        return url
    try:
        check_literal_host(parts.hostname, allow_private)
    except ForbiddenTarget as exc:
        raise ValueError(
            f"url: {exc}; set WEBHOOKS_ALLOW_PRIVATE_TARGETS=true for local development"
        ) from exc
    if resolve:
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"url: cannot resolve {parts.hostname}: {exc.strerror}") from exc
        for info in infos:
            addr = str(info[4][0])
            if why := forbidden_reason(addr):
                raise ValueError(
                    f"url: {parts.hostname} resolves to {addr}, a {why}; "
                    "set WEBHOOKS_ALLOW_PRIVATE_TARGETS=true for local development"
                )
    return url


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses a host if any of its addresses is forbidden."""

    def __init__(self, allow_private: bool = False, allowed: frozenset[str] = frozenset()) -> None:
        self.allow_private = allow_private
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host}: {exc.strerror}") from exc
        out: list[ResolveResult] = []
        allow = self.allow_private or target_allowed(host, port, self.allowed)
        for fam, _, proto, _, sockaddr in infos:
            addr = str(sockaddr[0])
            if not allow and (why := forbidden_reason(addr)):
                raise ForbiddenTarget(f"{host} resolves to a {why}")
            out.append(
                ResolveResult(
                    hostname=host,
                    host=addr,
                    port=int(sockaddr[1]),
                    family=fam,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not out:
            raise OSError(f"cannot resolve {host}: no address")
        return out

    async def close(self) -> None:
        return None


# ---- WEBHOOKS_ALLOWED_TARGETS: named host:port pairs that may be private (a local receiver, a sidecar)
_PORTS = {"http": 80, "https": 443}


def target_key(host: str, port: int) -> str:
    """Canonical 'host:port' (IPv6 in brackets, IP literals in their standard spelling)."""
    host = host.strip().strip("[]").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_allowed_targets(text: str) -> frozenset[str]:
    """'127.0.0.1:8000,[::1]:9000,hooks.internal:443' -> canonical keys; ValueError names a bad entry."""
    out = set()
    for entry in (x.strip() for x in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port (write IPv6 as [::1]:8000)")
        out.add(target_key(host, int(port)))
    return frozenset(out)


def target_allowed(host: str | None, port: int | None, allowed: frozenset[str]) -> bool:
    """True if host:port is one the operator named: the guard lets it through even if private.
    Exactly that port: an allowed receiver does not open the rest of its host."""
    return bool(allowed) and host is not None and port is not None and target_key(host, port) in allowed
