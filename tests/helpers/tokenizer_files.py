"""Real tokenizer files for the tokenizer tests, written offline, and the transformers tokenizers built from them.

  CLIP: OpenAI's 49,408-token BPE vocabulary, rebuilt from the merges that open_clip's wheel ships
        (``open_clip/bpe_simple_vocab_16e6.txt.gz``): the 256 byte symbols, the same with ``</w>``, one entry per
        merge, then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407. Written as a diffusers ``tokenizer/``
        (pad ``<|endoftext|>``, OpenAI's config layout) and ``tokenizer_2/`` (pad ``!``, an ``added_tokens_decoder``)
        folder.
  T5:   a small SentencePiece unigram model trained here on generated text, with T5's special ids (pad 0, eos 1,
        unk 2, no bos), written as ``spiece.model`` (plus T5's config files) in a ``tokenizer_3/`` folder.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
import random

BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # OpenAI's CLIP keeps the first 48,894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
T5_VOCAB = 1000


def bpe_gz() -> pathlib.Path | None:
  """open_clip's merges file, found without importing open_clip (its torch-side deps may be absent)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / BPE_GZ
  return path if path.is_file() else None


def byte_symbols() -> list[str]:
  """GPT-2's reversible byte -> printable character table, in byte-level BPE vocabulary order (printable first)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_vocab_and_merges(gz: pathlib.Path) -> tuple[dict[str, int], list[str]]:
  lines = gzip.open(gz).read().decode("utf-8").split("\n")
  merges = lines[1:N_MERGES + 1]
  symbols = byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
  return {t: i for i, t in enumerate(tokens)}, merges


def _added_token(content: str, normalized: bool) -> dict:
  return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
          "special": True}


def write_clip(folder: pathlib.Path, vocab: dict[str, int], merges: list[str], pad: str, *,
               decoder: bool = False) -> pathlib.Path:
  """A diffusers CLIP tokenizer folder: vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

  decoder=False: OpenAI's clip-vit layout (serialized AddedTokens with "normalized": true for BOS / EOS / UNK, a
  plain-string pad). decoder=True: the newer layout, plain strings plus an ``added_tokens_decoder`` (pad, BOS
  normalized, EOS verbatim) that transformers reads instead of special_tokens_map.json.
  """
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
  if decoder:
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    tokens = {vocab[BOS]: _added_token(BOS, True), vocab[EOS]: _added_token(EOS, False)}
    tokens.setdefault(vocab[pad], _added_token(pad, False))
    extra = {"added_tokens_decoder": {str(i): tokens[i] for i in sorted(tokens)}}
  else:
    serialized = {"__type": "AddedToken", **_added_token(BOS, True)}
    serialized.pop("special")
    specials = {"bos_token": serialized, "eos_token": {**serialized, "content": EOS},
                "unk_token": {**serialized, "content": EOS}, "pad_token": pad}
    extra = {}
  (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
  config = {**specials, **extra, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
            "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
  return folder


# ---- T5: a SentencePiece unigram model on a generated corpus

WORDS = """a an the of in on at by with from under over above below between through into onto beside near far
photo photograph painting drawing sketch render illustration portrait landscape closeup macro wide angle shot view
cat dog horse bird fish dragon robot astronaut wizard knight princess castle tower bridge river mountain forest
city street market garden beach ocean island desert valley lake waterfall cave temple village harbor lighthouse
red orange yellow green blue purple violet pink brown black white grey golden silver crimson azure emerald
bright dark soft hard warm cold glowing shining misty foggy rainy sunny snowy stormy cloudy quiet loud ancient
modern futuristic medieval victorian baroque gothic minimalist surreal abstract realistic detailed intricate
highly very extremely beautiful stunning gorgeous elegant cute tiny huge giant small large tall short long
sitting standing running flying swimming walking reading holding wearing looking smiling sleeping dancing
light shadow sun moon star stars sky cloud clouds rain snow fire water stone wood metal glass paper silk
trending artstation unreal engine octane cinematic lighting volumetric depth field bokeh sharp focus hdr 8k 4k
oil watercolor acrylic charcoal pencil ink digital art style by artist studio ghibli greg rutkowski monet
hat coat dress shirt boots gloves scarf crown sword shield book lamp candle clock mirror window door table chair
one two three four five six seven eight nine ten hundred thousand first second third morning evening night
""".split()
ACCENTED = "café naïve résumé über straße façade jalapeño piñata crème brûlée smörgåsbord fjörd Ærø Øresund".split()
CJK = ["东京", "夜景", "山水画", "猫", "桜の花", "富士山", "서울", "한국어", "風景", "龍"]
PUNCT = list(",.;:!?-()'\"/&%+=*#@") + ["...", "--"]


def corpus(n_lines: int = 6000, seed: int = 0) -> list[str]:
  """Deterministic prompt-like lines over English words, accented Latin, CJK, digits and punctuation."""
  rng = random.Random(seed)
  syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "x", "y", "ng"]
  made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(600)]
  pool = WORDS * 4 + made_up + ACCENTED + CJK
  lines = []
  for _ in range(n_lines):
    words = [rng.choice(pool) for _ in range(rng.randint(3, 16))]
    for _ in range(rng.randint(0, 3)):
      words.insert(rng.randrange(len(words) + 1), rng.choice(PUNCT + [str(rng.randint(0, 2048))]))
    line = " ".join(words)
    lines.append(line.capitalize() if rng.random() < 0.3 else line)
  return lines


def train_spiece(folder: pathlib.Path, vocab_size: int = T5_VOCAB) -> pathlib.Path:
  """Train a unigram SentencePiece model with T5's special ids and write it as ``folder/spiece.model``."""
  import sentencepiece as spm

  folder.mkdir(parents=True, exist_ok=True)
  text = folder / "corpus.txt"
  text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(folder / "spiece"), model_type="unigram", vocab_size=vocab_size,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
      normalization_rule_name="nmt_nfkc")
  text.unlink()
  (folder / "spiece.vocab").unlink()
  config = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 100,
            "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
  return folder / "spiece.model"


def write_pipeline_tokenizers(root: pathlib.Path, *, t5: bool = True) -> pathlib.Path:
  """A diffusers SD3 pipeline folder's tokenizer/, tokenizer_2/ (and tokenizer_3/) with real CLIP vocabularies."""
  gz = bpe_gz()
  if gz is None:
    raise FileNotFoundError(f"open_clip's {BPE_GZ} is not installed: pip install --no-deps open-clip-torch")
  vocab, merges = clip_vocab_and_merges(gz)
  write_clip(root / "tokenizer", vocab, merges, pad=EOS)
  write_clip(root / "tokenizer_2", vocab, merges, pad="!", decoder=True)
  if t5:
    train_spiece(root / "tokenizer_3")
  return root


def transformers_tokenizers(root: pathlib.Path) -> dict:
  """The oracle: transformers' CLIPTokenizer (x2) and T5TokenizerFast loaded from the same folders."""
  from transformers import CLIPTokenizer, T5TokenizerFast

  out = {"clip_l": CLIPTokenizer.from_pretrained(root / "tokenizer"),
         "clip_g": CLIPTokenizer.from_pretrained(root / "tokenizer_2")}
  if (root / "tokenizer_3").is_dir():
    out["t5"] = T5TokenizerFast.from_pretrained(root / "tokenizer_3")
  return out
