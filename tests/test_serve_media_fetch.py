"""The allow-listed remote fetch (``--allowed-media-domains``) against a real https server on 127.0.0.1.

The server's certificate is self-signed for ``localhost`` and trusted for this test only; ``check_public_host``
is told to treat 127.0.0.1 as public (it is not, and the proxy tests show it refused), so the rest of the path is
exercised: the connection pinned to the checked address with TLS verifying the NAME, redirects re-checked,
the byte cap while streaming, the timeout.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import http.server
import io
import ssl
import threading
import time

import httpx
import pytest
from PIL import Image

from zoomvlm.serve import media
from zoomvlm.serve.errors import ServeError


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


PNG = io.BytesIO()
Image.new("RGB", (48, 32), "green").save(PNG, format="PNG")


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("host")))
            port = self.server.server_address[1]
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("content-length", str(len(PNG.getvalue())))
                self.end_headers()
                self.wfile.write(PNG.getvalue())
            elif self.path.startswith("/redirect-to-"):
                targets = {
                    "allowed": f"https://localhost:{port}/img.png",
                    "other": f"https://127.0.0.1:{port}/img.png",
                    "http": f"http://localhost:{port}/img.png",
                }
                target = targets[self.path.removeprefix("/redirect-to-")]
                self.send_response(302)
                self.send_header("location", target)
                self.end_headers()
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("location", "/loop")
                self.end_headers()
            elif self.path in ("/big", "/drip"):  # endless bodies: fast, or one byte every 0.2 s
                self.send_response(200)
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"\0" * (65536 if self.path == "/big" else 1))
                        self.wfile.flush()
                        time.sleep(0.01 if self.path == "/big" else 0.2)
                except OSError:
                    pass
            elif self.path == "/slow":
                time.sleep(3)
                self.send_response(200)
                self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert, seen
    server.shutdown()


@pytest.fixture()
def fetch(https_server, monkeypatch):
    port, cert, seen = https_server
    seen.clear()
    trusted = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(media.httpx, "AsyncClient", functools.partial(httpx.AsyncClient, verify=trusted))
    real = media.check_public_host
    monkeypatch.setattr(media, "check_public_host",
                        lambda host, p: "127.0.0.1" if host == "localhost" else real(host, p))  # fmt: skip
    limits = media.MediaLimits(100_000, 1_000_000, allowed_domains=("localhost",), fetch_timeout=1.0)

    def run(path: str):
        return asyncio.run(media.fetch_remote_image(f"https://localhost:{port}{path}", limits, "p"))

    return run, seen, port


def code(run, path):
    with pytest.raises(ServeError) as info:
        run(path)
    return info.value.code


def test_allowed_https_fetch_is_pinned_and_verified(fetch):
    run, seen, port = fetch
    decoded = run("/img.png")
    assert decoded.image.size == (48, 32)
    assert seen == [("/img.png", f"localhost:{port}")]  # connected to the checked address, Host kept


def test_redirects_are_rechecked(fetch):
    run, seen, port = fetch
    assert run("/redirect-to-allowed").image.size == (48, 32)
    seen.clear()
    assert code(run, "/redirect-to-other") == "media_host_not_allowed"  # 127.0.0.1 is not on the list
    assert code(run, "/redirect-to-http") == "media_host_not_allowed"  # https only, after a redirect too
    assert [p for p, _ in seen] == ["/redirect-to-other", "/redirect-to-http"]  # the targets never fetched
    assert code(run, "/loop") == "media_fetch_failed"  # more than 3 redirects


def test_fetch_byte_cap_and_timeout(fetch):
    run, _, _ = fetch
    start = time.monotonic()
    assert code(run, "/big") == "image_too_large"  # cut at the cap while streaming, not at the timeout
    assert time.monotonic() - start < 0.9
    for path in ("/slow", "/drip"):  # no headers for 3 s; a body that never ends: the whole fetch is bounded
        start = time.monotonic()
        assert code(run, path) == "media_fetch_failed"
        assert time.monotonic() - start < 2.0
