"""Fetching and decoding message images under explicit limits.

Images arrive as URIs inside events the platform sends, so every one is hostile until proven
otherwise: ``file`` URIs only under configured roots, ``http(s)`` only to globally routable addresses
(an allow list: no loopback, private, shared, link-local or reserved range, so no cloud metadata
endpoint) unless the host is allowlisted, the connection pinned to the vetted address and no
redirects, ``s3`` only through a configured endpoint, ``data`` capped before it is decoded. Bytes are
capped while they are read, under a total deadline that grows only at a minimum transfer rate; Pillow opens only allowlisted formats (never EPS, which would run Ghostscript), the pixel count
and sides are checked from the header before decoding, the decompression-bomb warning is an error,
and the image is decoded fully inside the guard, so a truncated file fails here and not later.
Every refusal is an ``ImageError`` with a stable code and a coarse message; the detail (host, port,
address) goes to the log only, so a user cannot probe the internal network through error texts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Codes of ``ImageError``; metrics and logs use them as they are.
CODES = ("scheme_refused", "address_refused", "fetch_failed", "too_large", "format_refused", "decompression_bomb",
         "truncated", "undecodable", "dimensions")


log = logging.getLogger("tessera.images")
#: Slowest transfer an image fetch tolerates, bytes per second, on top of ``timeout_s``.
MIN_RATE = 256 * 1024


class ImageError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
    timeout_s: float = 3.0
    #: Directories ``file`` URIs may point into; none means ``file`` URIs are refused.
    file_roots: tuple[Path, ...] = ()
    #: Hosts (names or addresses) that may be fetched even when they resolve to private addresses.
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    #: ``http(s)://host:port`` serving ``s3://bucket/key`` as ``/bucket/key``.
    s3_endpoint: str | None = None


def fetch(uri: str, policy: ImagePolicy) -> bytes:
    """The bytes behind ``uri``, or ``ImageError``; never more than ``policy.max_bytes``."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme == "data":
        return _data(uri, policy)
    if scheme == "file":
        return _file(uri, policy)
    if scheme in ("http", "https"):
        return _http(uri, policy)
    if scheme == "s3":
        if not policy.s3_endpoint:
            raise ImageError("scheme_refused", "s3 URIs need TESSERA_S3_ENDPOINT")
        parts = urlsplit(uri)
        endpoint = urlsplit(policy.s3_endpoint)
        host = (endpoint.hostname or "").lower()
        trusted = ImagePolicy(**{**policy.__dict__, "allow_hosts": policy.allow_hosts | {host}})
        return _http(f"{policy.s3_endpoint.rstrip('/')}/{parts.netloc}{parts.path}", trusted)
    raise ImageError("scheme_refused", f"scheme {scheme or '(none)'!r} is not fetched")


def _data(uri: str, policy: ImagePolicy) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raw = unquote(payload).encode("latin-1", "replace")
    else:
        # Refuse before decoding: 4 base64 characters carry 3 bytes.
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise ImageError("too_large", f"data URI carries over {policy.max_bytes} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("undecodable", f"data URI is not valid base64: {exc}") from None
    if len(raw) > policy.max_bytes:
        raise ImageError("too_large", f"data URI carries over {policy.max_bytes} bytes")
    return raw


def _file(uri: str, policy: ImagePolicy) -> bytes:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageError("scheme_refused", "file URIs on other hosts are not fetched")
    path = Path(unquote(parts.path)).resolve()
    if not any(path == root or root in path.parents for root in policy.file_roots):
        raise ImageError("address_refused", f"{path} is outside TESSERA_IMAGE_ROOTS")
    try:
        with open(path, "rb") as f:
            raw = f.read(policy.max_bytes + 1)
    except OSError as exc:
        raise ImageError("fetch_failed", f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > policy.max_bytes:
        raise ImageError("too_large", f"{path} is over {policy.max_bytes} bytes")
    return raw


#: Ranges Python's ``is_global`` still calls global on some versions, but no image host lives in:
#: IETF protocol assignments (192.0.0.0/24) and shared address space of carrier NAT and cloud
#: metadata services (100.64.0.0/10).
_NOT_PUBLIC = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("100.64.0.0/10"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused_address(address: str) -> str | None:
    """Why an address may not be fetched (None: a globally routable address). An allow list, not a deny list."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        # NAT64 reaches the IPv4 address in the low 32 bits: judge that one.
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_multicast or not ip.is_global or any(ip in net for net in _NOT_PUBLIC if net.version == ip.version):
        return f"{address} is not a globally routable address"
    return None


def _refuse(code: str, user_message: str, detail: str) -> ImageError:
    """The user learns the code and a coarse message; hosts, ports and addresses go to the log only."""
    log.info("image refused (%s): %s", code, detail)
    return ImageError(code, user_message)


def _http(uri: str, policy: ImagePolicy) -> bytes:
    parts = urlsplit(uri)
    host = (parts.hostname or "").lower()
    if not host:
        raise ImageError("fetch_failed", "the image URI has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _refuse("fetch_failed", "the image could not be fetched", f"cannot resolve {host}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    if host not in policy.allow_hosts:
        for address in addresses:
            why = refused_address(address)
            if why:
                raise _refuse("address_refused", "the image's address may not be fetched", f"{host}: {why}")
    # Connect to the address just vetted, not to a fresh lookup (DNS rebinding).
    target = addresses[0]
    started = time.monotonic()
    try:
        connection = _PinnedConnection(parts.scheme, host, target, port, policy.timeout_s)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "tessera-image-fetch"})
        response = connection.getresponse()
        if response.status != 200:
            raise _refuse("fetch_failed", "the image could not be fetched",
                          f"{host} answered {response.status} (redirects are not followed)")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise _refuse("too_large", "the image is too large", f"{host} announces {length} bytes")
        raw = _read_within(response, connection, policy, started)
        connection.close()
    except ImageError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise _refuse("fetch_failed", "the image could not be fetched", f"{host}:{port}: {exc}") from None
    if len(raw) > policy.max_bytes:
        raise _refuse("too_large", "the image is too large", f"{host} sent over {policy.max_bytes} bytes")
    return raw


def _read_within(response, connection, policy: ImagePolicy, started: float) -> bytes:
    """Read the body under a total deadline that grows only at ``MIN_RATE``: a server that trickles
    bytes (each read in time, the whole never) is cut off, a large image on a good link is not."""
    chunks, received = [], 0
    while received <= policy.max_bytes:
        left = started + policy.timeout_s + received / MIN_RATE - time.monotonic()
        if left <= 0:
            raise _refuse("fetch_failed", "the image could not be fetched",
                          f"under {MIN_RATE} bytes/s after {received} bytes")
        if connection.sock is not None:
            connection.sock.settimeout(min(left, policy.timeout_s))
        chunk = response.read1(65536)
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


class _PinnedConnection(http.client.HTTPConnection):
    def __init__(self, scheme: str, host: str, address: str, port: int, timeout: float):
        super().__init__(address, port, timeout=timeout)
        self._scheme, self._server_name = scheme, host

    def connect(self) -> None:
        super().connect()
        if self._scheme == "https":
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self._server_name)


@dataclass(frozen=True)
class DecodedImage:
    format: str
    width: int
    height: int
    image: object  # PIL.Image.Image, RGB


def decode(raw: bytes, policy: ImagePolicy) -> DecodedImage:
    """Decode under the policy's limits; EXIF that cannot be read is ignored, not fatal."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(raw) > policy.max_bytes:
        raise ImageError("too_large", f"image is over {policy.max_bytes} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=list(policy.formats))
        except UnidentifiedImageError:
            raise ImageError("format_refused", f"not an image of an allowed format ({', '.join(policy.formats)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("decompression_bomb", str(exc)) from None
        except Exception as exc:
            raise ImageError("undecodable", f"cannot open image: {exc}") from None
        fmt = image.format
        width, height = image.size
        if width * height > policy.max_pixels:
            raise ImageError("decompression_bomb", f"{width}x{height} is over {policy.max_pixels} pixels")
        if max(width, height) > policy.max_side or min(width, height) < 1:
            raise ImageError("dimensions", f"{width}x{height} is outside 1..{policy.max_side} per side")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("decompression_bomb", str(exc)) from None
        except OSError as exc:
            code = "truncated" if "truncated" in str(exc) else "undecodable"
            raise ImageError(code, f"cannot decode image: {exc}") from None
        except Exception as exc:
            raise ImageError("undecodable", f"cannot decode image: {exc}") from None
        # Broken EXIF only loses the orientation hint; the pixels are fine.
        with contextlib.suppress(Exception):
            image = ImageOps.exif_transpose(image)
        return DecodedImage(fmt, width, height, image.convert("RGB"))


def load(uri: str, policy: ImagePolicy) -> DecodedImage:
    return decode(fetch(uri, policy), policy)
