"""Tokenizer folders built offline (no hub access), for random-weight stand-ins and tests.

* CLIP: rebuilt **exactly** from the ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships (49408 tokens; ids match
  open_clip's ``SimpleTokenizer`` up to the end token; transformers pads with ``<|endoftext|>`` (49407) where
  open_clip pads with 0); load with ``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``.
* T5: a sentencepiece unigram model trained here from words of the CLIP merges, a **stand-in** for the released
  ``spiece.model`` (same special ids: pad 0, eos 1, unk 2; optionally exactly 32000 pieces and 100 extra ids, the
  real sizes); load with ``T5TokenizerFast.from_pretrained(dir)``.
* BERT: a small handwritten WordPiece vocab, a **stand-in** for ``bert-base-uncased`` (ImageReward's tokenizer).

Every builder writes into a folder you give and is deterministic: the same call writes the same bytes.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

__all__ = ["bpe_path", "build_clip_tokenizer", "build_t5_tokenizer", "build_bert_vocab", "build_clip_processor",
           "BERT_WORDS", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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


def build_clip_tokenizer(out_dir: str | Path, merges: int | None = None) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (49408 tokens) for ``CLIPTokenizer``.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.
        merges (`int`, *optional*): keep only the first ``merges`` BPE merges (vocabulary ``512 + merges + 2``):
            the same tokenizer algorithm with a small vocabulary, for tiny text encoders whose width cannot be
            small (SD1.5's 768-wide cross-attention). Default: all of them, the exact CLIP tokenizer.

    Returns:
        `Path`: the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()[:merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def _t5_corpus(exact: bool) -> list[str]:
    """Training lines: words of the CLIP merges (every 8th word for a small model; all words plus joined word
    pairs when the exact 32000-piece size is needed, which the plain word list cannot reach), and the common
    prompt words of :data:`BERT_WORDS` repeated, so that they become whole pieces as in a real vocabulary."""
    words = sorted({"".join(m.split()).replace("</w>", "") for m in _clip_merges()})
    words = [w for w in words if w.isascii() and w.isalpha()]
    if not exact:
        words = words[::8]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    if exact:
        lines += ["".join(words[i:i + 2]) + " " + "".join(words[i + 2:i + 4]) for i in range(0, len(words) - 4, 3)]
    return lines + [" ".join(BERT_WORDS)] * 50


def _train_spiece(out: Path, vocab_size: int, exact: bool) -> Path:
    """Train ``spiece.model`` into ``out``; single-threaded (the pieces depend on the thread count) and with the
    machine-specific fields of the stored trainer spec (input and output paths) normalised, so the file is
    byte-identical wherever it is built."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="epd_spiece_") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_t5_corpus(exact)) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "spiece"), vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=exact, minloglevel=2, num_threads=1)
        proto = pb.ModelProto()
        proto.ParseFromString((Path(tmp) / "spiece.model").read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("corpus.txt")
    proto.trainer_spec.model_prefix = "spiece"
    path = out / "spiece.model"
    path.write_bytes(proto.SerializeToString(deterministic=True))
    return path


def build_t5_tokenizer(out_dir: str | Path, vocab_size: int = 1000, extra_ids: int = 0, exact: bool = False) -> Path:
    """Train a sentencepiece unigram model and save a ``T5TokenizerFast`` folder.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.
        vocab_size (`int`): sentencepiece pieces (a soft target unless ``exact``).
        extra_ids (`int`): ``<extra_id_*>`` sentinel tokens appended (100 in the released T5 tokenizers).
        exact (`bool`): reach ``vocab_size`` exactly (larger corpus; about 5 s for 32000 pieces).

    Returns:
        `Path`: the folder (loadable by ``T5TokenizerFast.from_pretrained``).
    """
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _train_spiece(out, vocab_size, exact)
    tok = T5TokenizerFast(vocab_file=str(model), extra_ids=extra_ids, model_max_length=512)
    tok.save_pretrained(str(out))
    T5TokenizerFast.from_pretrained(str(out), local_files_only=True)  # fail here, not in the caller, if the folder is unusable
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


def build_clip_processor(out_dir: str | Path, image_size: int = 224, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a ``CLIPProcessor`` folder (rebuilt CLIP tokenizer + CLIP image processor) like the laion CLIP-H one.

    Args:
        out_dir (`str` or `Path`): folder to create/fill.
        image_size (`int`): resize shortest edge / centre-crop size.
        tokenizer_dir (`str` or `Path`, *optional*): a folder from :func:`build_clip_tokenizer` (default: built
            into a temporary folder).

    Returns:
        `Path`: the folder (loadable by ``AutoProcessor.from_pretrained(dir)``).
    """
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="epd_clip_tok_") as tmp:
        src = tokenizer_dir or build_clip_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(str(src), model_max_length=77, local_files_only=True)
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(out))
    return out
