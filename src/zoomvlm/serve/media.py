"""Images from requests: ``data:`` URLs decoded under limits, remote URLs refused or fetched safely.

Everything here runs BEFORE any model work, and refuses with a :class:`~zoomvlm.serve.errors.ServeError`
(400) naming the message part at fault:

- ``data:`` URLs: declared type must be an image type we decode (PNG, JPEG, WEBP, GIF); the base64 must be
  strict (no junk, correct padding); its decoded size is computed from the text length and checked against
  ``max_image_bytes`` before decoding; the image header is read (no pixels) and ``width x height`` is
  checked against ``max_image_pixels`` BEFORE the pixels are decoded, so a decompression bomb (a few kB
  that would decode to hundreds of megapixels) costs nothing; the real format must be one we decode.
- remote ``http(s)://`` URLs: refused without any connection unless the host is on the allow-list
  (``--allowed-media-domains``). Allowed hosts are fetched over https only, from an address that was
  resolved and checked to be public (no private, loopback, link-local, multicast or reserved address);
  the connection goes to that checked address (TLS still verifies the host name), so a DNS answer that
  changes between check and connect cannot redirect it. Redirects are followed by hand, at most 3, each
  re-checked the same way; the fetch has a timeout and the same byte cap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import re
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, ImageOps

from zoomvlm.data.samples import to_rgb
from zoomvlm.serve.errors import ServeError

logger = logging.getLogger(__name__)

__all__ = ["DecodedImage", "MediaLimits", "check_public_host", "decode_data_url", "fetch_remote_image"]

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_DECLARED = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,")
_MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaLimits:
    """Per-image limits (encoded bytes, decoded pixels = width x height), the per-request total of decoded pixels
    (``None``: no total), and the remote-fetch policy."""

    max_image_bytes: int
    max_image_pixels: int
    allowed_domains: tuple[str, ...] = ()
    fetch_timeout: float = 5.0
    max_request_pixels: int | None = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded request image: ``image`` at its native resolution (RGB), upright (its EXIF orientation applied,
    ``oriented`` True when that turned or flipped it), and its encoded form."""

    image: Image.Image
    format: str
    encoded_bytes: int
    oriented: bool = False


def decode_image_bytes(data: bytes, limits: MediaLimits, param: str, request_pixels: int = 0) -> DecodedImage:
    """Decode encoded image bytes, checking the format and the pixel count from the header first.

    ``request_pixels``: pixels of the request's images decoded before this one; with this image's they must stay
    within ``limits.max_request_pixels``. The image is turned upright by its EXIF orientation tag (a phone photo
    stored sideways), so the policy, its crops and the views sent upstream share one frame, the one people see.

    Raises:
        ServeError: 400 ``image_too_large`` (bytes, pixels, or the request's total pixels),
            ``unsupported_image_format``, ``invalid_image``.
    """
    if len(data) > limits.max_image_bytes:
        raise ServeError(
            400, f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}", "image_too_large", param
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ServeError(400, f"image too large: {err}", "image_too_large", param) from err
    except Image.UnidentifiedImageError as err:
        raise ServeError(
            400, "not an image in a supported format (PNG, JPEG, WEBP, GIF)", "unsupported_image_format", param
        ) from err
    except Exception as err:  # a malformed header can raise nearly anything inside a PIL plugin
        raise ServeError(400, f"cannot read image header: {type(err).__name__}", "invalid_image", param) from err
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_image_pixels:
        raise ServeError(
            400,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}",
            "image_too_large",
            param,
        )
    total = limits.max_request_pixels
    if total is not None and request_pixels + width * height > total:
        raise ServeError(
            400,
            f"the request's images add up to {request_pixels + width * height} pixels, over the limit of {total}",
            "image_too_large",
            param,
        )
    try:
        image.load()  # only now are the pixels decoded; truncated data raises here
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation; 1 = stored upright
        upright = ImageOps.exif_transpose(image) if orientation not in (1, None) else image
        rgb = to_rgb(upright)  # 16-bit gray and transparency as a viewer shows them
    except Exception as err:
        raise ServeError(400, f"cannot decode image: {type(err).__name__}: {err}", "invalid_image", param) from err
    return DecodedImage(rgb, image.format or "", len(data), oriented=orientation not in (1, None))


def decode_data_url(url: str, limits: MediaLimits, param: str, request_pixels: int = 0) -> DecodedImage:
    """Decode a ``data:image/...;base64,...`` URL under ``limits``.

    Args:
        url: the ``image_url.url`` string.
        param: where it sits in the request, for the error message (``messages[0].content[1].image_url``).

    Raises:
        ServeError: 400 with code ``invalid_image_url`` (not a base64 data URL), ``unsupported_image_type``
            (declared type not an image we decode), ``invalid_base64``, or those of :func:`decode_image_bytes`.
    """
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ServeError(
            400, "image_url must be a base64 data URL (data:image/png;base64,...)", "invalid_image_url", param
        )
    mime = (match.group("mime") or "").lower()
    if mime not in _DECLARED:
        raise ServeError(
            400,
            f"unsupported image type {mime or 'none'!r}; use image/png, image/jpeg, image/webp or image/gif",
            "unsupported_image_type",
            param,
        )
    payload = url[match.end() :]
    # Refuse on the text length before decoding anything: 4 base64 characters carry 3 bytes.
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise ServeError(
            400,
            f"image is about {len(payload) // 4 * 3} bytes, over the limit of {limits.max_image_bytes}",
            "image_too_large",
            param,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(400, f"invalid base64 image data: {err}", "invalid_base64", param) from err
    return decode_image_bytes(data, limits, param, request_pixels)


def check_public_host(host: str, port: int) -> str:
    """Resolve ``host`` and return one of its addresses, refusing any that is not public.

    All resolved addresses must be globally routable: a name that also resolves to a private, loopback,
    link-local, multicast, reserved or unspecified address (or an IPv4-mapped one) is refused, so a split
    answer cannot sneak an internal address in.

    Raises:
        ServeError: 400 ``media_host_not_allowed`` (a non-public address) or ``media_fetch_failed`` (no address).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ServeError(400, f"cannot resolve media host {host!r}", "media_fetch_failed") from err
    addresses = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            ip = mapped
        if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
            raise ServeError(400, f"media host {host!r} resolves to a non-public address", "media_host_not_allowed")
        addresses.append(str(ip))
    if not addresses:
        raise ServeError(400, f"cannot resolve media host {host!r}", "media_fetch_failed")
    return addresses[0]


def _check_url(url: str, limits: MediaLimits, param: str) -> tuple[str, str, int]:
    """(host, address, port) of an allowed https URL, or ServeError. No connection is made here."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if not limits.allowed_domains:
        raise ServeError(
            400,
            "remote image URLs are not allowed by this server; send the image as a data: URL",
            "remote_media_disabled",
            param,
        )
    if host not in limits.allowed_domains:
        raise ServeError(400, f"media host {host!r} is not in the allow-list", "media_host_not_allowed", param)
    if parts.scheme != "https":
        raise ServeError(400, "remote images are fetched over https only", "media_host_not_allowed", param)
    if parts.username or parts.password:
        raise ServeError(400, "credentials in media URLs are refused", "media_host_not_allowed", param)
    port = parts.port or 443
    try:
        address = check_public_host(host, port)
    except ServeError as err:
        err.param = param
        raise
    return host, address, port


async def fetch_remote_image(url: str, limits: MediaLimits, param: str, request_pixels: int = 0) -> DecodedImage:
    """Fetch an allowed remote image (see the module docstring for every check).

    ``limits.fetch_timeout`` bounds the WHOLE fetch (every redirect, the body included), so a server that
    drips bytes cannot hold a request longer than that.

    Raises:
        ServeError: 400 with code ``remote_media_disabled``, ``media_host_not_allowed``, ``media_fetch_failed``,
            ``image_too_large`` or those of :func:`decode_image_bytes`.
    """
    try:
        data = await asyncio.wait_for(_fetch_bytes(url, limits, param), limits.fetch_timeout)
    except (httpx.HTTPError, asyncio.TimeoutError, OSError) as err:
        raise ServeError(400, f"media fetch failed: {type(err).__name__}", "media_fetch_failed", param) from err
    return await asyncio.to_thread(decode_image_bytes, data, limits, param, request_pixels)


async def _fetch_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    for _ in range(_MAX_REDIRECTS + 1):
        host, address, port = await asyncio.to_thread(_check_url, url, limits, param)
        parts = urlsplit(url)
        ip_host = f"[{address}]" if ":" in address else address
        pinned = parts._replace(netloc=f"{ip_host}:{port}").geturl()
        # Connect to the address that was checked; the Host header and TLS (SNI + certificate check) use the name.
        headers = {"Host": parts.netloc.rpartition("@")[2]}
        async with httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=False, trust_env=False) as c:
            request = c.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": host})
            response = await c.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ServeError(400, f"media fetch got HTTP {response.status_code}", "media_fetch_failed", param)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_image_bytes:
                        message = f"remote image is over the limit of {limits.max_image_bytes} bytes"
                        raise ServeError(400, message, "image_too_large", param)
                return bytes(data)
            finally:
                await response.aclose()
    raise ServeError(400, f"more than {_MAX_REDIRECTS} redirects fetching media", "media_fetch_failed", param)
