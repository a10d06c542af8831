"""The tiny pipelines' tokenizers, built in-process (no download) over a small vocabulary of prompt words.

Used by :mod:`senseflow_algos.models.tiny` (random-weight FLUX / SD 3.5 pipelines for tests) and by the shapes
world's teacher (:mod:`senseflow_algos.shapes.components`), whose captions are made of these words: every word of
:data:`WORDS` is one token in both tokenizers.

Example:
    >>> tiny_t5_tokenizer()('a red circle').input_ids
    [31, 3, 17, 1]
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizerFast, T5TokenizerFast

__all__ = ['CLIP_MAX_LENGTH', 'T5_MAX_LENGTH', 'WORDS', 'tiny_clip_tokenizer', 'tiny_t5_tokenizer']

#: ``model_max_length`` of the tokenizers (CLIP's and T5's usual lengths; the shapes world sets shorter ones).
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

_CLIP_BOS, _CLIP_EOS, _EOW = "<|startoftext|>", "<|endoftext|>", "</w>"
_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
#: The vocabulary: each of these words (and each single character) is one token.
WORDS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "circle square triangle rectangle star ellipse oval hexagon pentagon cross heart diamond line dot "
    "a an the above below left right of and on in to with next top bottom small large big tiny "
    "photo image picture background"
).split() + list(_CHARS)


def _bpe_merge(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges the way ``tokenizers`` does: lowest rank first, then leftmost."""
    while True:
        candidates = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not candidates:
            return pieces
        _, i = min(candidates)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]


def tiny_clip_tokenizer() -> CLIPTokenizerFast:
    """Builds a CLIP-style BPE tokenizer in which every word of ``WORDS`` is one token.

    Other words fall back to single characters; unknown characters map to the
    end-of-text token, which CLIP also uses as unk and pad token.
    """
    vocab = {_CLIP_BOS: 0, _CLIP_EOS: 1}
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + _EOW, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    # Add merges until each word encodes to one token; later merges have a higher
    # rank, so they never change how earlier words are encoded.
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + _EOW]
        while len(pieces := _bpe_merge(pieces, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    backend = Tokenizer(models.BPE(vocab, list(ranks), unk_token=_CLIP_EOS, end_of_word_suffix=_EOW))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # CLIPTokenizerFast requires a pre-tokenizer Sequence.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_CLIP_BOS} $A {_CLIP_EOS}",
        pair=f"{_CLIP_BOS} $A {_CLIP_EOS} $B {_CLIP_EOS}",
        special_tokens=[(_CLIP_BOS, 0), (_CLIP_EOS, 1)],
    )
    backend.decoder = decoders.BPEDecoder(suffix=_EOW)
    return CLIPTokenizerFast(tokenizer_object=backend, model_max_length=CLIP_MAX_LENGTH)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """Builds a word-level T5-style tokenizer; unknown words map to ``<unk>``."""
    vocab = {tok: i for i, tok in enumerate([_T5_PAD, _T5_EOS, _T5_UNK, *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_T5_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}", pair=f"$A {_T5_EOS} $B {_T5_EOS}", special_tokens=[(_T5_EOS, 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=T5_MAX_LENGTH)
