"""Our tokenizer against the reference's (OpenCLIP SimpleTokenizer with LCL's added tokens)."""

import importlib.util
import json
import random

import pytest
import torch

from lcl_megatron.tokenizer import get_tokenizer
from tests.support.paths import MMC4_DIR, open_clip_file
from lcl_megatron.tokens import ADDED_SPECIAL_TOKENS, EOI_ID, EOT_ID, IMG_ID, PAD_ID, SOI_ID, SOT_ID, VOCAB_SIZE

VENV_OPEN_CLIP_TOKENIZER = open_clip_file("tokenizer.py")
MMC4_FILES = sorted(MMC4_DIR.glob("*.jsonl"))

TRICKY = [
    "",
    "   ",
    "Hello, World!",
    "it's isn't they're we've I'm you'll he'd IT'S",
    "'s 't'tis rock'n'roll",
    "multiple    spaces\tand\ttabs\nand\r\nnewlines  ",
    "café naïve Ünïcödé ß ẞ İstanbul ǅ",
    "日本語のテキスト 中文 한국어 العربية עברית",
    "emoji 😀👍🏽👨‍👩‍👧 🇫🇷",
    "&amp; &amp;amp; &lt;b&gt; &quot;q&quot; &#39; &nbsp;x",
    "mojibake: â€œquotedâ€\x9d and Ã©",
    "“curly” ‘quotes’ — dashes – … ﬁ ligature",
    "digits 1234567890 3.14159 1,000,000 ٣ ½ ⅷ",
    "<img_placehold>",
    "a <start_of_img><img_placehold><img_placehold><end_of_img> b",
    "<START_OF_IMG>upper<End_Of_Img>",
    "!!<img_placehold> (<start_of_img>) x<end_of_img>y",
    "<start_of_text> text <end_of_text>",
    "<ſtart_of_text> <ſtart_of_img> 'ſ long s, kelvin K",
    "<img_placehold <start_of_img <end_of_img",
    "combining a\u0345b and zero\u200bwidth",
    # Letters and digits newer than the Unicode tables of `tokenizers`' regex engine.
    "\U000107bb\U00010940 \U00011de0\U00011de1 \U00031350\U000323af",
    "x" * 300,
    "word " * 100,
]


def load_reference_tokenizer():
    spec = importlib.util.spec_from_file_location("reference_clip_tokenizer", VENV_OPEN_CLIP_TOKENIZER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(additional_special_tokens=list(ADDED_SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def reference():
    return load_reference_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def mmc4_sentences() -> list[str]:
    return [s for path in MMC4_FILES for line in open(path) for s in json.loads(line)["text_list"]]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Random strings mixing ASCII, spaces, special-token strings and code points from every plane."""
    rng = random.Random(seed)
    pieces = [*" \t\n'!<>_&;#", "&amp;", "'s", "'ll", *ADDED_SPECIAL_TOKENS, "<end_of_text>", "abc", "Zebra", "42"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.5:
                parts.append(rng.choice(pieces))
            else:
                cp = rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x300, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
                parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
        texts.append("".join(parts))
    return texts


def test_vocab_size(tokenizer, reference):
    assert tokenizer.vocab_size == reference.vocab_size == VOCAB_SIZE


def test_mmc4_sentences_match_reference(tokenizer, reference):
    sentences = mmc4_sentences()
    assert len(sentences) > 500
    expected = [reference.encode(s) for s in sentences]
    assert tokenizer.encode_batch(sentences) == expected
    assert [tokenizer.encode(s) for s in sentences[:50]] == expected[:50]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_matches_reference(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode(text)


def test_random_text_matches_reference(tokenizer, reference):
    texts = random_texts(1500)
    ours = tokenizer.encode_batch(texts)
    assert ours == [reference.encode(t) for t in texts]
    # Merges that only exist to fuse special tokens never leave an id outside the vocabulary.
    assert max(max(ids, default=0) for ids in ours) < VOCAB_SIZE


def test_special_token_strings(tokenizer):
    ids = tokenizer.encode("<start_of_img><img_placehold><img_placehold><end_of_img>")
    assert ids == [SOI_ID, IMG_ID, IMG_ID, EOI_ID]
    # After a symbol the reference reads the string as plain text.
    assert IMG_ID not in tokenizer.encode("!<img_placehold>")


def test_decode_matches_reference(tokenizer, reference):
    for text in [*TRICKY, *mmc4_sentences()[:100]]:
        ids = reference.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.decode(torch.tensor(tokenizer.encode("a cat"))) == "a cat "


@pytest.mark.parametrize("context_length", [1, 2, 5, 77, 128])
def test_call_matches_reference(tokenizer, reference, context_length):
    texts = [*TRICKY, *mmc4_sentences()[:40]]
    ours = tokenizer(texts, context_length=context_length)
    assert ours.dtype == torch.long
    assert torch.equal(ours, reference(texts, context_length=context_length))


def test_call_layout(tokenizer):
    row = tokenizer("a photo of a cat", context_length=10)[0].tolist()
    assert row[0] == SOT_ID and row[6] == EOT_ID and row[7:] == [PAD_ID] * 3
    cut = tokenizer("word " * 50, context_length=8)[0].tolist()
    assert cut[0] == SOT_ID and cut[-1] == EOT_ID and PAD_ID not in cut
