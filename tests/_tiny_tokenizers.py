"""Offline tokenizer folders for tests (no hub access), cached once per process.

The builders live in :mod:`epd.tiny_tokenizers` (``epd weights fake`` uses them too); this module re-exports them
and adds ``*_dir()`` helpers that build once per process into a temporary folder and return the cached path.

* CLIP: rebuilt exactly from the BPE file open_clip ships; load with
  ``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``.
* T5: a sentencepiece unigram stand-in; load with ``T5TokenizerFast.from_pretrained(dir)``.
* BERT: a small handwritten WordPiece vocab (stand-in for ``bert-base-uncased``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from epd.tiny_tokenizers import (BERT_WORDS, bpe_path, build_bert_vocab, build_clip_tokenizer,  # noqa: F401
                                 build_t5_tokenizer)
from epd.tiny_tokenizers import build_clip_processor as _build_clip_processor

__all__ = [
    "bpe_path", "build_clip_tokenizer", "build_t5_tokenizer", "build_bert_vocab",
    "clip_tokenizer_dir", "t5_tokenizer_dir", "bert_vocab_dir", "BERT_WORDS", "build_clip_processor",
]


@lru_cache(maxsize=None)
def _session_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="epd_tiny_tok_"))
    atexit.register(shutil.rmtree, root, True)
    return root


@lru_cache(maxsize=None)
def clip_tokenizer_dir() -> Path:
    """A CLIP tokenizer folder built once per process."""
    return build_clip_tokenizer(_session_root() / "clip")


@lru_cache(maxsize=None)
def t5_tokenizer_dir() -> Path:
    """A T5 tokenizer folder built once per process."""
    return build_t5_tokenizer(_session_root() / "t5")


@lru_cache(maxsize=None)
def bert_vocab_dir() -> Path:
    """A BERT WordPiece vocab folder built once per process."""
    return build_bert_vocab(_session_root() / "bert")


def build_clip_processor(out_dir: str | Path, image_size: int = 224) -> Path:
    """A ``CLIPProcessor`` folder (rebuilt CLIP tokenizer + CLIP image processor) like the laion CLIP-H one."""
    return _build_clip_processor(out_dir, image_size, tokenizer_dir=clip_tokenizer_dir())
