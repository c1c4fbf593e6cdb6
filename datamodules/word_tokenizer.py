"""A closed-vocabulary word-level tokenizer for synthetic corpora such as the shapes world.

The tiny default LLM cannot afford a BPE vocabulary learned from web text, and the synthetic world has
a small, fully known vocabulary, so this module builds a Hugging Face `PreTrainedTokenizerFast` whose
vocabulary is exactly the words and punctuation of a corpus. Pre-tokenisation isolates newlines, turns
spaces into a Metaspace marker `▁` glued to the following word, and isolates punctuation; every word is
entered both bare (start of a line or text) and with `▁` (after a space), so any chunking of a known
text by a chat template still tokenises without `<unk>`, and decoding reproduces the text exactly. The
special tokens take ids 0..4 in the order `<unk>`, `<s>`, `</s>`, `<pad>`, `<image>`; a BOS is added
by the post-processor like Llama's tokenizer does. The constant texts that chat templates wrap around
conversations (`CHAT_TEXTS`) are always part of the vocabulary. Save with `save_pretrained` and load
with `load_word_tokenizer` (a thin `AutoTokenizer.from_pretrained`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from datamodules.templates import IMAGE_PLACEHOLDER, VICUNA_SYSTEM

if TYPE_CHECKING:
    # transformers takes seconds to import; data-generation worker processes never need it.
    from transformers import PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = IMAGE_PLACEHOLDER
# Order fixes the ids 0..4, which downstream code (and saved checkpoints) may rely on.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
METASPACE = "▁"

#: The fixed words of the conversation templates, so any template renders without unknown words.
CHAT_TEXTS = (VICUNA_SYSTEM, "USER: ASSISTANT:")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary covers every pre-token of `texts` and `CHAT_TEXTS`.

    Each word `w` is added as both `w` and `▁w`, plus a bare `▁` (a trailing space before `<image>` or
    at a template boundary pre-tokenises to it). Non-special ids are assigned in sorted order, so the
    result depends only on the set of pre-tokens, not on the order or multiplicity of `texts`.
    """
    pre = _pre_tokenizer()
    words: set[str] = {METASPACE, "\n"}
    for text in (*CHAT_TEXTS, *texts):
        # Special tokens are matched before pre-tokenisation, so strip them as the tokenizer would.
        for piece in _split_specials(text):
            for token, _ in pre.pre_tokenize_str(piece):
                bare = token[1:] if token.startswith(METASPACE) else token
                if bare:
                    words.add(bare)
                    words.add(METASPACE + bare)
    words.difference_update(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab[word] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="never")
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
    )


def _split_specials(text: str) -> list[str]:
    pieces = [text]
    for special in SPECIAL_TOKENS:
        pieces = [part for piece in pieces for part in piece.split(special)]
    return [p for p in pieces if p]


def load_word_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (offline; `path` is a local folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def unknown_words(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[str]:
    """Return the texts of `texts` that contain at least one `<unk>` token (empty when all are known)."""
    texts = list(texts)
    if not texts:
        return []
    unk = tokenizer.unk_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [text for text, ids in zip(texts, encoded, strict=True) if unk in ids]
