"""The real app in a subprocess on a loopback port, called through gradio_client like a user's script would."""

import zipfile

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "cat.jpg"


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server, verbose=False)


def test_caption_endpoint_returns_a_caption_then_details(client):
    from gradio_client import handle_file

    result = client.predict(handle_file(str(EXAMPLE)), api_name="/caption")
    text, details = result[0], result[1]
    assert isinstance(text, str) and text.strip()
    assert details["caption"] == text and 0 < details["confidence"] <= 1
    assert len(details["alternatives"]) == 2  # default: beam 3, two alternatives


def test_max_new_tokens_and_prefix_change_the_caption(client):
    from gradio_client import handle_file

    short = client.predict(handle_file(str(EXAMPLE)), max_new_tokens=3, api_name="/caption")
    assert short[1]["num_tokens"] <= 3
    prefixed = client.predict(handle_file(str(EXAMPLE)), prefix="a dog", max_new_tokens=8, api_name="/caption")
    assert prefixed[0].startswith("a dog")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"just some text\n", "not an image format"),
        ("broken.jpg", None, "corrupt or truncated"),
        ("empty.png", b"", "empty"),
    ],
)
def test_bad_files_give_a_clear_error_and_the_server_keeps_serving(client, tmp_path, name, content, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / name
    path.write_bytes(content if content is not None else EXAMPLE.read_bytes()[:3000])
    with pytest.raises(AppError, match=message) as caught:
        client.predict(handle_file(str(path)), api_name="/caption")
    assert "Traceback" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert client.predict(handle_file(str(EXAMPLE)), api_name="/caption")[0].strip()


def test_out_of_range_options_are_refused_clearly(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="num_beams"):
        client.predict(handle_file(str(EXAMPLE)), num_beams=0, api_name="/caption")
    with pytest.raises(AppError, match="temperature"):
        client.predict(handle_file(str(EXAMPLE)), strategy="sample", temperature=-1, api_name="/caption")


def test_caption_batch_returns_one_row_per_input_including_zip_members(client, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "notes.txt").write_text("not an image")
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(ROOT / "examples" / "coffee.jpg", "holiday/coffee.jpg")
        zipped.write(ROOT / "examples" / "rocket.jpg", "rocket.jpg")
        zipped.writestr("readme.md", "ignored: not an image file")
    files = [handle_file(str(EXAMPLE)), handle_file(str(tmp_path / "notes.txt")), handle_file(str(archive))]
    table, csv_path = client.predict(files, api_name="/caption_batch")
    rows = table["data"]
    assert [row[0] for row in rows] == [
        "cat.jpg",
        "notes.txt",
        "photos.zip/holiday/coffee.jpg",
        "photos.zip/rocket.jpg",
    ]
    assert rows[0][1] and not rows[0][3]
    assert not rows[1][1] and "not an image" in rows[1][3]
    with open(csv_path, encoding="utf-8") as file:
        assert len(file.read().strip().splitlines()) == 1 + len(rows)


def test_app_examples_exist_and_every_example_photo_is_credited():
    from app import APP_EXAMPLES, EXAMPLES

    credits = (EXAMPLES / "CREDITS.md").read_text()
    assert all((EXAMPLES / name).is_file() for name in APP_EXAMPLES)
    for photo in EXAMPLES.glob("*.jpg"):
        assert f"`{photo.name}`" in credits, f"{photo.name} is not credited in examples/CREDITS.md"
