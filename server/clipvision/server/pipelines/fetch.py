"""Fetch images by URI, only where the operator allows, with SSRF guards.

``file://`` URIs are read only below the roots the operator names; the path is
resolved (symlinks and ``..`` included) before it is checked, the resolved path
is what is opened, without blocking and without following a last symlink, and
only a regular file is read (a FIFO, device, directory or socket is refused).
``https://`` URIs are parsed strictly (anything ambiguous is refused before a
lookup) and fetched only for allowed domains, on the event loop: every address
the name resolves to must be public (or private only where the operator allows
it for internal hosts; link-local and cloud metadata addresses never), the
connection goes to an address that was checked, every redirect is checked
again, and one deadline covers the whole fetch: connect, headers and body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import httpcore
import httpx

from clipvision.server.config.limits import FetchPolicy
from clipvision.server.errors import InvalidImageError, Reason, UriRefusedError

logger = logging.getLogger(__name__)

REDIRECTS = {301, 302, 303, 307, 308}
# Longer URIs than this (other than data: URIs) are refused unparsed; real image
# URLs are far shorter, and parsers disagree most on pathological input.
MAX_URI_CHARS = 8192
# Control characters, space, backslash: browsers and httpx disagree on what
# they mean (a backslash is a slash to one and part of the userinfo to the other).
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]|%00")
# A DNS label after IDNA encoding. Underscores are not valid in host names but
# occur in real DNS names and resolve unambiguously.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# A host whose last label is a number is an IPv4 literal to URL parsers and to
# inet_aton (0177.0.0.1, 0x7f.1, 2130706433, 127.1 all mean 127.0.0.1).
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


def check_uri_text(uri: str) -> None:
    """Refuse a (non-data:) URI that is over-long or holds characters parsers disagree on."""
    if len(uri) > MAX_URI_CHARS:
        raise _invalid(f"The image URI is longer than {MAX_URI_CHARS} characters.")
    unsafe = _UNSAFE_CHARACTERS.search(uri)
    if unsafe is not None:
        raise _invalid(
            f"The image URI holds {unsafe.group()!r} at position {unsafe.start()}; "
            "percent-encode spaces, and control characters and NUL are not allowed."
        )


# -- file:// ---------------------------------------------------------------------


def read_file_uri(uri: str, policy: FetchPolicy, max_bytes: int) -> bytes:
    """Read a regular file named by a ``file://`` URI below an allowed root, at most ``max_bytes``.

    Blocking (file system calls) but never indefinitely: run it in a worker thread.
    """
    if not policy.file_roots:
        raise _scheme_refused("file")
    check_uri_text(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UriRefusedError(
            Reason.URI_PATH_REFUSED, "file:// URIs must name a local path (file:///path)."
        )
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise _invalid("A file:// URI has no query or fragment; percent-encode '?' and '#'.")
    raw = unquote_to_bytes(parts.path)
    if not raw.startswith(b"/"):
        raise _invalid("A file:// URI must name an absolute path (file:///path).")
    if b"\0" in raw:
        raise _invalid("The file:// URI's path holds a NUL byte.")
    # realpath resolves symlinks and "..", so the check sees where the file really is.
    real = Path(os.path.realpath(os.fsdecode(raw)))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in policy.file_roots):
        raise UriRefusedError(
            Reason.URI_PATH_REFUSED,
            "The file is outside the directories this server may read; ask the operator "
            "which roots are allowed.",
        )
    try:
        # Looked at before opening: opening some devices has effects of its own.
        _require_regular(os.stat(real).st_mode)
        # O_NONBLOCK: a FIFO swapped in since cannot block the open; O_NOFOLLOW: nor a
        # symlink; the descriptor's own fstat below is what decides.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(real, flags)
    except OSError as exc:
        raise _unreadable(exc) from exc
    try:
        status = os.fstat(descriptor)
        _require_regular(status.st_mode)
        if status.st_size > max_bytes:
            raise _too_large(status.st_size, max_bytes)
        return _read_at_most(descriptor, status.st_size, max_bytes)
    except OSError as exc:
        raise _unreadable(exc) from exc
    finally:
        os.close(descriptor)


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "no regular file")
    raise InvalidImageError(
        Reason.URI_NOT_A_FILE,
        f"The file:// URI names {kind}; only regular files are read.",
    )


def _read_at_most(descriptor: int, size: int, max_bytes: int) -> bytes:
    """The file's bytes; a file that grew past ``max_bytes`` since its fstat is refused."""
    # One read of the size fstat gave, plus a byte to see growth: no second copy to join.
    chunks = [os.read(descriptor, size + 1)]
    total = len(chunks[0])
    while total > size and total <= max_bytes:  # it grew: read on, up to the limit
        chunk = os.read(descriptor, min(max_bytes + 1 - total, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise _too_large(total, max_bytes)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# -- http(s):// -------------------------------------------------------------------


def check_fetch_url(url: str, policy: FetchPolicy) -> httpx.URL:
    """Parse an http(s) URL strictly and check it against the policy; what may be fetched.

    Anything a URL parser could read two ways is refused as URI_INVALID before
    any lookup: userinfo, bad ports, IPv6 zone ids, IPv4 literals other than
    plain dotted quads, host names that are not valid (IDNA) DNS names.
    """
    check_uri_text(url)
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()
        parsed.host  # noqa: B018 - decodes the IDNA labels, which raises here rather than later
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise _invalid(f"The image URI is not a valid URL ({str(exc)[:200]}).") from exc
    scheme = parsed.scheme
    if scheme not in ("https", "http") or (scheme == "http" and not policy.allow_http):
        raise UriRefusedError(
            Reason.URI_SCHEME_REFUSED,
            f"{scheme}:// URIs are not fetched by this server; use https://.",
        )
    if "@" in _authority(url):
        raise _invalid("Image URLs with credentials (user@host) are not fetched.")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise _invalid(f"The image URL's port {parsed.port} is not between 1 and 65535.")
    _check_host(host)
    if not _domain_allowed(host.rstrip("."), policy.fetch_domains):
        raise UriRefusedError(
            Reason.URI_HOST_REFUSED,
            f"The host {host[:100]!r} is not on this server's list of allowed domains.",
        )
    return parsed


def _authority(url: str) -> str:
    after = url.split("//", 1)[1] if "//" in url else ""
    return re.split(r"[/?#]", after, maxsplit=1)[0]


def _check_host(host: str) -> None:
    if not host:
        raise _invalid("The image URL names no host.")
    if ":" in host:
        # An IPv6 literal (httpx has dropped the brackets); a zone id names a local interface.
        try:
            if "%" in host:
                raise ValueError("zone id")
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise _invalid("The image URL's IPv6 address is not valid (zone ids are not).") from exc
        return
    labels = host.rstrip(".").split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            if str(ipaddress.IPv4Address(host)) == host:
                return
        except ValueError:
            pass
        raise _invalid(
            f"The image URL's host {host[:100]!r} is a number but not a dotted-quad IPv4 "
            "address (octal, hex and short forms are not accepted)."
        )
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _invalid(f"The image URL's host {host[:100]!r} is not a valid domain name.")


def check_address(address: str, policy: FetchPolicy) -> None:
    """Refuse an address the policy does not let the server connect to."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    embedded = _embedded_ipv4(ip)
    for candidate in (ip, embedded) if embedded else (ip,):
        if candidate.is_link_local or candidate.is_unspecified or candidate.is_multicast:
            raise _address_refused()
        if not candidate.is_global and not (
            policy.allow_private_addresses and (candidate.is_private or candidate.is_loopback)
        ):
            raise _address_refused()


class UriFetcher:
    """Fetches ``http(s)://`` image URIs on the event loop under a FetchPolicy; one per server.

    At most ``max_concurrent_fetches`` run at once; later callers wait for a slot
    for as long as their own call's deadline lets them.
    """

    def __init__(self, policy: FetchPolicy, max_bytes: int) -> None:
        self._policy = policy
        self._max_bytes = max_bytes
        self._slots = asyncio.Semaphore(policy.max_concurrent_fetches)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(policy),
            timeout=httpx.Timeout(policy.timeout_s),
            follow_redirects=False,  # each hop is checked here instead
            trust_env=False,  # a proxy from the environment would bypass the address checks
            # identity: the body is capped as it arrives, so it must not be inflated after.
            headers={"User-Agent": "clipvision", "Accept-Encoding": "identity"},
        )
        self._closing: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    def close(self) -> None:
        """Close pooled connections soon, from synchronous code running on the event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop runs, so no connection of this loop's can be open or closed
        self._closing = loop.create_task(self.aclose())

    async def fetch(self, uri: str) -> bytes:
        """Fetch one image, following at most ``max_redirects`` checked redirects."""
        url = check_fetch_url(uri, self._policy)
        async with self._slots:
            try:
                # One deadline for everything: a host that drips its headers or body
                # is cut here even though each read makes progress.
                async with asyncio.timeout(self._policy.timeout_s):
                    return await self._follow(url)
            except (TimeoutError, httpx.TimeoutException) as exc:
                raise _fetch_timeout(self._policy.timeout_s) from exc
            except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL, OSError) as exc:
                # A refused address raises UriRefusedError itself, which is none of these.
                logger.debug("fetching an image URI failed: %r", exc)
                raise InvalidImageError(
                    Reason.URI_UNREADABLE, "The image URI could not be fetched."
                ) from exc

    async def _follow(self, url: httpx.URL) -> bytes:
        for _ in range(self._policy.max_redirects + 1):
            async with self._client.stream("GET", url) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = self._redirect_target(response)
                    continue
                if response.status_code != 200:
                    raise InvalidImageError(
                        Reason.URI_UNREADABLE,
                        f"Fetching the image URI returned HTTP {response.status_code}.",
                    )
                return await self._read_body(response)
        raise InvalidImageError(
            Reason.URI_UNREADABLE,
            f"The image URI redirected more than {self._policy.max_redirects} times.",
        )

    def _redirect_target(self, response: httpx.Response) -> httpx.URL:
        try:
            target = str(response.url.join(response.headers["location"]))
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
            raise InvalidImageError(
                Reason.URI_UNREADABLE, "The image URI redirected to an invalid URL."
            ) from exc
        return check_fetch_url(target, self._policy)

    async def _read_body(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        # isascii: int() refuses some str.isdigit() characters, and 4,300+ digits.
        if declared.isascii() and declared.isdigit() and int(declared[:19]) > self._max_bytes:
            raise _too_large(int(declared[:19]), self._max_bytes)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self._max_bytes:
                raise _too_large(len(body), self._max_bytes)
        return bytes(body)


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


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host on the loop itself, checks every address, connects to a checked one."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        # The interface's names: httpcore passes them by keyword.
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # Every address must pass: a name that also resolves to an internal
        # address is refused even if its first answer is public (DNS rebinding).
        for address in addresses:
            check_address(address, self._policy)
        failure: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image URIs are never fetched over a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's async transport with the connection pool built on the guarded backend.

    httpx offers no hook for the network backend, so the pool is replaced; TLS
    still verifies the certificate against the URL's host name.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=max(32, policy.max_concurrent_fetches),
            max_keepalive_connections=8,
            network_backend=_GuardedBackend(policy),
        )


def _invalid(message: str) -> InvalidImageError:
    return InvalidImageError(Reason.URI_INVALID, message)


def _unreadable(exc: OSError) -> InvalidImageError:
    return InvalidImageError(
        Reason.URI_UNREADABLE,
        f"The file named by the URI does not exist or cannot be read ({exc.strerror}).",
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
