"""Token ids shared by the tokenizer, the data pipeline, the model and the loss.

This module is the single source of truth for special-token ids; they equal
the LCL reference's (CLIP BPE ids 0..49407 plus three added tokens).
"""

CLIP_BPE_VOCAB_SIZE = 49408

START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
IMG_PLACEHOLDER = "<img_placehold>"
START_OF_IMG = "<start_of_img>"
END_OF_IMG = "<end_of_img>"

SOT_ID = 49406
EOT_ID = 49407
IMG_ID = 49408
SOI_ID = 49409
EOI_ID = 49410

# The added tokens, in the order the reference passes them to its tokenizer.
ADDED_SPECIAL_TOKENS = (IMG_PLACEHOLDER, START_OF_IMG, END_OF_IMG)
SPECIAL_TOKEN_IDS = {
    START_OF_TEXT: SOT_ID,
    END_OF_TEXT: EOT_ID,
    IMG_PLACEHOLDER: IMG_ID,
    START_OF_IMG: SOI_ID,
    END_OF_IMG: EOI_ID,
}
VOCAB_SIZE = CLIP_BPE_VOCAB_SIZE + len(ADDED_SPECIAL_TOKENS)  # 49,411

# Rows are right-padded with id 0 (the reference's convention). Id 0 is also a
# real BPE token ("!"), so padding is always carried as an explicit mask too.
PAD_ID = 0

# Zero-shot text features are read from rows cut to this many tokens.
ZEROSHOT_CONTEXT_LENGTH = 77
