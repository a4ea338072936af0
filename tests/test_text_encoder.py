"""SD v1 text encoder: offline CLIP tokenizer + FrozenCLIPEmbedder (CPU, fast)."""

import warnings

import pytest
import torch

from ldm.modules.encoders import tokenizer as sd_tok
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import build_sd_v1_tokenizer, tokenize

BOS, EOS = 49406, 49407
TINY = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=37, num_attention_heads=2)

LONG_PROMPT = " ".join(f"word{i} and" for i in range(60))  # well over 77 tokens
TRICKY_PROMPTS = [
    "",
    "a photo of a cat",
    "Café crème brûlée, naïve façade à la Ångström",
    "a 🐱 cat riding 🚀🚀 rockets with a family 👩\u200d👩\u200d👧 and flags 🇫🇷",
    "東京の夜景、ネオンが光る街",
    "中文提示词，山水画。",
    "한국어 프롬프트",
    "don't stop, it's fine, we'll go, I'm here, they've, you'd, they're DON'T",
    "don\u2019t \u201ccurly\u201d quotes \u2014 and a dash",
    "Hello!!! What?! ...wow --- (parens) [brackets] {braces} #hash @at $5.99 100% a/b c\\d",
    "A PHOTO OF A DOG, Trending On ArtStation, 4K, HDR",
    "multiple    spaces\t\ttabs\nnewline   trailing   ",
    "  leading spaces",
    "3.14159 and 2024 and 1,000,000 and 0x1F",
    "&amp; ampersand &lt;tag&gt;",
    "\ufb01ne ligature \uff21\uff22\uff23 fullwidth",
    "Straße İstanbul Ελληνικά русский",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def tok():
    return build_sd_v1_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tok():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("RN50")


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder()


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def test_vocab_size_and_merges(tok):
    assert len(tok) == 49408
    vocab, merges = sd_tok.sd_v1_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [BOS, EOS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    # byte symbols first, then their end-of-word forms, then merges
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["".join(merges[0])] == 512
    assert build_sd_v1_tokenizer() is tok  # lru_cache


def test_empty_prompt(tok):
    ids = tokenize(tok, [""])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == [BOS] + [EOS] * 76


def test_known_ids(tok):
    # Well-known CLIP ids ("a photo of a cat").
    ids = tokenize(tok, "a photo of a cat")[0].tolist()
    assert ids[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ids[7:] == [EOS] * 70


def test_matches_open_clip(tok, open_clip_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tokenize(tok, TRICKY_PROMPTS)
    ref = open_clip_tok(TRICKY_PROMPTS).long()
    assert ref.shape == ours.shape == (len(TRICKY_PROMPTS), 77)
    # open_clip pads with 0 (id 0 is "!", never emitted right after the text end)
    eot_pos = (ref == EOS).int().argmax(dim=1)
    after_eot = torch.arange(77)[None] > eot_pos[:, None]
    assert (ref[after_eot] == 0).all()
    ref = ref.masked_fill(after_eot, EOS)
    for i, prompt in enumerate(TRICKY_PROMPTS):
        assert ours[i].tolist() == ref[i].tolist(), prompt


def test_truncation_keeps_first_76_and_warns(tok, open_clip_tok):
    full = tok(sd_tok.clean_prompt(LONG_PROMPT))["input_ids"]
    assert len(full) > 77
    with pytest.warns(UserWarning, match=rf"{len(full)} tokens.*limit of 77"):
        ids = tokenize(tok, ["short one", LONG_PROMPT])
    assert ids.shape == (2, 77)
    assert ids[1].tolist() == full[:76] + [EOS]
    assert ids[1].tolist() == open_clip_tok([LONG_PROMPT])[0].tolist()


def test_no_warning_for_exactly_77_tokens(tok):
    prompt = " ".join(["cat"] * 75)  # 75 tokens + start + end = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(tok, prompt)
    assert ids[0].tolist() == [BOS] + [2368] * 75 + [EOS]


def test_vocab_files_roundtrip(tmp_path, tok):
    vocab_path, merges_path = sd_tok.write_sd_v1_vocab_files(tmp_path)
    mtime = vocab_path.stat().st_mtime_ns
    assert sd_tok.write_sd_v1_vocab_files(tmp_path) == (vocab_path, merges_path)
    assert vocab_path.stat().st_mtime_ns == mtime  # valid files are reused
    assert merges_path.read_text(encoding="utf-8").count("\n") == 1 + 48894
    file_tok = sd_tok._tokenizer_from_files(vocab_path, merges_path)
    assert len(file_tok) == 49408
    prompts = TRICKY_PROMPTS[:-1]
    assert torch.equal(tokenize(file_tok, prompts), tokenize(tok, prompts))
    # a corrupt file is rewritten
    merges_path.write_text("garbage")
    sd_tok.write_sd_v1_vocab_files(tmp_path)
    assert merges_path.read_text(encoding="utf-8").count("\n") == 1 + 48894
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_file_fallback(tmp_path, monkeypatch, tok):
    """If in-memory construction fails, files are written to the cache dir and used."""

    def broken():
        raise RuntimeError("simulated: transformers wants files")

    monkeypatch.setattr(sd_tok, "_tokenizer_in_memory", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fallback = sd_tok.build_sd_v1_tokenizer.__wrapped__()
    cache = tmp_path / "feature-space-decoder" / "clip-tokenizer"
    assert sd_tok.default_cache_dir() == cache
    assert (cache / "vocab.json").is_file() and (cache / "merges.txt").is_file()
    assert len(fallback) == 49408
    assert torch.equal(tokenize(fallback, ["a photo of a cat"]), tokenize(tok, ["a photo of a cat"]))


# --------------------------------------------------------------------------- #
# FrozenCLIPEmbedder
# --------------------------------------------------------------------------- #
def test_full_model(full_model):
    params = list(full_model.parameters())
    assert sum(p.numel() for p in params) == 123_060_480
    assert len(params) == 196
    assert not any(p.requires_grad for p in params)
    assert not full_model.training
    sd = full_model.state_dict()
    assert "transformer.text_model.embeddings.token_embedding.weight" in sd
    assert "transformer.text_model.final_layer_norm.weight" in sd
    assert sd["transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    # transformers 5.x: position_ids is a non-persistent buffer
    assert "transformer.text_model.embeddings.position_ids" not in sd
    assert full_model.transformer.text_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = full_model(["a photo of a cat"])
    assert out.shape == (1, 77, 768) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_is_final_layer_norm():
    torch.manual_seed(0)
    m = FrozenCLIPEmbedder(text_config=TINY)
    tm = m.transformer.text_model
    with torch.no_grad():
        tm.final_layer_norm.weight.normal_()
        tm.final_layer_norm.bias.normal_()
        out = m.encode("a photo")
        hidden = m.transformer(m.tokenize("a photo"), output_hidden_states=True).hidden_states
    assert len(hidden) == 1 + TINY["num_hidden_layers"]
    torch.testing.assert_close(out, tm.final_layer_norm(hidden[-1]))


def test_train_keeps_eval():
    m = FrozenCLIPEmbedder(text_config=TINY)
    m.train()
    assert not m.training and not any(x.training for x in m.modules())
    assert not any(p.requires_grad for p in m.parameters())


def test_tiny_config():
    torch.manual_seed(0)
    m = FrozenCLIPEmbedder(text_config=TINY)
    assert m.transformer.config.vocab_size == 49408
    out = m(["a cat", "a dog with a very long tail"])
    assert out.shape == (2, 77, 32)
    assert not out.requires_grad
    # batch independence and determinism
    torch.testing.assert_close(m("a cat"), out[:1])


def test_sdpa_matches_eager():
    torch.manual_seed(0)
    sdpa = FrozenCLIPEmbedder(text_config=TINY)
    eager = FrozenCLIPEmbedder(text_config={**TINY, "attn_implementation": "eager"})
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.transformer.config._attn_implementation == "sdpa"
    assert eager.transformer.config._attn_implementation == "eager"
    prompts = ["a photo of a cat", "", "東京の夜景 🚀 don't"]
    with torch.no_grad():
        a, b = sdpa(prompts), eager(prompts)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_causal_attention():
    # Changing a later token must not change earlier positions' outputs.
    torch.manual_seed(0)
    m = FrozenCLIPEmbedder(text_config=TINY)
    with torch.no_grad():
        a, b = m(["a red cat", "a red dog"])
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3], b[3])


def test_bad_arguments():
    with pytest.raises(ValueError, match="clip-vit-large-patch14"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32", text_config=TINY)
    with pytest.raises(ValueError, match="unknown"):
        FrozenCLIPEmbedder(text_config={**TINY, "hiden_size": 8})
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(text_config={**TINY, "hidden_size": 33})
    small_vocab = FrozenCLIPEmbedder(text_config={**TINY, "vocab_size": 1000})
    with pytest.raises(ValueError, match="vocab_size"):
        small_vocab("a cat")
