"""Fetch images by URI, only where the operator allows, with SSRF guards.

``file://`` URIs are read only below the roots the operator names; the path is
resolved (symlinks and ``..`` included) before it is checked, and the resolved
path is what is opened. ``https://`` URIs are fetched only for allowed domains;
every address the name resolves to must be public (or private only where the
operator allows it for internal hosts; link-local and cloud metadata addresses
never), the connection goes to the address that was checked, every redirect is
checked again, and the body is capped in bytes and time.

Everything here is synchronous: it runs in the preprocessing pool.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore
import httpx

from clipvision.server.errors import InvalidImageError, Reason, UriRefusedError

REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class FetchPolicy:
    """What the operator allows the server to read by URI; nothing by default."""

    file_roots: tuple[Path, ...] = ()
    fetch_domains: tuple[str, ...] = ()
    allow_http: bool = False
    allow_private_addresses: bool = False
    timeout_s: float = 10.0
    max_redirects: int = 3

    @property
    def fetching(self) -> bool:
        """True when http(s) URIs may be fetched at all."""
        return bool(self.fetch_domains)


def read_file_uri(uri: str, policy: FetchPolicy, max_bytes: int) -> bytes:
    """Read a ``file://`` URI below an allowed root, at most ``max_bytes``."""
    if not policy.file_roots:
        raise _scheme_refused("file")
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UriRefusedError(
            Reason.URI_PATH_REFUSED, "file:// URIs must name a local path (file:///path)."
        )
    # realpath resolves symlinks and "..", so the check sees where the file really is.
    real = Path(os.path.realpath(unquote(parts.path)))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in policy.file_roots):
        raise UriRefusedError(
            Reason.URI_PATH_REFUSED,
            "The file is outside the directories this server may read; ask the operator "
            "which roots are allowed.",
        )
    try:
        # O_NOFOLLOW: the resolved path's last component may not have become a link since.
        descriptor = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise InvalidImageError(
            Reason.URI_UNREADABLE, "The file named by the URI does not exist or cannot be read."
        ) from exc
    with os.fdopen(descriptor, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        return file.read(max_bytes + 1)


class UriFetcher:
    """Fetches ``http(s)://`` image URIs under a FetchPolicy; one per server, thread-safe."""

    def __init__(self, policy: FetchPolicy, max_bytes: int) -> None:
        self._policy = policy
        self._max_bytes = max_bytes
        self._client = httpx.Client(
            transport=_GuardedTransport(self._check_address),
            timeout=httpx.Timeout(policy.timeout_s),
            follow_redirects=False,  # each hop is checked here instead
            trust_env=False,  # a proxy from the environment would bypass the address checks
            headers={"User-Agent": "clipvision"},
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    def fetch(self, uri: str) -> bytes:
        """Fetch one image, following at most ``max_redirects`` checked redirects."""
        deadline = time.monotonic() + self._policy.timeout_s
        url = uri
        for _ in range(self._policy.max_redirects + 1):
            self._check_url(url)
            try:
                with self._client.stream("GET", url) as response:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise InvalidImageError(
                            Reason.URI_UNREADABLE,
                            f"Fetching the image URI returned HTTP {response.status_code}.",
                        )
                    return self._read_body(response, deadline)
            except httpx.TimeoutException as exc:
                raise _fetch_timeout(self._policy.timeout_s) from exc
            except httpx.HTTPError as exc:
                # A refused address raises UriRefusedError itself, which is no HTTPError.
                raise InvalidImageError(
                    Reason.URI_UNREADABLE, "The image URI could not be fetched."
                ) from exc
        raise InvalidImageError(
            Reason.URI_UNREADABLE,
            f"The image URI redirected more than {self._policy.max_redirects} times.",
        )

    def _read_body(self, response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise _too_large(int(declared), self._max_bytes)
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > self._max_bytes:
                raise _too_large(len(body), self._max_bytes)
            if time.monotonic() > deadline:
                raise _fetch_timeout(self._policy.timeout_s)
        return bytes(body)

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http") or (scheme == "http" and not self._policy.allow_http):
            raise UriRefusedError(
                Reason.URI_SCHEME_REFUSED,
                f"{scheme}:// URIs are not fetched by this server; use https://.",
            )
        host = (parts.hostname or "").lower().rstrip(".")
        if not host or not _domain_allowed(host, self._policy.fetch_domains):
            raise UriRefusedError(
                Reason.URI_HOST_REFUSED,
                f"The host {host[:100]!r} is not on this server's list of allowed domains.",
            )

    def _check_address(self, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        for candidate in (ip, embedded) if embedded else (ip,):
            if candidate.is_link_local or candidate.is_unspecified or candidate.is_multicast:
                raise _address_refused()
            if not candidate.is_global and not (
                self._policy.allow_private_addresses
                and (candidate.is_private or candidate.is_loopback)
            ):
                raise _address_refused()


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _domain_allowed(host: str, allowed: Iterable[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself, checks every address, and connects to a checked one."""

    def __init__(self, check: Any) -> None:
        self._check = check

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        addresses = [str(info[4][0]) for info in infos]
        # Every address must pass: a name that also resolves to an internal
        # address is refused even if its first answer is public (DNS rebinding).
        for address in addresses:
            self._check(address)
        return super().connect_tcp(addresses[0], port, timeout, local_address, socket_options)


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with the connection pool built on the guarded backend.

    httpx offers no hook for the network backend, so the pool is replaced; TLS
    still verifies the certificate against the URL's host name.
    """

    def __init__(self, check: Any) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=32,
            max_keepalive_connections=8,
            network_backend=_GuardedBackend(check),
        )


def _scheme_refused(scheme: str) -> UriRefusedError:
    return UriRefusedError(
        Reason.URI_SCHEME_REFUSED,
        f"{scheme}:// image URIs are not enabled on this server; send the image bytes in "
        "Image.content or as a data: URI.",
    )


def _address_refused() -> UriRefusedError:
    return UriRefusedError(
        Reason.URI_ADDRESS_REFUSED,
        "The image URI's host resolves to an internal address, which this server does not fetch.",
    )


def _too_large(size: int, limit: int) -> InvalidImageError:
    return InvalidImageError(
        Reason.IMAGE_TOO_LARGE,
        f"The image is at least {size} bytes; the limit is {limit} bytes.",
    )


def _fetch_timeout(seconds: float) -> InvalidImageError:
    return InvalidImageError(
        Reason.URI_UNREADABLE, f"Fetching the image URI took longer than {seconds:g} s."
    )
