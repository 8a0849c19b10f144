"""Offline tokenizer folders for tests (no hub access).

* CLIP: rebuilt exactly from the ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships (ids match open_clip's
  ``SimpleTokenizer`` up to the end token; transformers pads with ``<|endoftext|>`` (49407) where open_clip pads
  with 0); load with ``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``.
* T5: a sentencepiece unigram model trained on the fly from words of the CLIP merges (synthetic stand-in);
  load with ``T5TokenizerFast.from_pretrained(dir)``.
* BERT: a small handwritten WordPiece vocab (synthetic stand-in for ``bert-base-uncased``), as used by ImageReward's
  ``BertTokenizer``.

Each ``*_dir()`` helper builds once per process into a temporary folder and returns the cached path; the
``build_*`` functions write into a folder you give.
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = [
    "bpe_path", "build_clip_tokenizer", "build_t5_tokenizer", "build_bert_vocab",
    "clip_tokenizer_dir", "t5_tokenizer_dir", "bert_vocab_dir", "BERT_WORDS", "build_clip_processor",
]


def bpe_path() -> Path:
    """The BPE merges file shipped inside the open_clip wheel."""
    import open_clip

    p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not p.is_file():  # pragma: no cover - depends on the installed wheel
        raise FileNotFoundError(f"open_clip does not ship {p.name}; cannot rebuild the CLIP tokenizer offline")
    return p


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_merges() -> list[str]:
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    return lines[1: 49152 - 256 - 2 + 1]


def build_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (49408 tokens) for ``CLIPTokenizer``.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.

    Returns:
        `Path`: the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def build_t5_tokenizer(out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train a small sentencepiece unigram model and save a ``T5TokenizerFast`` folder.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.
        vocab_size (`int`): target vocabulary size (soft limit).

    Returns:
        `Path`: the folder (loadable by ``T5TokenizerFast.from_pretrained``).
    """
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({"".join(m.split()).replace("</w>", "") for m in _clip_merges()[:20000]})
    words = [w for w in words if w.isascii() and w.isalpha()]
    corpus = out / "_corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n")
    prefix = out / "spiece"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    corpus.unlink()
    (out / "spiece.vocab").unlink(missing_ok=True)
    tok = T5TokenizerFast(vocab_file=str(out / "spiece.model"), extra_ids=0, model_max_length=512)
    tok.save_pretrained(str(out))
    T5TokenizerFast.from_pretrained(str(out))  # fail here, not in the test, if the folder is unusable
    return out


BERT_WORDS = (
    "a an the of on in with and is are to at by for from photo picture image painting drawing portrait of "
    "cat dog bird horse car tree house city street sky sun moon water sea river mountain flower forest man woman "
    "child person people red green blue yellow black white orange purple big small old new beautiful cute "
    "sitting standing running flying eating wearing hat table chair window room night day light dark art style "
    "digital oil realistic detailed high quality astronaut riding rocket robot castle garden beach snow rain"
).split()


def build_bert_vocab(out_dir: str | Path) -> Path:
    """Write a small ``vocab.txt`` (BERT specials, a few hundred words, single characters, ``##`` pieces).

    Args:
        out_dir (`str` or `Path`): folder to create/fill.

    Returns:
        `Path`: the folder (``BertTokenizer.from_pretrained(dir)`` or ``BertTokenizer(dir / "vocab.txt")``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'-:;()\"")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(tokens)
    for t in list(dict.fromkeys(BERT_WORDS)) + chars + ["##" + c for c in chars if c.isalnum()]:
        if t not in seen:
            tokens.append(t)
            seen.add(t)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return out


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
    """Write a ``CLIPProcessor`` folder (rebuilt CLIP tokenizer + CLIP image processor) like the laion CLIP-H one.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.
        image_size (`int`): resize shortest edge / centre-crop size.

    Returns:
        `Path`: the folder (loadable by ``AutoProcessor.from_pretrained(dir)``).
    """
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77)
    ip = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(out))
    return out
