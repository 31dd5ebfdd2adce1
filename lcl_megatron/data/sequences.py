"""Documents and pairs -> token ids, with the LCL reference's rules.

An image occupies `<start_of_img>` + P x `<img_placehold>` + `<end_of_img>` in
the sequence. All randomness comes from the `random.Random` passed in, and is
drawn in the reference's order, so a seed fixes every choice.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from lcl_megatron.tokens import EOI_ID, EOT_ID, IMG_ID, SOI_ID, SOT_ID
from lcl_megatron.data.documents import Document, Image, Text

# Ids that only the data pipeline may place; text that spells them is not trusted.
_STRUCTURAL_IDS = frozenset((SOT_ID, EOT_ID, IMG_ID, SOI_ID, EOI_ID))

EncodeBatch = Callable[[list[str]], list[list[int]]]


def image_run(num_image_tokens: int) -> list[int]:
    return [SOI_ID] + [IMG_ID] * num_image_tokens + [EOI_ID]


def text_ids_only(ids: Sequence[int]) -> list[int]:
    """Drop special ids that literal text such as "<start_of_img>" can tokenize to: an
    image run without an image would break the batch contract."""
    return [i for i in ids if i not in _STRUCTURAL_IDS]


# ------------------------------------------------------------------ pairs


def encode_pair(text_ids: Sequence[int], rng: random.Random, *, num_image_tokens: int,
                context_length: int, img_first_prob: float) -> list[int]:
    """One image-text pair -> ids (unpadded), as the reference's InterleavedWrapper.

    The caption is cut to `context - P - 4` tokens; with probability
    `img_first_prob` the row is `run + text + [eot]`, otherwise `[sot] + text + run`.
    """
    text = text_ids_only(text_ids)[: context_length - num_image_tokens - 4]
    run = image_run(num_image_tokens)
    if rng.random() < img_first_prob:
        return run + text + [EOT_ID]
    return [SOT_ID] + text + run


# ------------------------------------------------------------------ MMC4 documents


def parse_mmc4(raw) -> tuple[list[str], list[tuple[int, float, str]]]:
    """Validate an MMC4 JSON document -> (sentences, [(matched_text_index, matched_sim, image_name)])."""
    if not isinstance(raw, dict):
        raise ValueError("MMC4 document is not a JSON object")
    sentences, infos = raw.get("text_list"), raw.get("image_info")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ValueError("MMC4 document needs 'text_list', a list of strings")
    if not isinstance(infos, list):
        raise ValueError("MMC4 document needs 'image_info', a list")
    matches = []
    for info in infos:
        try:
            index, sim, name = info["matched_text_index"], info["matched_sim"], info["image_name"]
        except (TypeError, KeyError) as e:
            raise ValueError(f"MMC4 image_info entry lacks {e}") from None
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(sentences)
                or not isinstance(sim, (int, float)) or not isinstance(name, str)):
            raise ValueError(f"MMC4 image_info entry is malformed: {info!r}")
        matches.append((index, float(sim), name))
    return sentences, matches


def select_mmc4_images(matches: Sequence[tuple[int, float, str]], rng: random.Random, *,
                       min_similarity: float, max_images: int,
                       one_per_sentence: bool = True) -> list[tuple[int, str]]:
    """The reference's image selection -> [(sentence_index, image_name)] in sentence order.

    Drop matches below `min_similarity`, sort by sentence (stable), keep one image
    per sentence drawn at random (one draw per sentence, even a sentence with one
    image, as the reference does; `one_per_sentence=False` keeps them all), keep
    the first `max_images`.
    """
    kept = sorted(((index, name) for index, sim, name in matches if sim >= min_similarity), key=lambda m: m[0])
    if not one_per_sentence:
        return kept[:max_images]
    chosen = []
    start = 0
    while start < len(kept):
        end = start
        while end < len(kept) and kept[end][0] == kept[start][0]:
            end += 1
        chosen.append(kept[start + rng.randint(0, end - start - 1)])
        start = end
    return chosen[:max_images]


def place_mmc4_images(sentences: Sequence[str], images: Sequence[tuple[int, str]],
                      rng: random.Random, img_first_prob: float = 0.5) -> Document:
    """Put each image before its sentence with probability `img_first_prob`, else after it.

    `images` are the selected images that actually loaded, in sentence order
    (the reference draws placement only for those); several images of one
    sentence keep their order.
    """
    before: dict[int, list[str]] = {}
    after: dict[int, list[str]] = {}
    for index, name in images:
        (before if rng.random() < img_first_prob else after).setdefault(index, []).append(name)
    items: list = []
    for index, sentence in enumerate(sentences):
        items += [Image(name) for name in before.get(index, ())]
        items.append(Text(sentence))
        items += [Image(name) for name in after.get(index, ())]
    return Document(items)


# ------------------------------------------------------------------ documents


def encode_document(doc: Document, encode_batch: EncodeBatch, *, num_image_tokens: int,
                    context_length: int) -> tuple[list[int], list[Image]] | None:
    """Document -> (ids, images in the ids' order), or None when no image survives.

    As the reference does for MMC4: `[sot] + items + [eot]` with text items joined
    by spaces (tokenizing each item alone gives the same ids, since CLIP's BPE
    never merges across whitespace), truncated to `context_length` with the last
    token set to `<end_of_text>`. If truncation cut an image run, the sequence
    ends at that run's `<start_of_img>`, which becomes `<end_of_text>`, and the
    image is dropped. (The reference keeps a run whose only loss is its
    `<end_of_img>`; here every kept run is whole, so the batch contract holds.)
    """
    texts = [item.text for item in doc.items if isinstance(item, Text)]
    encoded = iter(encode_batch(texts)) if texts else iter(())
    run = image_run(num_image_tokens)
    ids = [SOT_ID]
    images: list[Image] = []
    for item in doc.items:
        if isinstance(item, Text):
            ids.extend(text_ids_only(next(encoded)))
        else:
            ids.extend(run)
            images.append(item)
        if len(ids) > context_length:
            break  # everything further is cut anyway
    ids.append(EOT_ID)
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = EOT_ID
        run_length = len(run)
        starts = [i for i, t in enumerate(ids) if t == SOI_ID]
        if starts and starts[-1] + run_length > len(ids) - 1:
            # the last run lost its tail (or its <end_of_img> became <end_of_text>)
            ids = ids[: starts[-1]] + [EOT_ID]
            starts.pop()
        images = images[: len(starts)]
    if not images:
        return None
    return ids, images
