"""Images through a tiny random CLIP loaded by the production code: fetched under the guard, embedded
into the turns' ``image`` vector, searchable by image and by words; failures counted, captions kept."""

from datetime import timedelta

import numpy as np
import pytest

from indexer.model import SearchFilter
from tests.conftest import message, query

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from ops.bench import random_models

    return random_models.clip(tmp_path_factory.mktemp("models") / "clip")


def picture(path, colour, stripes=False):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 40), COLOURS[colour])
    if stripes:
        draw = ImageDraw.Draw(image)
        for x in range(0, 48, 6):
            draw.line([(x, 0), (x, 40)], fill=(255, 255, 255), width=2)
    image.save(path)
    return f"file://{path}"


@pytest.fixture(params=["edge", "sqlite"])
def image_engine(request, tmp_path, embedder, clip_path, monkeypatch):
    from indexer.images import ImagePolicy
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config

    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store=request.param, image_model=str(clip_path),
                                image_policy=ImagePolicy(file_roots=(tmp_path.resolve(),))), embedder=embedder)
    yield engine
    engine.close()


def events(tmp_path):
    uris = {c: picture(tmp_path / f"{c}.png", c, stripes=c == "blue") for c in COLOURS}
    return uris, [
        message("c1", 1, "ann", "look at this", images=[{"uri": uris["red"], "caption": "a red tent"}]),
        message("c1", 2, "bob", "nice colour", minutes=2),
        message("c1", 3, "ann", "and this one", minutes=3, images=[{"uri": uris["green"], "caption": "a green lake"}]),
        message("c1", 4, "bob", "stripes!", minutes=4, images=[{"uri": uris["blue"], "caption": "a striped shirt"}]),
        message("c1", 5, "ann", "from the server", minutes=5,
                images=[{"uri": "http://127.0.0.1:9/secret.png", "caption": "the metadata endpoint"}]),
        message("c1", 6, "ann", "gone", minutes=6,
                images=[{"uri": f"file://{tmp_path}/missing.png", "caption": "a lost kayak"}]),
    ]


def test_images_are_embedded_and_failures_counted(image_engine, tmp_path):
    _, batch = events(tmp_path)
    report = image_engine.ingest(batch)
    assert report.images_embedded == 3
    assert report.image_failures == {"address_refused": 1, "fetch_failed": 1}
    # A refused image leaves its turn indexed by the caption.
    ids = [m for f in image_engine.query(query("kayak", reasoning="fast")).fragments for m in f.message_ids]
    assert "m006" in ids


def test_image_vector_is_searchable(image_engine, tmp_path):
    uris, batch = events(tmp_path)
    image_engine.ingest(batch)
    flt = SearchFilter(tenant_id="t1", user_id="u1")
    for colour, message_id in (("red", "m001"), ("green", "m003"), ("blue", "m004")):
        vector = image_engine.images.embed_query_image(uris[colour])
        hits = image_engine.vectors.search(vector, "turn", flt, 10, "image")
        assert hits[0].payload["message_ids"] == [message_id]
        # The same picture: cosine 1, less the error of vectors kept at 4 bits a dimension (the edge store's).
        assert hits[0].score == pytest.approx(1.0, abs=1e-2)
        assert {h.payload["message_ids"][0] for h in hits} == {"m001", "m003", "m004"}, "only turns with images"
    other_tenant = SearchFilter(tenant_id="t2", user_id="u1")
    assert image_engine.vectors.search(vector, "turn", other_tenant, 10, "image") == []


def test_query_by_image_and_by_image_plus_words(image_engine, tmp_path):
    uris, batch = events(tmp_path)
    image_engine.ingest(batch)
    same = picture(tmp_path / "query-green.png", "green")
    by_image = image_engine.query(query("", image={"uri": same}, reasoning="fast"))
    assert by_image.status in ("ok", "clarify")
    assert by_image.fragments[0].message_ids[0] == "m003" or "m003" in by_image.fragments[0].message_ids
    both = image_engine.query(query("lake", image={"uri": same}, reasoning="fast"))
    assert "m003" in both.fragments[0].message_ids


def test_a_query_longer_than_the_image_models_text_positions_is_answered(image_engine, tmp_path):
    """The query's words go to the image model's text encoder too, which takes 77 positions (CLIP); a tokenizer
    that does not say so must not turn a long question into an error."""
    _, batch = events(tmp_path)
    image_engine.ingest(batch)
    long = "where is the photo of the green lake that ann sent " + " ".join(f"word{i}" for i in range(120))
    result = image_engine.query(query(long, reasoning="fast"))
    assert result.status in ("ok", "clarify") and result.fragments


def test_query_image_refused_is_an_error_with_a_code(image_engine, tmp_path):
    result = image_engine.query(query("", image={"uri": "http://169.254.169.254/latest/meta-data"}))
    assert result.status == "error" and result.error.code == "image_address_refused"


def test_without_an_image_model_images_count_through_captions(make_engine, tmp_path):
    engine = make_engine()
    _, batch = events(tmp_path)
    report = engine.ingest(batch)
    assert report.images_embedded == 0 and report.image_failures == {}
    assert "m001" in [m for f in engine.query(query("red tent", reasoning="fast")).fragments for m in f.message_ids]
    result = engine.query(query("", image={"uri": "file:///x.png"}))
    assert result.status == "error" and result.error.code == "image_search_unavailable"


def test_image_embedder_spaces(clip_path):
    from PIL import Image

    from indexer.encoders.image import ImageEmbedder

    embedder = ImageEmbedder(clip_path)
    images = embedder.encode_images([Image.new("RGB", (20, 30), c) for c in COLOURS.values()])
    texts = embedder.encode_texts(["a red tent", "a lake"])
    assert images.shape == (3, embedder.dim) and texts.shape == (2, embedder.dim)
    assert np.allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)


def test_an_edit_that_removes_the_image_removes_the_turn_from_image_search(image_engine, tmp_path):
    """Only turns with images are in the vector store: the edit must take the old point out, not leave it."""
    uris, batch = events(tmp_path)
    image_engine.ingest(batch[:4])
    first = batch[0]
    edit = first.model_copy(update={"event_id": first.event_id + "-edit", "images": [], "text": "look at this tent",
                                    "edited_at": first.sent_at + timedelta(minutes=30)})
    image_engine.ingest([edit])
    flt = SearchFilter(tenant_id="t1", user_id="u1")
    hits = image_engine.vectors.search(image_engine.images.embed_query_image(uris["red"]), "turn", flt, 10, "image")
    assert {h.payload["message_ids"][0] for h in hits} == {"m003", "m004"}


def screenshot(path, text):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (440, 60), "white")
    ImageDraw.Draw(image).text((10, 16), text, fill="black", font_size=24)
    image.save(path)
    return f"file://{path}"


@pytest.mark.parametrize("ocr,image_model", [(True, True), (True, False), (False, True)],
                         ids=["ocr", "ocr-without-image-model", "no-ocr"])
def test_the_words_a_screenshot_shows_find_its_turn_with_ocr_on(tmp_path, embedder, clip_path, ocr, image_model):
    """A screenshot sent without a caption: with TESSERA_OCR its words are indexed with the turn (BM25 finds it, the
    state keeps them for re-segmentation), with or without an image model; without OCR nothing of them is anywhere."""
    from indexer.images import ImagePolicy
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config

    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="edge", ocr=ocr,
                                image_model=str(clip_path) if image_model else None,
                                image_policy=ImagePolicy(file_roots=(tmp_path.resolve(),))), embedder=embedder)
    try:
        shot = screenshot(tmp_path / "shot.png", "invoice 4471 overdue penguin")
        report = engine.ingest([message("c1", 1, "ann", "see attached", images=[{"uri": shot}]),
                                message("c1", 2, "bob", "will look at the invoice tomorrow", minutes=2),
                                message("c1", 3, "ann", "thanks, the trip photos are next", minutes=3)])
        assert (report.images_read, report.images_embedded) == (int(ocr), int(image_model))
        flt = SearchFilter(tenant_id="t1", user_id="u1")
        hits = [h.payload["message_ids"][0] for h in engine.keywords.search("overdue penguin", "turn", flt, 10)]
        read = engine.state.turns("t1", "c1")[0].images[0].text
        if ocr:
            assert hits == ["m001"] and "penguin" in read.lower()
            assert engine.query(query("the overdue penguin invoice")).fragments[0].message_ids[0] == "m001"
        else:
            assert hits == [] and read is None
    finally:
        engine.close()
