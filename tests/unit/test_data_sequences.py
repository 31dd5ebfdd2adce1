"""Token-sequence rules for pairs, MMC4 documents and generic documents (reference behaviour)."""

import json
import random

import pytest

from lcl_megatron.data.documents import Document, Image, Text
from lcl_megatron.data.sequences import (encode_document, encode_pair, parse_mmc4, place_mmc4_images, select_mmc4_images)
from lcl_megatron.tokenizer import get_tokenizer
from lcl_megatron.tokens import EOI_ID, EOT_ID, IMG_ID, SOI_ID, SOT_ID
from tests.support.paths import MMC4_DIR

MMC4 = MMC4_DIR / "docs_no_face_shard_151_v3.sample40.jsonl"
I = IMG_ID


def numbers(texts):
    """Hand-checkable 'tokenizer': "3 4" -> [3, 4]."""
    return [[int(w) for w in t.split()] for t in texts]


# ------------------------------------------------------------------ pairs


def test_pair_text_first_and_image_first():
    rng = random.Random(0)
    text = [1, 2, 3, 4, 5, 6]
    # context 10, P 2: caption cut to 10 - 2 - 4 = 4 tokens
    assert encode_pair(text, rng, num_image_tokens=2, context_length=10, img_first_prob=0.0) == \
        [SOT_ID, 1, 2, 3, 4, SOI_ID, I, I, EOI_ID]
    assert encode_pair(text, rng, num_image_tokens=2, context_length=10, img_first_prob=1.0) == \
        [SOI_ID, I, I, EOI_ID, 1, 2, 3, 4, EOT_ID]


def test_pair_choice_uses_the_given_rng_and_drops_literal_special_ids():
    draws = [random.Random(7).random() < 0.5 for _ in range(1)]
    ids = encode_pair([5, SOI_ID, 6], random.Random(7), num_image_tokens=1, context_length=20, img_first_prob=0.5)
    expected = [SOI_ID, I, EOI_ID, 5, 6, EOT_ID] if draws[0] else [SOT_ID, 5, 6, SOI_ID, I, EOI_ID]
    assert ids == expected


# ------------------------------------------------------------------ MMC4 selection and placement


def test_mmc4_selection_threshold_sort_one_per_sentence_and_max():
    matches = [(3, 0.30, "d"), (0, 0.25, "a"), (3, 0.50, "e"), (1, 0.10, "low"), (2, 0.24, "c"),
               (5, 0.9, "f"), (6, 0.9, "g")]
    rng = random.Random(1)
    chosen = select_mmc4_images(matches, rng, min_similarity=0.24, max_images=3)
    # groups after threshold and stable sort: [a] [c] [d, e] [f] [g]; one randint per group
    replay = random.Random(1)
    picks = [replay.randint(0, 0), replay.randint(0, 0), replay.randint(0, 1)]
    assert chosen == [(0, "a"), (2, "c"), (3, ["d", "e"][picks[2]])]
    assert rng.random() == (replay.randint(0, 0), replay.randint(0, 0), replay.random())[2]


def test_mmc4_selection_dedup_draws_both_images():
    seen = {select_mmc4_images([(0, 0.3, "x"), (0, 0.3, "y")], random.Random(s), min_similarity=0.24,
                               max_images=6)[0][1] for s in range(20)}
    assert seen == {"x", "y"}


def test_mmc4_placement_before_or_after_its_sentence():
    sentences = ["s0", "s1", "s2"]
    before = place_mmc4_images(sentences, [(0, "a"), (2, "b")], random.Random(0), img_first_prob=1.0)
    assert before.items == [Image("a"), Text("s0"), Text("s1"), Image("b"), Text("s2")]
    after = place_mmc4_images(sentences, [(0, "a"), (2, "b")], random.Random(0), img_first_prob=0.0)
    assert after.items == [Text("s0"), Image("a"), Text("s1"), Text("s2"), Image("b")]


def test_parse_mmc4_rejects_malformed():
    with pytest.raises(ValueError):
        parse_mmc4({"text_list": ["a"], "image_info": [{"image_name": "x", "matched_text_index": 3,
                                                        "matched_sim": 0.5}]})
    with pytest.raises(ValueError):
        parse_mmc4({"text_list": "a", "image_info": []})


# ------------------------------------------------------------------ documents


def doc(*items):
    return Document([Text(x) if isinstance(x, str) else x for x in items])


def test_document_without_truncation():
    ids, images = encode_document(doc("1 2", Image("a"), "3"), numbers, num_image_tokens=2, context_length=20)
    assert ids == [SOT_ID, 1, 2, SOI_ID, I, I, EOI_ID, 3, EOT_ID]
    assert images == [Image("a")]


def test_truncation_in_text_keeps_runs_and_ends_with_eot():
    # 12 tokens before cut: sot 1 soi I I eoi 2 3 4 5 6 eot -> context 10
    ids, images = encode_document(doc("1", Image("a"), "2 3 4 5 6"), numbers, num_image_tokens=2, context_length=10)
    assert ids == [SOT_ID, 1, SOI_ID, I, I, EOI_ID, 2, 3, 4, EOT_ID]
    assert images == [Image("a")]


def test_truncation_inside_a_run_ends_at_its_start_of_img():
    d = doc("1", Image("a"), "2", Image("b"), "3")
    # sot 1 [soi I I I eoi] 2 [soi I I I eoi] 3 eot ; context 10 cuts the second run
    ids, images = encode_document(d, numbers, num_image_tokens=3, context_length=10)
    assert ids == [SOT_ID, 1, SOI_ID, I, I, I, EOI_ID, 2, EOT_ID]
    assert images == [Image("a")]


def test_run_whose_end_of_img_became_eot_is_dropped():
    d = doc("1", Image("a"), "2")
    # sot 1 soi I I eoi ... ; context 6 leaves [sot 1 soi I I eot]
    assert encode_document(d, numbers, num_image_tokens=2, context_length=6) is None
    # the same cut with an earlier whole image keeps that one
    ids, images = encode_document(doc(Image("z"), "1", Image("a"), "2"), numbers, num_image_tokens=2,
                                  context_length=10)
    assert ids == [SOT_ID, SOI_ID, I, I, EOI_ID, 1, EOT_ID]
    assert images == [Image("z")]


def test_document_without_images_is_skipped():
    assert encode_document(doc("1 2 3"), numbers, num_image_tokens=2, context_length=20) is None


def test_literal_special_tokens_in_text_cannot_fake_an_image():
    tok = get_tokenizer()
    ids, images = encode_document(doc("look <start_of_img> here", Image("a")), tok.encode_batch,
                                  num_image_tokens=2, context_length=30)
    assert ids.count(SOI_ID) == 1 and len(images) == 1


# ------------------------------------------------------------------ real MMC4 documents


def reference_mmc4_ids(sentences, loaded, rng, tok, P, context):
    """The reference's string route: insert image strings into sentences, join, tokenize, fix truncation."""
    subseq = " <start_of_img> " + "<img_placehold> " * P + "<end_of_img> "
    sentences = list(sentences)
    for ix, _ in loaded:
        if rng.random() < 0.5:
            sentences[ix] = subseq + sentences[ix]
        else:
            sentences[ix] = sentences[ix] + subseq
    ids = [i for i in tok(" ".join(sentences), context_length=context)[0].tolist()]
    length = max(i for i, t in enumerate(ids) if t != 0) + 1  # no real id 0 at the end of these rows
    ids = ids[:length]
    if ids.count(SOI_ID) * P != ids.count(IMG_ID):
        last = max(i for i, t in enumerate(ids) if t == SOI_ID)
        ids = ids[:last] + [EOT_ID]
    return ids


@pytest.mark.parametrize("context", [2048, 300])
def test_real_mmc4_documents_match_the_reference_string_route(context):
    tok = get_tokenizer()
    P = 49
    raws = [json.loads(line) for line in MMC4.read_text().splitlines()]
    assert len(raws) == 40
    kept = truncated = lost_end_of_img = 0
    for n, raw in enumerate(raws):
        sentences, matches = parse_mmc4(raw)
        selected = select_mmc4_images(matches, random.Random(n), min_similarity=0.24, max_images=6)
        sims = {name: sim for _, sim, name in matches}
        assert all(sims[name] >= 0.24 for _, name in selected) and len(selected) <= 6
        assert [i for i, _ in selected] == sorted({i for i, _ in selected})  # one per sentence, in order
        if not selected:
            continue
        document = place_mmc4_images(sentences, selected, random.Random(1000 + n))
        encoded = encode_document(document, tok.encode_batch, num_image_tokens=P, context_length=context)
        expected = reference_mmc4_ids(sentences, selected, random.Random(1000 + n), tok, P, context)
        starts = [i for i, t in enumerate(expected) if t == SOI_ID]
        if starts and expected[-2] == IMG_ID:
            # the reference keeps a last run whose <end_of_img> became <end_of_text>; we end at its start
            expected = expected[:starts[-1]] + [EOT_ID]
            lost_end_of_img += 1
        if encoded is None:
            assert expected.count(SOI_ID) == 0
            continue
        ids, images = encoded
        assert ids == expected
        assert len(images) == ids.count(SOI_ID) <= len(selected)
        assert [image.name for image in images] == [name for _, name in selected][:len(images)]
        kept += 1
        truncated += len(images) < len(selected)
    assert kept >= 20
    if context == 300:
        assert truncated > 0 and lost_end_of_img > 0  # both truncation rules were exercised
