"""Offline construction of Stable Diffusion v1's CLIP tokenizer.

SD v1 conditions on the text tower of OpenAI CLIP ViT-L/14, whose tokenizer is
the byte-level BPE of the original CLIP release.  The Hugging Face hub copy
(``openai/clip-vit-large-patch14``) cannot be fetched here, but the very same
BPE merge list ships inside the ``open_clip`` package as
``bpe_simple_vocab_16e6.txt.gz``.  From it the full vocabulary is derived the
same way OpenAI CLIP does it:

* ids ``0..255``      the 256 byte symbols (bytes mapped to printable unicode),
* ids ``256..511``    the same symbols with the end-of-word suffix ``</w>``,
* ids ``512..49405``  one token per merge (the first 48894 merges of the file),
* ids ``49406/49407`` ``<|startoftext|>`` / ``<|endoftext|>``.

The result is a ``transformers.CLIPTokenizer`` (49408 entries, 48894 merges)
built in memory.  With the pinned transformers 5.x this needs no files; should
a transformers version not accept an in-memory vocabulary, ``vocab.json`` and
``merges.txt`` are written (atomically) to a cache directory and the tokenizer
is built from those paths instead (see :func:`write_sd_v1_vocab_files`).

Never call ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")``:
offline it stalls for minutes on network retries.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from ldm.files import atomic_write_bytes

__all__ = [
    "SD_V1_VOCAB_SIZE",
    "SD_V1_NUM_MERGES",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "MAX_LENGTH",
    "build_sd_v1_tokenizer",
    "tokenize",
    "clean_prompt",
    "sd_v1_vocab_and_merges",
    "write_sd_v1_vocab_files",
    "default_cache_dir",
]

SD_V1_VOCAB_SIZE = 49408
SD_V1_NUM_MERGES = 49152 - 256 - 2  # 48894: merges used by the CLIP vocabulary
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = EOS_TOKEN_ID  # SD v1 / ViT-L/14 pads with the end token
MAX_LENGTH = 77

_BPE_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES_HEADER = "#version: 0.2"


# --------------------------------------------------------------------------- #
# Vocabulary derivation
# --------------------------------------------------------------------------- #
def _byte_symbols() -> list[str]:
    """The 256 unicode symbols standing for the bytes 0..255, in vocabulary order.

    Printable latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves
    and come first; every other byte b is mapped, in increasing order of b, to
    chr(256 + k) for the k-th such byte.  Order matters: it fixes ids 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    keep = set(printable)
    remapped = [b for b in range(256) if b not in keep]
    symbols = [chr(b) for b in printable]
    symbols += [chr(256 + k) for k in range(len(remapped))]
    return symbols


def _bpe_archive_path() -> Path:
    """Path of open_clip's BPE file, found without importing open_clip (slow import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - env problem
        raise RuntimeError(
            "open_clip is required to build the SD v1 tokenizer offline "
            f"(it ships {_BPE_RESOURCE}); install open_clip_torch"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _BPE_RESOURCE
        if path.is_file():
            return path
    raise RuntimeError(  # pragma: no cover - env problem
        f"CLIP BPE vocabulary {_BPE_RESOURCE} not found in {list(spec.submodule_search_locations)}"
    )


@functools.lru_cache(maxsize=1)
def sd_v1_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return ``(vocab, merges)`` of the SD v1 / CLIP ViT-L/14 tokenizer.

    ``vocab`` maps token string -> id (49408 entries), ``merges`` is the ordered
    tuple of 48894 symbol pairs.  Derived from open_clip's BPE file.
    """
    with gzip.open(_bpe_archive_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a header; the vocabulary uses exactly the next 48894 merges.
    merge_lines = lines[1 : 1 + SD_V1_NUM_MERGES]
    merges: list[tuple[str, str]] = []
    for line in merge_lines:
        parts = line.split()
        if len(parts) != 2:
            raise RuntimeError(f"malformed BPE merge line {line!r} in {_BPE_RESOURCE}")
        merges.append((parts[0], parts[1]))
    if len(merges) != SD_V1_NUM_MERGES:
        raise RuntimeError(f"expected {SD_V1_NUM_MERGES} merges, read {len(merges)}")

    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != SD_V1_VOCAB_SIZE or len(tokens) != SD_V1_VOCAB_SIZE:
        raise RuntimeError(
            f"derived CLIP vocabulary has {len(vocab)} unique / {len(tokens)} tokens, "
            f"expected {SD_V1_VOCAB_SIZE}"
        )
    assert vocab[BOS_TOKEN] == BOS_TOKEN_ID and vocab[EOS_TOKEN] == EOS_TOKEN_ID
    return vocab, tuple(merges)


# --------------------------------------------------------------------------- #
# Optional file cache (fallback for transformers versions needing files)
# --------------------------------------------------------------------------- #
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/feature-space-decoder/clip-tokenizer`` (``~/.cache`` if unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "feature-space-decoder" / "clip-tokenizer"


def _file_contents() -> dict[str, bytes]:
    vocab, merges = sd_v1_vocab_and_merges()
    vocab_bytes = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    merges_text = _MERGES_HEADER + "\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    return {"vocab.json": vocab_bytes, "merges.txt": merges_text.encode("utf-8")}


def write_sd_v1_vocab_files(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` / ``merges.txt`` for the SD v1 tokenizer; return their paths.

    Files already present with exactly the expected content are reused; anything
    else is (re)written atomically (temp file in the same directory + rename),
    so concurrent writers never expose a partial file.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in _file_contents().items():
        path = directory / name
        try:
            valid = path.read_bytes() == data
        except OSError:
            valid = False
        if not valid:
            atomic_write_bytes(path, data)
    return directory / "vocab.json", directory / "merges.txt"


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def _check_size(tokenizer, how: str):
    n = len(tokenizer)
    if n != SD_V1_VOCAB_SIZE:
        raise RuntimeError(
            f"CLIPTokenizer built from {how} has {n} tokens, expected {SD_V1_VOCAB_SIZE}: "
            "the installed transformers did not pick up the vocabulary (note: in "
            "transformers 5.x the vocabulary/merges must be passed positionally; the "
            "keywords vocab_file=/merges_file= are silently ignored)"
        )
    return tokenizer


def _tokenizer_from_files(vocab_path, merges_path):
    from transformers import CLIPTokenizer

    # Positional on purpose (see _check_size).
    tok = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=MAX_LENGTH)
    return _check_size(tok, f"files {vocab_path}, {merges_path}")


def _tokenizer_in_memory():
    from transformers import CLIPTokenizer

    vocab, merges = sd_v1_vocab_and_merges()
    tok = CLIPTokenizer(dict(vocab), list(merges), model_max_length=MAX_LENGTH)
    return _check_size(tok, "an in-memory vocabulary")


@functools.lru_cache(maxsize=1)
def build_sd_v1_tokenizer():
    """Return SD v1's CLIP tokenizer (``transformers.CLIPTokenizer``), built offline.

    The instance is cached and shared: do not mutate it (e.g. add tokens).
    """
    try:
        tok = _tokenizer_in_memory()
    except (TypeError, ValueError, RuntimeError) as exc:
        # transformers versions whose CLIPTokenizer only accepts file paths.
        vocab_path, merges_path = write_sd_v1_vocab_files()
        try:
            tok = _tokenizer_from_files(vocab_path, merges_path)
        except Exception as exc2:
            raise RuntimeError(
                f"could not build the SD v1 CLIP tokenizer (in memory: {exc}; from files: {exc2})"
            ) from exc2
    if tok.bos_token_id != BOS_TOKEN_ID or tok.eos_token_id != EOS_TOKEN_ID or tok.pad_token_id != PAD_TOKEN_ID:
        raise RuntimeError(
            f"unexpected special token ids bos={tok.bos_token_id} eos={tok.eos_token_id} "
            f"pad={tok.pad_token_id}; expected {BOS_TOKEN_ID}/{EOS_TOKEN_ID}/{PAD_TOKEN_ID}"
        )
    return tok


try:  # ftfy is a dependency of open_clip; CLIP's own text cleaning uses it.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - optional
    _ftfy = None


def clean_prompt(text: str) -> str:
    """CLIP's text normalisation: ftfy fix, HTML unescape (x2), collapse whitespace, lower-case.

    The Rust-backed ``CLIPTokenizer`` only does NFC + whitespace + lower-case;
    without this step curly quotes, full-width punctuation, ligatures and HTML
    entities would tokenize differently from OpenAI CLIP / open_clip.
    """
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def tokenize(tokenizer, prompts: list[str] | str, max_length: int = MAX_LENGTH) -> torch.LongTensor:
    """Tokenize ``prompts`` to a ``LongTensor [B, max_length]`` as SD v1 does.

    ``<|startoftext|>`` + tokens + ``<|endoftext|>``, padded with the end token
    (49407).  Prompts longer than ``max_length`` tokens (start/end included) are
    cut to the first ``max_length - 1`` tokens + end token, with a warning.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a list of strings")
    if not prompts:
        return torch.empty(0, max_length, dtype=torch.long)
    cleaned = [clean_prompt(p) for p in prompts]

    full = tokenizer(cleaned, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, (prompt, ids) in enumerate(zip(prompts, full)):
        if len(ids) > max_length:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(
                f"prompt {i} ({shown!r}) has {len(ids)} tokens including start/end tokens, "
                f"more than the limit of {max_length}; it is truncated to the first "
                f"{max_length - 1} tokens + end token",
                UserWarning,
                stacklevel=2,
            )

    out = tokenizer(
        cleaned,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )["input_ids"]
    if out.shape != (len(prompts), max_length):  # pragma: no cover - defensive
        raise RuntimeError(f"tokenizer returned shape {tuple(out.shape)}, expected {(len(prompts), max_length)}")
    return out.long()
