"""Hostile images: every refusal has its code, and good images decode under the limits."""

from __future__ import annotations

import base64
import http.server
import io
import random
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from indexer.images import ImageError, ImagePolicy, decode, fetch, load, refused_address
from ops.stack.local import free_port


def png(width=8, height=8, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def with_ihdr_size(data: bytes, width: int, height: int) -> bytes:
    """The same PNG claiming other dimensions (IHDR rewritten with a valid CRC): a bomb in 100 bytes."""
    ihdr = bytearray(data[8:33])
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return data[:8] + bytes(ihdr) + data[33:]


def code_of(call) -> str:
    with pytest.raises(ImageError) as info:
        call()
    return info.value.code


POLICY = ImagePolicy(max_bytes=400_000, max_pixels=4_000_000, max_side=12_000)


def test_a_good_image_decodes_from_a_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(png(10, 6)).decode()
    image = load(uri, POLICY)
    assert (image.format, image.width, image.height) == ("PNG", 10, 6)
    assert image.image.getpixel((0, 0)) == (200, 30, 30)


def test_oversized_and_broken_data_uris():
    huge = "data:image/png;base64," + "A" * 1_000_000
    assert code_of(lambda: fetch(huge, POLICY)) == "too_large"
    assert code_of(lambda: fetch("data:image/png;base64,@@@@", POLICY)) == "undecodable"


@pytest.mark.parametrize("make, code", [
    (lambda: with_ihdr_size(png(), 40_000, 40_000), "decompression_bomb"),
    (lambda: with_ihdr_size(png(), 3_000, 3_000), "decompression_bomb"),
    (lambda: png(12_500, 1), "dimensions"),
    (lambda: png(300, 300, (1, 2, 3))[:-40], "truncated"),
    (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "format_refused"),
    (lambda: (lambda b: (Image.new("RGB", (4, 4)).save(b, "TIFF"), b.getvalue())[1])(io.BytesIO()), "format_refused"),
    (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "format_refused"),
    (lambda: (lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:])(png(64, 64)), "undecodable"),
])
def test_hostile_images_are_refused_with_their_code(make, code):
    if code == "truncated":
        # Noise does not compress: a cut-off file is missing pixels, not just its end marker.
        buf = io.BytesIO()
        Image.frombytes("RGB", (300, 300), random.Random(1).randbytes(300 * 300 * 3)).save(buf, "PNG")
        data = buf.getvalue()[:len(buf.getvalue()) // 2]
    else:
        data = make()
    policy = POLICY if code != "dimensions" else ImagePolicy(max_pixels=40_000_000, max_side=12_000)
    assert code_of(lambda: decode(data, policy)) == code


def test_broken_exif_loses_only_the_orientation():
    buf = io.BytesIO()
    Image.new("RGB", (16, 9), (0, 90, 0)).save(buf, "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    image = decode(buf.getvalue(), POLICY)
    assert (image.format, image.width, image.height) == ("JPEG", 16, 9)


@pytest.mark.parametrize("address, refused", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.10", True), ("172.16.5.4", True),
    ("169.254.169.254", True), ("::1", True), ("::ffff:127.0.0.1", True), ("fd00:ec2::254", True),
    ("fe80::1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("8.8.8.8", False), ("2606:4700::1111", False),
    ("100.100.100.200", True), ("100.64.0.1", True), ("192.0.0.192", True), ("198.18.0.1", True),
    ("64:ff9b::a9fe:a9fe", True),
])
def test_address_classes(address, refused):
    assert bool(refused_address(address)) is refused


def test_file_uris_only_under_configured_roots(tmp_path):
    inside = tmp_path / "images" / "a.png"
    inside.parent.mkdir()
    inside.write_bytes(png())
    policy = ImagePolicy(file_roots=(inside.parent.resolve(),))
    assert load(inside.as_uri(), policy).width == 8
    assert code_of(lambda: fetch("file:///etc/passwd", policy)) == "address_refused"
    assert code_of(lambda: fetch((inside.parent / ".." / "x.png").as_uri(), policy)) == "address_refused"
    assert code_of(lambda: fetch(inside.as_uri(), ImagePolicy())) == "address_refused"
    assert code_of(lambda: fetch("gopher://example.com/x", policy)) == "scheme_refused"
    assert code_of(lambda: fetch("s3://bucket/key.png", policy)) == "scheme_refused"


@pytest.fixture
def server():
    """A real HTTP server on loopback with a few routes."""
    body = png(5, 4)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                time.sleep(2)
            if self.path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for byte in body:
                    # One byte every 0.2 s: never idle long enough for a per-read timeout to fire.
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            payload = body * 100 if self.path == "/big" else body
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path != "/big":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_http_to_loopback_is_refused_unless_allowlisted(server):
    url = f"http://127.0.0.1:{server}/a.png"
    assert code_of(lambda: fetch(url, POLICY)) == "address_refused"
    assert code_of(lambda: fetch(f"http://localhost:{server}/a.png", POLICY)) == "address_refused"
    allowed = ImagePolicy(max_bytes=2_000, timeout_s=0.5, allow_hosts=frozenset({"127.0.0.1"}))
    assert load(url, allowed).width == 5
    assert code_of(lambda: fetch(f"http://127.0.0.1:{server}/redirect", allowed)) == "fetch_failed"
    assert code_of(lambda: fetch(f"http://127.0.0.1:{server}/big", allowed)) == "too_large"
    started = time.monotonic()
    assert code_of(lambda: fetch(f"http://127.0.0.1:{server}/slow", allowed)) == "fetch_failed"
    assert time.monotonic() - started < 1.5


def test_s3_goes_through_the_configured_endpoint(server):
    policy = ImagePolicy(s3_endpoint=f"http://127.0.0.1:{server}")
    assert load("s3://photos/a.png", policy).height == 4


def test_a_trickling_server_cannot_hold_a_fetch_past_its_deadline(server):
    allowed = ImagePolicy(timeout_s=0.8, allow_hosts=frozenset({"127.0.0.1"}))
    started = time.monotonic()
    assert code_of(lambda: fetch(f"http://127.0.0.1:{server}/trickle", allowed)) == "fetch_failed"
    assert time.monotonic() - started < 2.0


def test_refusals_tell_the_user_no_internal_detail(server):
    allowed = ImagePolicy(timeout_s=0.5, allow_hosts=frozenset({"127.0.0.1"}))
    closed = f"http://127.0.0.1:{free_port()}/a.png"
    for uri in (closed, f"http://127.0.0.1:{server}/redirect", "http://10.0.0.5/a.png"):
        try:
            fetch(uri, allowed if "10.0.0.5" not in uri else POLICY)
        except ImageError as exc:
            text = str(exc)
            assert "127.0.0.1" not in text and "10.0.0.5" not in text and "refused" not in text.lower().replace(
                "address_refused", ""), text
        else:
            raise AssertionError(f"{uri} was fetched")


def test_words_the_recogniser_glued_are_split_where_known_words_spell_them():
    from indexer.encoders.ocr import spaced, vocabulary

    known = vocabulary()
    assert spaced("went to a support groupyesterday and it wassopowerful.", known) == \
        "went to a support group yesterday and it was so powerful."
    assert spaced("How have you been?I just signedupfor apotteryclass", known) == \
        "How have you been? I just signed up for a pottery class"
    # Known words, names and runs no split spells stay as read.
    assert spaced("Caroline at Luigis Trattoria, nowhere near checkout 2.3.1", known) == \
        "Caroline at Luigis Trattoria, nowhere near check out 2.3.1"
