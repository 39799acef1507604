"""dit_jax.text tokenizers against transformers v5 (CLIPTokenizer x2, T5TokenizerFast) built from the same real files,
diffusers' StableDiffusion3Pipeline.encode_prompt (through id-recording stub encoders) and hand-checked cases of
Stability's sd3_infer.py tokenization (sd35_reference)."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from tests.helpers import tokenizer_files as tf

if tf.bpe_gz() is None:
  pytest.skip(f"open_clip's {tf.BPE_GZ} is not installed (pip install --no-deps open-clip-torch==3.3.0)",
              allow_module_level=True)

from dit_jax.text import profiles  # noqa: E402
from dit_jax.text import tokenizers as tok  # noqa: E402

L_BOS, L_EOS = 49406, 49407


def _prompts(n_random: int = 480, seed: int = 1) -> list[str]:
  fixed = [
      "", " ", "   ", "\n", "\t \n ", "\r\nwindows newline", "a", "!", "!!", "hello!", "wow! amazing!!",
      "a photo of a cat", "A PHOTO OF A CAT", "café naïve résumé", "cafe\u0301 (NFD accent)", "東京の夜景, 桜の花",
      "서울 야경", "🐱 cat 🐶 dog 👩‍🚀 astronaut 👍🏽", "<|STARTOFTEXT|>x", "<|endoftext|>!",
      "emoji only 🎨🖌️🖼️", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁ ligature ½ ² ℃", "zero\u200bwidth", "rtl مرحبا שלום",
      "line one\nline two\n\nline four", "tab\tseparated\twords", "  leading and trailing spaces  ",
      "multiple     inner     spaces", "it's a dog's life, isn't it? they're we've I'm you'll he'd",
      "numbers 1234567890 3.14159 1e10 -42 +7", "punctuation ,.;:!?-()[]{}<>@#$%^&*_=+~`|\\/\"'",
      "a (red:1.3) cat with ((big)) eyes", "\\(escaped\\) parens \\(and:1.5\\)", "(unbalanced ( parens",
      "closing ) only )",
      "[bracketed] {braces} <angles>", "<|endoftext|>", "<|startoftext|> hi <|endoftext|>", "<|ENDOFTEXT|> shout",
      "x<|endoftext|>y", "</s> <pad> <unk> <extra_id_0> <extra_id_99> <EXTRA_ID_1>", "<s> </s>", "!!!!!!!!!!!!!!",
      "ünïcödé ÄÖÜ ß ø å æ œ", "Ελληνικά Русский текст", "ascii control \x01\x02\x7f chars", "\u00a0nbsp\u00a0here",
      "hyphen-ated under_scored dot.ted slash/ed", "trailing!", "!leading", "mid!dle", "a ! b", "(((((deep)))))",
      "(word:1.2) (word) [word] word:1.2", "a" * 300, "supercalifragilisticexpialidocious " * 8,
      " ".join(["cat"] * 80), " ".join(["cat"] * 300), "a painting, " * 60,
  ]
  rng = random.Random(seed)
  pool = tf.WORDS + tf.ACCENTED + tf.CJK + ["🐱", "🌸", "👍🏽", "!", "(", ")", ":1.2", "\n", "\\(", "<|endoftext|>",
                                            "<extra_id_3>", "it's", "I'M", "Hello!", "ｆｕｌｌ", "1234", "…"]
  out = list(fixed)
  for i in range(n_random):
    n = rng.choice([1, 3, 8, 20, 40, 90, 150])
    words = [rng.choice(pool) for _ in range(n)]
    sep = rng.choice([" ", " ", " ", ", ", "  ", "\n"])
    text = sep.join(words)
    if rng.random() < 0.2:
      text = text.upper() if rng.random() < 0.5 else text.title()
    if rng.random() < 0.15:
      text = f"({text}:{rng.choice(['1.2', '0.8', 'x'])})"
    out.append(text)
  return out


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return tf.write_pipeline_tokenizers(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def ours(files):
  return tok.load_tokenizers(files)


@pytest.fixture(scope="module")
def oracle(files):
  return tf.transformers_tokenizers(files)


def _hf(tokenizer, prompts, length):
  return np.asarray(tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids)


def _hf_long(tokenizer, prompts, length):
  return [len(ids) > length for ids in tokenizer(prompts).input_ids]


# ---- ids against transformers

def test_prompt_set():
  assert len(PROMPTS) >= 500 and len(set(PROMPTS)) > 480


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_matches_transformers(ours, oracle, name):
  ids, cut = ours[name].encode(PROMPTS, 77, return_truncated=True)
  ref = _hf(oracle[name], PROMPTS, 77)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  bad = np.flatnonzero((ids != ref).any(1))
  assert not len(bad), f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}: {ids[bad[0]]} vs {ref[bad[0]]}"
  assert cut == _hf_long(oracle[name], PROMPTS, 77)
  assert 0 < sum(cut) < len(PROMPTS)


def test_clip_pads(ours, oracle):
  assert ours["clip_l"].pad_id == L_EOS and ours["clip_g"].pad_id == 0
  assert ours["clip_l"].ids_of("wow!") == ours["clip_l"].ids_of("wow") + [256]    # "!</w>"
  assert ours["clip_g"].ids_of("wow!") == ours["clip_g"].ids_of("wow") + [0]      # "!" is tokenizer_2's pad token
  assert ours["clip_g"].encode([""])[0].tolist() == [L_BOS, L_EOS] + [0] * 75


@pytest.mark.parametrize("length", [256, 77, 512])
def test_t5_matches_transformers(ours, oracle, length):
  ids, cut = ours["t5"].encode(PROMPTS, length, return_truncated=True)
  ref = _hf(oracle["t5"], PROMPTS, length)
  bad = np.flatnonzero((ids != ref).any(1))
  assert not len(bad), f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}: {ids[bad[0]]} vs {ref[bad[0]]}"
  assert cut == _hf_long(oracle["t5"], PROMPTS, length)


def test_t5_specials(ours):
  t5 = ours["t5"]
  assert (t5.pad_id, t5.eos_id, t5.vocab_size) == (0, 1, tf.T5_VOCAB + 100)
  assert t5.encode([""], 8)[0].tolist() == [1] + [0] * 7
  assert t5.ids_of("<extra_id_0>") == [tf.T5_VOCAB + 99]


# ---- diffusers profile against StableDiffusion3Pipeline.encode_prompt

class _IdsEncoder:
  """Stands in for a text encoder: its "hidden states" are the input ids (channel 0), so the pipeline's assembled
  conditioning shows which ids each encoder received."""

  dtype = None

  def __init__(self, width: int):
    import torch

    self.dtype, self.width = torch.float64, width

  def __call__(self, ids, output_hidden_states=False):
    import torch

    x = torch.nn.functional.pad(ids.to(torch.float64)[..., None], (0, self.width - 1))
    if output_hidden_states:  # CLIP: (pooled, ...) with .hidden_states
      return type("Out", (tuple,), {"hidden_states": (x, x, x)})((x[:, 0], x))
    return (x,)  # T5: (last state,)


def _pipeline_ids(oracle, prompts, max_sequence_length):
  import torch
  from diffusers import StableDiffusion3Pipeline

  from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as sd3

  pipe = object.__new__(StableDiffusion3Pipeline)
  pipe.__dict__.update(tokenizer=oracle["clip_l"], tokenizer_2=oracle["clip_g"], tokenizer_3=oracle["t5"],
                       text_encoder=_IdsEncoder(1), text_encoder_2=_IdsEncoder(1), text_encoder_3=_IdsEncoder(4),
                       tokenizer_max_length=oracle["clip_l"].model_max_length)
  level = sd3.logger.level
  sd3.logger.setLevel(logging.ERROR)  # its truncation warnings print the removed text
  try:
    context, _, _, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                          do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
  finally:
    sd3.logger.setLevel(level)
  context = context.numpy().astype(np.int64)
  return {"clip_l": context[:, :77, 0], "clip_g": context[:, :77, 1], "t5": context[:, 77:, 0]}


def test_diffusers_profile_matches_pipeline(ours, oracle):
  """The ids StableDiffusion3Pipeline.encode_prompt feeds its three encoders (its truncation warnings decode the cut
  text, slow for long prompts: a subset)."""
  prompts = PROMPTS[:60] + PROMPTS[-140:]
  got = tok.tokenize(ours, prompts, "diffusers", 256)
  want = _pipeline_ids(oracle, prompts, 256)
  for name in ("clip_l", "clip_g", "t5"):
    assert got[name].dtype == np.int32
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("max_sequence_length,n", [(256, len(PROMPTS)), (1, 100)])
def test_diffusers_profile(ours, oracle, max_sequence_length, n):
  """StableDiffusion3Pipeline's tokenizer calls: CLIP at 77, T5 with EOS at max_sequence_length."""
  prompts = PROMPTS[-n:]
  got = tok.tokenize(ours, prompts, "diffusers", max_sequence_length)
  t5 = oracle["t5"](prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True).input_ids
  np.testing.assert_array_equal(got["clip_l"], _hf(oracle["clip_l"], prompts, 77))
  np.testing.assert_array_equal(got["clip_g"], _hf(oracle["clip_g"], prompts, 77))
  np.testing.assert_array_equal(got["t5"], np.asarray(t5))
  assert got["t5"].shape == (n, max_sequence_length)
  long = [a or b or c for a, b, c in zip(_hf_long(oracle["clip_l"], prompts, 77),
                                         _hf_long(oracle["clip_g"], prompts, 77),
                                         _hf_long(oracle["t5"], prompts, max_sequence_length))]
  assert got["truncated"] == long


def test_without_t5(ours):
  out = tok.tokenize({k: ours[k] for k in ("clip_l", "clip_g")}, ["a cat", "a dog"])
  assert set(out) == {"clip_l", "clip_g", "truncated"} and out["clip_l"].shape == (2, 77)
  out = tok.tokenize({k: ours[k] for k in ("clip_l", "clip_g")}, ["a cat"], "sd35_reference")
  assert set(out) == {"clip_l", "clip_g", "truncated"}


def test_truncation_warns_once(ours, caplog):
  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    out = tok.tokenize(ours, ["a cat", "cat " * 300, "a dog", "dog " * 100], "diffusers", 256)
  records = [r for r in caplog.records if r.name == "dit_jax"]
  assert out["truncated"] == [False, True, False, True]
  assert len(records) == 1 and "2 of 4 prompts truncated" in records[0].getMessage(), records
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    tok.tokenize(ours, ["a cat"] * 3, "diffusers", 256)
    tok.tokenize(ours, ["cat " * 100], "sd35_reference")
  messages = [r.getMessage() for r in caplog.records if r.name == "dit_jax"]
  assert len(messages) == 1 and "1 of 1 prompts truncated" in messages[0]


# ---- sd35_reference: Stability's SDTokenizer, hand-checked

_WORD_IDS = {}


def _word_ids(tokenizer, words):
  """transformers' ids of each word as SDTokenizer takes them: tokenizer(word)["input_ids"] without BOS / EOS."""
  start = 1 if "CLIP" in type(tokenizer).__name__ else 0  # T5 has no BOS
  for w in words:
    if (id(tokenizer), w) not in _WORD_IDS:
      _WORD_IDS[id(tokenizer), w] = tokenizer(w)["input_ids"][start:-1]
  return [_WORD_IDS[id(tokenizer), w] for w in words]


def _chunks(word_ids, pad):
  """SDTokenizer's CLIP chunking written out step by step: all 77-token chunks (the reference encodes the first)."""
  chunks, chunk = [], [L_BOS]
  for ids in word_ids:
    ids = list(ids)
    while ids:
      if len(chunk) + len(ids) <= 76:
        chunk += ids
        ids = []
      elif len(ids) >= 8:
        room = 76 - len(chunk)
        chunks.append(chunk + ids[:room] + [L_EOS])
        ids, chunk = ids[room:], [L_BOS]
      else:
        chunks.append(chunk + [L_EOS] + [pad] * (76 - len(chunk)))
        chunk = [L_BOS]
  chunks.append(chunk + [L_EOS] + [pad] * (76 - len(chunk)))
  return chunks


def _expect(oracle, words, t5_words=None):
  ids = _word_ids(oracle["clip_l"], words)
  t5 = [i for w in _word_ids(oracle["t5"], words if t5_words is None else t5_words) for i in w] + [1]
  return {"clip_l": _chunks(ids, L_EOS)[0], "clip_g": _chunks(ids, 0)[0], "t5": t5 + [0] * (77 - len(t5))}


WORD_CASES = [
    ("a (red:1.3) cat\nwith ((big)) eyes", ["a", "red", "cat", "with", "big", "eyes"]),
    ("\\(literal\\) (weighted:0.5) (bad:weight) (unclosed", ["(literal)", "weighted", "bad:weight", "(unclosed"]),
    ("((a b) c:1.5) d", ["a", "b", "c", "d"]),
    ("x) (y", ["x)", "(y"]),
    ("a\nb\tc  d", ["a", "b\tc", "d"]),
    ("(:1.2) () (a:)", [":1.2", "a:"]),
    ("wow! (so:1e1) cool", ["wow!", "so", "cool"]),
    ("", []),
    ("   \n ", []),
]


@pytest.mark.parametrize("prompt,words", WORD_CASES)
def test_reference_words(ours, oracle, prompt, words):
  assert profiles.prompt_words(prompt) == words
  got = tok.tokenize(ours, [prompt], "sd35_reference")
  want = _expect(oracle, words)
  for name in ("clip_l", "clip_g", "t5"):
    assert got[name][0].tolist() == want[name], name


def test_reference_empty_prompt(ours):
  got = tok.tokenize(ours, [""], "sd35_reference")
  assert got["clip_l"][0].tolist() == [L_BOS, L_EOS] + [L_EOS] * 75
  assert got["clip_g"][0].tolist() == [L_BOS, L_EOS] + [0] * 75
  assert got["t5"][0].tolist() == [1] + [0] * 76 and got["truncated"] == [False]


def test_reference_bang_is_bpe_for_clip_g(ours):
  got = tok.tokenize(ours, ["wow!"], "sd35_reference")
  wow = ours["clip_l"].ids_of("wow")
  assert got["clip_g"][0, :len(wow) + 3].tolist() == [L_BOS, *wow, 256, L_EOS]  # not tokenizer_2's "!" = 0


def test_reference_chunks(ours, oracle):
  cat = ours["clip_l"].ids_of("cat")
  assert len(cat) == 1
  short = next(w for w in ("zyxwvq", "qqzzkk", "xylophonist") if 2 <= len(ours["clip_l"].ids_of(w)) < 8)
  long_word = "supercalifragilistic-expialidocious-antidisestablishmentarianism"
  long_ids = ours["clip_l"].ids_of(long_word)
  assert len(long_ids) >= 8
  cases = {
      # 75 one-token words fill the chunk exactly: nothing is cut
      " ".join(["cat"] * 75): ([L_BOS] + cat * 75 + [L_EOS], False),
      # the 76th word starts the next chunk
      " ".join(["cat"] * 80): ([L_BOS] + cat * 75 + [L_EOS], True),
      # a short word that does not fit moves whole to the next chunk: this one ends early and pads
      " ".join(["cat"] * 74 + [short]): ([L_BOS] + cat * 74 + [L_EOS, "pad"], True),
      # a long word is split at the chunk end
      " ".join(["cat"] * 70 + [long_word]): ([L_BOS] + cat * 70 + long_ids[:5] + [L_EOS], True),
  }
  clips = {k: ours[k] for k in ("clip_l", "clip_g")}  # "truncated" of the CLIPs alone (T5 cuts at 226 characters)
  for prompt, (want, cut) in cases.items():
    got = tok.tokenize(clips, [prompt], "sd35_reference")
    assert got["clip_l"][0].tolist() == [L_EOS if t == "pad" else t for t in want]
    assert got["clip_g"][0].tolist() == [0 if t == "pad" else t for t in want]
    assert got["truncated"] == [cut], prompt


def test_reference_t5_lengths(ours, oracle):
  letters = " ".join("abcdefghijklmnopqrstuvwxyz" * 5)         # 259 characters, T5 sees 226
  assert len(letters) > 226
  got = tok.tokenize(ours, [letters], "sd35_reference")
  want = _expect(oracle, letters.split(" "), letters[:226].split(" "))["t5"]
  assert len(want) > 77 and got["t5"][0].tolist() == want and got["truncated"] == [True]
  assert tok.t5_lengths(ours, [letters, "a cat", ""], "sd35_reference") == [len(want), 77, 77]
  assert tok.t5_lengths(ours, [letters, "a cat"], "diffusers", 300) == [300, 300]
  assert tok.tokenize(ours, ["a cat", "", "a (dog:1.1)"], "sd35_reference")["t5"].shape == (3, 77)
  with pytest.raises(tok.TokenizerError, match="different lengths") as e:
    tok.tokenize(ours, [letters, "a cat"], "sd35_reference")
  assert "\n" not in str(e.value)


def test_reference_random_prompts(ours, oracle):
  """Prompts without weight syntax: the words are the space-split prompt (T5: of its first 226 characters)."""
  prompts = [p for p in PROMPTS if not any(c in p for c in "()\\")][:150]
  lengths = tok.t5_lengths(ours, prompts, "sd35_reference")
  assert len(set(lengths)) > 1
  for length in sorted(set(lengths)):  # one batch per T5 length
    group = [p for p, n in zip(prompts, lengths) if n == length]
    got = tok.tokenize(ours, group, "sd35_reference")
    assert got["t5"].shape == (len(group), length)
    for i, p in enumerate(group):
      words = [w for w in p.replace("\n", " ").split(" ") if w]
      want = _expect(oracle, words, [w for w in p[:226].replace("\n", " ").split(" ") if w])
      for name in ("clip_l", "clip_g", "t5"):
        assert got[name][i].tolist() == want[name], (name, p)


# ---- files: save / load round trips

def test_round_trip(ours, oracle, tmp_path):
  tok.save_tokenizers(ours, tmp_path)
  again = tok.load_tokenizers(tmp_path)
  assert set(again) == {"clip_l", "clip_g", "t5"}
  for name, length in (("clip_l", 77), ("clip_g", 77), ("t5", 256)):
    np.testing.assert_array_equal(again[name].encode(PROMPTS, length), ours[name].encode(PROMPTS, length), name)
  # transformers reads the saved folders too, with the same ids
  from transformers import CLIPTokenizer, T5TokenizerFast

  hf = {"clip_g": CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2"),
        "t5": T5TokenizerFast.from_pretrained(tmp_path / "tokenizer_3")}
  for name, length in (("clip_g", 77), ("t5", 256)):
    np.testing.assert_array_equal(_hf(hf[name], PROMPTS, length), ours[name].encode(PROMPTS, length), name)


def test_transformers_saved_folders(ours, oracle, tmp_path):
  """tokenizer.json folders as transformers' save_pretrained writes them."""
  for name, reader, length in (("clip_g", tok.CLIPTokenizer, 77), ("t5", tok.T5Tokenizer, 256)):
    oracle[name].save_pretrained(tmp_path / name)
    loaded = reader.from_dir(tmp_path / name)
    np.testing.assert_array_equal(loaded.encode(PROMPTS, length), _hf(oracle[name], PROMPTS, length), name)


def test_from_files(oracle, files):
  """from_files: transformers' CLIPTokenizer(vocab, merges, pad_token=...) (special tokens matched verbatim);
  from_spiece: T5TokenizerFast on the same spiece.model."""
  from tokenizers.models import BPE
  from transformers import CLIPTokenizer

  sample = PROMPTS[:150]
  for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
    paths = files / folder / "vocab.json", files / folder / "merges.txt"
    ours = tok.CLIPTokenizer.from_files(*paths, pad=pad)
    vocab, merges = BPE.read_file(*map(str, paths))
    ref = _hf(CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad), sample, 77)
    np.testing.assert_array_equal(ours.encode(sample), ref, err_msg=folder)
  t5 = tok.T5Tokenizer.from_spiece(files / "tokenizer_3" / "spiece.model")
  np.testing.assert_array_equal(t5.encode(sample, 256), _hf(oracle["t5"], sample, 256))


# ---- errors: one line each

def _one_line(call, match):
  with pytest.raises(ValueError, match=match) as e:
    call()
  assert "\n" not in str(e.value), str(e.value)


def test_errors(ours, files, tmp_path):
  _one_line(lambda: tok.CLIPTokenizer.from_dir(tmp_path / "absent"), "does not exist")
  (tmp_path / "empty").mkdir()
  _one_line(lambda: tok.CLIPTokenizer.from_dir(tmp_path / "empty"), "has no vocab.json / merges.txt")
  _one_line(lambda: tok.T5Tokenizer.from_dir(tmp_path / "empty"), "has no spiece.model")
  _one_line(lambda: tok.CLIPTokenizer.from_files(tmp_path / "v.json", tmp_path / "m.txt"), "does not exist")
  (tmp_path / "bad.model").write_bytes(b"not a model")
  _one_line(lambda: tok.T5Tokenizer.from_spiece(tmp_path / "bad.model"), "SentencePiece")
  _one_line(lambda: tok.load_tokenizers(tmp_path / "empty"), "no tokenizer/ folder")
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "vocab.json").write_text("{not json")
  (tmp_path / "broken" / "merges.txt").write_text("#version: 0.2\na b\n")
  _one_line(lambda: tok.CLIPTokenizer.from_dir(tmp_path / "broken"), "cannot read")
  (tmp_path / "broken" / "tokenizer.json").write_text("{broken")
  _one_line(lambda: tok.CLIPTokenizer.from_dir(tmp_path / "broken"), "not readable JSON")
  _one_line(lambda: tok.T5Tokenizer.from_dir(tmp_path / "broken"), "not readable JSON")
  ours["clip_l"].save(tmp_path / "clip")
  _one_line(lambda: tok.T5Tokenizer.from_dir(tmp_path / "clip"), "not T5's Unigram")
  _one_line(lambda: tok.T5Tokenizer.from_dir(files / "tokenizer"), "has no spiece.model")
  for profile, length, match in [("comfy", 256, "unknown text profile"), ("diffusers", 0, "1..512"),
                                 ("diffusers", 513, "1..512"), ("sd35_reference", 513, "1..512"),
                                 ("diffusers", 2.5, "1..512"), ("diffusers", True, "1..512")]:
    _one_line(lambda: tok.check_profile(profile, length), match)
    _one_line(lambda: tok.tokenize(ours, ["a"], profile, length), match)
  tok.check_profile("diffusers", 1)
  tok.check_profile("sd35_reference", 512)
  _one_line(lambda: tok.tokenize(ours, [], "diffusers"), "non-empty")
  _one_line(lambda: tok.tokenize(ours, ["a", 3], "diffusers"), "must be strings")
  _one_line(lambda: tok.tokenize({"clip_l": ours["clip_l"]}, ["a"]), "lack clip_g")
  _one_line(lambda: ours["clip_l"].encode([]), "non-empty")
  _one_line(lambda: ours["clip_l"].encode(["a"], 1), "max_length")
  _one_line(lambda: tok.t5_lengths({k: ours[k] for k in ("clip_l", "clip_g")}, ["a"]), "no T5")
  assert issubclass(tok.TokenizerError, ValueError)
