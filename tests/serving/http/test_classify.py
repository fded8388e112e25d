"""`POST /classify` over a fake CLIP: JSON and multipart, and every way an image can be bad."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app


def image_bytes(size=(32, 24), fmt="PNG", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes, prefix: str = "") -> str:
    return prefix + base64.b64encode(data).decode()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge canvas (the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def classify(client: TestClient, **fields):
    return client.post("/classify", json=fields)


def test_json_images_ranked_labels_and_mora(client, clip):
    images = [b64(image_bytes()), b64(image_bytes((10, 10), "JPEG"), "data:image/jpeg;base64,")]
    response = classify(client, images=images, labels=["red", "green", "blue"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "classification" and body["model"] == "fake-clip"
    assert [row["index"] for row in body["data"]] == [0, 1]
    for row in body["data"]:
        probs = [label["probability"] for label in row["labels"]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0)
        assert {label["label"] for label in row["labels"]} == {"red", "green", "blue"}
    assert body["mora"]["pool_version"] == 3
    assert body["mora"]["active_ranks_per_token"] == pytest.approx(1.5)
    assert clip.calls == [([(32, 24), (10, 10)], ["red", "green", "blue"], None)]


def test_default_labels_top_k_and_overrides(client, clip):
    response = classify(client, images=[b64(image_bytes())], top_k=2, mora={"top_k": 4})
    labels = response.json()["data"][0]["labels"]
    assert len(labels) == 2
    assert {label["label"] for label in labels} <= set(clip.default_labels)
    _, given, mora = clip.calls[0]
    assert given is None and mora.top_k == 4


def test_multipart_upload_with_repeated_and_json_labels(client, clip):
    files = [
        ("images", ("a.png", image_bytes(), "image/png")),
        ("images", ("b.jpg", image_bytes((8, 8), "JPEG"), "image/jpeg")),
    ]
    response = client.post("/classify", files=files, data={"labels": ["x", "y"], "top_k": "1"})
    assert response.status_code == 200, response.text
    assert [len(row["labels"]) for row in response.json()["data"]] == [1, 1]
    response = client.post(
        "/classify", files=files[:1], data={"labels": json.dumps(["p", "q", "r"])}
    )
    assert response.status_code == 200, response.text
    assert [c[1] for c in clip.calls] == [["x", "y"], ["p", "q", "r"]]


@pytest.mark.parametrize(
    ("image", "status"),
    [
        (b"definitely not an image", 400),
        (image_bytes()[:60], 400),  # truncated PNG
        (image_bytes(fmt="GIF"), 400),  # only PNG and JPEG are decoded
        (image_bytes((300, 300)), 413),  # above max_image_pixels = 256 * 256
        (png_bomb(), 413),
    ],
)
def test_bad_images_are_refused(client, clip, image, status):
    error = assert_openai_error(classify(client, images=[b64(image_bytes()), b64(image)]), status)
    assert error["param"] == "images[1]"
    files = [("images", ("x.png", image, "image/png"))]
    assert_openai_error(client.post("/classify", files=files), status)
    assert not clip.calls


def test_request_level_limits(client):
    one = b64(image_bytes())
    assert_openai_error(classify(client, images=[one] * 5), 400, "images")
    assert_openai_error(classify(client, images=["%%%"]), 400, "images[0]")
    assert_openai_error(classify(client, images=[]), 400, "images")
    assert_openai_error(classify(client, images=[one], labels=[f"l{i}" for i in range(9)]), 400)
    assert_openai_error(classify(client, images=[one], labels=["a", "a"]), 400, "labels")
    assert_openai_error(classify(client, images=[one], labels=["a", " "]), 400, "labels[1]")
    assert_openai_error(classify(client, images=[one], model="other"), 404, "model")
    files = [("images", (f"{i}.png", image_bytes(), "image/png")) for i in range(5)]
    assert_openai_error(client.post("/classify", files=files), 400)
    big = [b64(image_bytes((256, 256), color=None) + b"\0" * (1 << 20))]
    assert_openai_error(classify(client, images=big), 413)
    response = client.post("/classify", content=b"x", headers={"content-type": "text/plain"})
    assert_openai_error(response, 415)


def test_multipart_form_errors(client):
    text_part = {"images": (None, b"not a file")}
    assert_openai_error(client.post("/classify", files=text_part), 400, "images")
    form = client.post("/classify", data={"images": "x"})  # urlencoded, not multipart
    assert_openai_error(form, 415)
    files = [("images", ("a.png", image_bytes(), "image/png"))]
    response = client.post("/classify", files=files, data={"labels": "[broken"})
    assert_openai_error(response, 400, "labels")


def test_slow_classification_is_504():
    with TestClient(make_app(clip=fakes.FakeClip(delay_s=5), request_timeout_s=0.2)) as client:
        error = assert_openai_error(classify(client, images=[b64(image_bytes())]), 504)
    assert error["code"] == "request_timeout"


def test_no_clip_model_is_404():
    with TestClient(make_app()) as client:
        assert_openai_error(classify(client, images=[b64(image_bytes())]), 404)
