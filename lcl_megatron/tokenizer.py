"""CLIP BPE tokenizer plus LCL's three image tokens, built on HF `tokenizers`.

Ids equal the reference's (OpenCLIP `SimpleTokenizer` with the added special
tokens) on any text. The reference cleans text (ftfy, html unescape twice,
whitespace collapse, lower-case), splits it with one regex (special-token
strings first, then contractions, letter runs, single digits, other-symbol
runs; case-insensitive) and runs byte-level BPE with a `</w>` end-of-word
suffix on each piece. We clean with the same Python calls and let `tokenizers`
do the split and the BPE, which is where the time goes.

Two details keep the split exact:
- `tokenizers` matches with Oniguruma, whose Unicode tables are older than the
  `regex` module's (about 17k newer letters are missing), and case-insensitive
  matching differs between the two. So every character class and every
  case-insensitive literal is spelled out as explicit code points taken from
  the `regex` module under the reference's flags.
- The reference maps a special-token string to its id only where the regex
  split yields it as a whole piece (so "!<img_placehold>" is plain text, since
  "!<" is one symbol run). `tokenizers`' added tokens would match it anywhere,
  so instead the BPE model gets extra merges that fuse exactly that piece into
  its id; see `_fuse_special_tokens`.
"""

import functools
import gzip
import html
from pathlib import Path

import ftfy
import regex
import torch
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lcl_megatron.tokens import (
    ADDED_SPECIAL_TOKENS,
    CLIP_BPE_VOCAB_SIZE,
    END_OF_TEXT,
    EOT_ID,
    PAD_ID,
    SOT_ID,
    SPECIAL_TOKEN_IDS,
    START_OF_TEXT,
    VOCAB_SIZE,
)

MERGES_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
END_OF_WORD = "</w>"
# CLIP keeps this many merges of the file: 49,408 ids = 2 x 256 byte symbols + merges + 2.
NUM_MERGES = CLIP_BPE_VOCAB_SIZE - 2 * 256 - 2
# Every special-token string, in the reference's vocabulary order.
SPECIAL_TOKENS = (START_OF_TEXT, END_OF_TEXT, *ADDED_SPECIAL_TOKENS)
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clean_text(text: str) -> str:
    """The reference's text cleaning: fix mojibake, unescape html twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def byte_symbols() -> dict[int, str]:
    """Byte -> printable symbol, in CLIP's id order (printable bytes first, then the rest shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def read_merges() -> list[tuple[str, str]]:
    lines = gzip.decompress(MERGES_FILE.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header.
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


# Every Unicode scalar value, as two runs around the surrogates (which text can never hold).
SCALAR_RANGES = ((0, 0xD800), (0xE000, 0x110000))


def oniguruma_class(python_class: str, scalar_texts: list[str]) -> str:
    """An Oniguruma bracket class of exactly the characters `python_class` matches in `regex`, ignoring case.

    `scalar_texts` holds the characters of each of SCALAR_RANGES, in order.
    """
    runs = regex.compile(f"(?:{python_class})+", regex.IGNORECASE)
    ranges = [
        (lo + m.start(), lo + m.end() - 1)
        for (lo, _), text in zip(SCALAR_RANGES, scalar_texts)
        for m in runs.finditer(text)
    ]
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[{body}]"


def split_pattern() -> str:
    """The reference's split regex rewritten for Oniguruma with explicit code points (see module doc)."""
    texts = ["".join(map(chr, range(lo, hi))) for lo, hi in SCALAR_RANGES]
    char = functools.cache(lambda ch: oniguruma_class(regex.escape(ch), texts))
    literals = ["".join(char(ch) for ch in literal) for literal in (*SPECIAL_TOKENS, *CONTRACTIONS)]
    letters = oniguruma_class(r"[\p{L}]", texts)
    digit = oniguruma_class(r"[\p{N}]", texts)
    symbols = oniguruma_class(r"[^\s\p{L}\p{N}]", texts)
    return "|".join([*literals, letters + "+", digit, symbols + "+"])


def _fuse_special_tokens(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Append merges that turn each whole special-token piece into its id.

    BPE ends every piece with a `</w>` symbol, so a special string first splits
    into ordinary CLIP symbols. The appended merges chain those symbols back
    together (rank after every CLIP merge, so CLIP's merging is finished first)
    into `special + "</w>"`, which the vocab maps to the special id. Each chain
    needs "<" directly followed by a letter symbol; split pieces are letter
    runs, digits, symbol runs, contractions (which start with "'") or specials,
    so no ordinary piece can use these merges, and the case variants the split
    also accepts ("<ſtart_of_text>") differ right after "<". Intermediate
    symbols get ids past the vocabulary and never survive a piece.
    """
    clip_bpe = models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix=END_OF_WORD)
    next_id = max(vocab.values()) + 1
    for special in SPECIAL_TOKENS:
        symbols = [token.value for token in clip_bpe.tokenize(special)]
        fused = symbols[0]
        for symbol in symbols[1:]:
            merges.append((fused, symbol))
            fused += symbol
            if fused not in vocab:
                vocab[fused] = next_id
                next_id += 1
        assert fused == special + END_OF_WORD
        vocab[fused] = SPECIAL_TOKEN_IDS[special]
        # The bare string can never be a BPE output; keep ids unique for `tokenizers`.
        del vocab[special]


class Tokenizer:
    """CLIP BPE with `<img_placehold>`, `<start_of_img>`, `<end_of_img>`; ids equal the reference's."""

    def __init__(self):
        symbols = list(byte_symbols().values())
        merges = read_merges()
        tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
            raise ValueError(f"{MERGES_FILE} does not give the {VOCAB_SIZE} distinct CLIP+LCL tokens")
        self.vocab_size = VOCAB_SIZE
        self._id_to_token = tokens
        self._symbol_to_byte = {s: b for b, s in byte_symbols().items()}

        vocab = {token: i for i, token in enumerate(tokens)}
        _fuse_special_tokens(vocab, merges)
        self._hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
        self._hf.pre_tokenizer = pre_tokenizers.Sequence([
            # invert + removed keeps exactly the regex matches, like `findall`.
            pre_tokenizers.Split(Regex(split_pattern()), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned text, without start/end tokens."""
        return self._hf.encode(clean_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        cleaned = [clean_text(t) for t in texts]
        return [e.ids for e in self._hf.encode_batch(cleaned, add_special_tokens=False)]

    def decode(self, ids) -> str:
        symbols = "".join(self._id_to_token[int(i)] for i in ids)
        raw = bytes(self._symbol_to_byte[s] for s in symbols)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.LongTensor:
        """Rows `[sot] + ids + [eot]`, cut to `context_length` keeping `eot` last, right-padded with PAD_ID."""
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, ids in zip(rows, self.encode_batch(texts)):
            tokens = [SOT_ID, *ids][: context_length - 1] + [EOT_ID]
            row[: len(tokens)] = torch.tensor(tokens)
        return rows


@functools.cache
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
