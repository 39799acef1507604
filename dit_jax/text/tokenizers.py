"""Offline tokenizers for SD3's text encoders, on HF's ``tokenizers`` library (no transformers at run time).

  CLIPTokenizer  byte-level BPE (OpenAI CLIP, 49,408 ids): NFC -> collapse whitespace -> lowercase, CLIP's word
                 regex, ``</w>`` word ends, ``<|startoftext|>`` (49406) ... ``<|endoftext|>`` (49407). CLIP-L pads
                 with ``<|endoftext|>``, SD3's tokenizer_2 with ``!`` (0), which also makes a literal "!" id 0.
  T5Tokenizer    SentencePiece unigram (spiece.model or tokenizer.json) + 100 sentinels ``<extra_id_N>``, ids ``</s>``
                 (eos 1), pad 0.

Both build the pipeline transformers v5 builds for ``CLIPTokenizer`` / ``T5TokenizerFast`` from the same files (the
vocabulary comes from the files, the normalizer / pre-tokenizer / post-processor from the tokenizer type), so
``encode`` gives transformers' ``padding="max_length", truncation=True`` ids. The prompt -> ids logic of the two SD3
profiles is in :mod:`dit_jax.text.profiles`.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from dit_jax.text.profiles import PROFILES, TokenizerError, check_profile, prompt_list, t5_lengths, tokenize

__all__ = ["PROFILES", "CLIPTokenizer", "T5Tokenizer", "TokenizerError", "check_profile", "load_tokenizers",
           "save_tokenizers", "t5_lengths", "tokenize"]

CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens")
T5_EXTRA_IDS = 100
T5_UNK_ID = 2  # transformers' T5 tokenizer fixes unk at id 2 whatever the file says


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise TokenizerError(f"{path} is not readable JSON: {str(e).splitlines()[0]}") from None


def _added(value, *, from_map: bool = False) -> AddedToken:
  """An AddedToken from a config value: a string (special, matched on the raw text) or a serialized AddedToken."""
  if isinstance(value, AddedToken):
    return value
  if isinstance(value, dict):
    keys = ("single_word", "lstrip", "rstrip", "normalized")
    return AddedToken(value["content"], special=True if from_map else value.get("special", True),
                      **{k: value[k] for k in keys if k in value})
  return AddedToken(str(value), special=True, normalized=False)


def _folder_config(folder: pathlib.Path | None, spec: dict | None = None) -> tuple[dict, list[AddedToken]]:
  """A folder's tokenizer settings and added tokens as transformers reads them: tokenizer_config.json with its
  ``added_tokens_decoder``, or without one special_tokens_map.json over it and tokenizer.json's ``added_tokens``."""
  if folder is None:
    return {}, []
  config = _read_json(folder / "tokenizer_config.json")
  decoder = config.get("added_tokens_decoder")
  if isinstance(decoder, dict) and decoder:
    return config, [_added(v) for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
  config.update(_read_json(folder / "special_tokens_map.json"))
  tokens = sorted((spec or {}).get("added_tokens") or [], key=lambda t: t.get("id", 0))
  return config, [_added({k: v for k, v in t.items() if k != "id"}) for t in tokens]


def _special_tokens(config: dict, defaults: dict, file_tokens: list[AddedToken]) -> dict:
  """{key: AddedToken} of the named special tokens, and "extra": the additional ones (a file's flags win)."""
  config = {**defaults, **{k: v for k, v in config.items() if v is not None}}
  by_content = {t.content: t for t in file_tokens}
  out = {}
  for key in SPECIAL_KEYS:
    if config.get(key) is not None:
      token = _added(config[key], from_map=True)
      out[key] = by_content.get(token.content, token)
  extras = [v for key in EXTRA_KEYS if isinstance(config.get(key), list) for v in config[key]]
  out["extra"] = [by_content.get(t.content, t) for t in map(_added, extras)]
  return out


class _Tokenizer:
  """A ``tokenizers.Tokenizer`` plus its special tokens; ``encode`` pads / truncates like transformers."""

  kind = ""

  def __init__(self, backend: Tokenizer, specials: dict, file_tokens: list[AddedToken], source=None):
    self.specials = specials
    self.source = source  # spiece.model bytes kept for save()
    tokens = [*file_tokens, *(specials[k] for k in SPECIAL_KEYS if k in specials), *specials.get("extra", [])]
    backend.add_special_tokens(tokens)  # a later add of the same content sets its flags
    self._set_post_processor(backend)
    self._backend = backend
    self._length = None  # the length the backend pads / truncates to now (None: neither)
    if self.pad_id is None:
      raise TokenizerError(f"the pad token {self.pad_token!r} is not in the {self.kind} vocabulary")

  def _set_post_processor(self, backend: Tokenizer) -> None:
    raise NotImplementedError

  @property
  def pad_token(self) -> str:
    return self.specials["pad_token"].content

  @property
  def pad_id(self) -> int | None:
    return self._backend.token_to_id(self.pad_token)

  @property
  def eos_id(self) -> int:
    return self._backend.token_to_id(self.specials["eos_token"].content)

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  def _fix_length(self, length: int | None) -> Tokenizer:
    if self._length != length:
      if length is None:
        self._backend.no_truncation()
        self._backend.no_padding()
      else:
        self._backend.enable_truncation(length, stride=0, strategy="longest_first", direction="right")
        self._backend.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token, length=length)
      self._length = length
    return self._backend

  def ids_of(self, word: str) -> list[int]:
    """The ids of ``word`` (any text) without special tokens, untruncated."""
    return self._fix_length(None).encode(word, add_special_tokens=False).ids

  def ids_of_batch(self, words: list[str]) -> list[list[int]]:
    return [e.ids for e in self._fix_length(None).encode_batch(list(words), add_special_tokens=False)]

  def encode(self, texts, max_length: int = 77, *, return_truncated: bool = False):
    """(B, max_length) int32 ids with special tokens, truncated and padded to ``max_length`` (and with
    ``return_truncated`` the per-text list of whether tokens were cut)."""
    texts = prompt_list(texts)
    specials = self._backend.post_processor.num_special_tokens_to_add(False)
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
        or max_length < max(specials, 1):
      raise TokenizerError(f"max_length must be an integer >= {max(specials, 1)} for {self.kind}, got {max_length!r}")
    max_length = int(max_length)
    encodings = self._fix_length(max_length).encode_batch(texts, add_special_tokens=True)
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_length)
    return (ids, [bool(e.overflowing) for e in encodings]) if return_truncated else ids

  def _save_config(self, folder: pathlib.Path, extra: dict) -> None:
    config = {k: t.content for k, t in self.specials.items() if k in SPECIAL_KEYS}
    if self.specials.get("extra"):
      config["additional_special_tokens"] = [t.content for t in self.specials["extra"]]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **extra}, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    """Write ``folder/tokenizer.json`` and transformers' config files (``from_dir`` reads them back)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self._fix_length(None).save(str(folder / "tokenizer.json"))
    return folder

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, pad={self.pad_token!r})"


def _need(folder: pathlib.Path, *names: str) -> None:
  if not folder.is_dir():
    raise TokenizerError(f"tokenizer folder {folder} does not exist")
  missing = [n for n in names if not (folder / n).is_file()]
  if missing:
    raise TokenizerError(f"{folder} has no {' / '.join(missing)}")


# ---- CLIP

def _read_bpe(vocab_json, merges_txt) -> tuple[dict, list]:
  try:
    return BPE.read_file(str(vocab_json), str(merges_txt))
  except Exception as e:  # the Rust reader's errors carry no type of their own
    raise TokenizerError(f"cannot read {vocab_json} / {merges_txt}: {str(e).splitlines()[0]}") from None


class CLIPTokenizer(_Tokenizer):
  """OpenAI CLIP's byte-level BPE tokenizer (CLIP-L and CLIP-G of SD3 share the vocabulary)."""

  kind = "CLIP"
  DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}

  @staticmethod
  def _backend_of(vocab: dict, merges: list, unk: str) -> Tokenizer:
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    return backend

  def _set_post_processor(self, backend: Tokenizer) -> None:
    bos, eos = self.specials["bos_token"].content, self.specials["eos_token"].content
    ids = backend.token_to_id(bos), backend.token_to_id(eos)
    if None in ids:
      raise TokenizerError(f"the CLIP vocabulary has no {bos if ids[0] is None else eos}")
    backend.post_processor = processors.RobertaProcessing((eos, ids[1]), (bos, ids[0]), trim_offsets=False,
                                                          add_prefix_space=False)

  @property
  def bos_id(self) -> int:
    return self._backend.token_to_id(self.specials["bos_token"].content)

  @classmethod
  def _build(cls, vocab, merges, folder=None, spec=None, **overrides):
    config, file_tokens = _folder_config(folder, spec)
    specials = _special_tokens(config, {**cls.DEFAULTS, **overrides}, file_tokens)
    return cls(cls._backend_of(vocab, merges, specials["unk_token"].content), specials, file_tokens)

  @classmethod
  def from_files(cls, vocab_json, merges_txt, *, pad: str = "<|endoftext|>") -> "CLIPTokenizer":
    """From OpenAI's ``vocab.json`` + ``merges.txt`` (``pad``: ``"!"`` for SD3's CLIP-G tokenizer_2)."""
    for path in (vocab_json, merges_txt):
      if not pathlib.Path(path).is_file():
        raise TokenizerError(f"CLIP tokenizer file {path} does not exist")
    return cls._build(*_read_bpe(vocab_json, merges_txt), pad_token=pad)

  @classmethod
  def from_dir(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
    """From a diffusers ``tokenizer/`` or ``tokenizer_2/`` folder: tokenizer.json or vocab.json + merges.txt, with
    the pad token of tokenizer_config.json / special_tokens_map.json."""
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
      spec = _read_json(folder / "tokenizer.json")
      model = spec.get("model") or {}
      if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{folder}/tokenizer.json holds a {model.get('type')} model, not CLIP's BPE")
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
      return cls._build(model["vocab"], merges, folder, spec)
    _need(folder, "vocab.json", "merges.txt")
    return cls._build(*_read_bpe(folder / "vocab.json", folder / "merges.txt"), folder)

  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    folder = super().save(folder)
    self._save_config(folder, {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    return folder


# ---- T5

class T5Tokenizer(_Tokenizer):
  """T5's SentencePiece unigram tokenizer as transformers' ``T5TokenizerFast`` runs it."""

  kind = "T5"
  DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

  def _set_post_processor(self, backend: Tokenizer) -> None:
    eos = self.specials["eos_token"].content
    if backend.token_to_id(eos) is None:
      raise TokenizerError(f"the T5 vocabulary has no {eos}")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, backend.token_to_id(eos))])

  @classmethod
  def _build(cls, pieces: list, charsmap: bytes | None, folder=None, spec=None, source=None, extra=None):
    config, file_tokens = _folder_config(folder, spec)
    specials = _special_tokens(config, {**cls.DEFAULTS, "additional_special_tokens": extra or []}, file_tokens)
    backend = Tokenizer(Unigram([(p, float(s)) for p, s in pieces], unk_id=T5_UNK_ID, byte_fallback=False))
    if charsmap:
      backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return cls(backend, specials, file_tokens, source)

  @classmethod
  def from_spiece(cls, spiece_model, *, extra_ids: int = T5_EXTRA_IDS, folder=None) -> "T5Tokenizer":
    """From a SentencePiece ``spiece.model`` (+ ``extra_ids`` sentinels ``<extra_id_N>``, N = 0 the last id)."""
    from sentencepiece import sentencepiece_model_pb2

    path = pathlib.Path(spiece_model)
    if not path.is_file():
      raise TokenizerError(f"T5 tokenizer file {path} does not exist")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
      proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
      raise TokenizerError(f"{path} is not a SentencePiece model: {str(e).splitlines()[0]}") from None
    if proto.trainer_spec.model_type != 1 or not proto.pieces:
      raise TokenizerError(f"{path} is not a SentencePiece unigram model")
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    pieces = [(p.piece, p.score) for p in proto.pieces] + [(s, 0.0) for s in sentinels]
    control = [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3]
    return cls._build(pieces, proto.normalizer_spec.precompiled_charsmap or None, folder,
                      source=path.read_bytes(), extra=control + sentinels[::-1])

  @classmethod
  def from_dir(cls, folder: str | os.PathLike) -> "T5Tokenizer":
    """From a diffusers ``tokenizer_3/`` folder: tokenizer.json (preferred) or spiece.model."""
    folder = pathlib.Path(folder)
    source = (folder / "spiece.model").read_bytes() if (folder / "spiece.model").is_file() else None
    if (folder / "tokenizer.json").is_file():
      spec = _read_json(folder / "tokenizer.json")
      model = spec.get("model") or {}
      if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise TokenizerError(f"{folder}/tokenizer.json holds a {model.get('type')} model, not T5's Unigram")
      return cls._build(model["vocab"], _charsmap(spec.get("normalizer")), folder, spec, source)
    _need(folder, "spiece.model")
    extra_ids = _read_json(folder / "tokenizer_config.json").get("extra_ids", T5_EXTRA_IDS)
    return cls.from_spiece(folder / "spiece.model", extra_ids=extra_ids, folder=folder)

  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    folder = super().save(folder)
    if self.source is not None:
      (folder / "spiece.model").write_bytes(self.source)
    sentinels = sum(t.content.startswith("<extra_id_") for t in self.specials.get("extra", []))
    self._save_config(folder, {"model_max_length": 512, "extra_ids": sentinels, "tokenizer_class": "T5Tokenizer"})
    return folder


def _charsmap(normalizer: dict | None) -> bytes | None:
  """SentencePiece's precompiled normalization map inside a tokenizer.json normalizer (or None)."""
  if not normalizer:
    return None
  for n in normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]:
    if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
      return base64.b64decode(n["precompiled_charsmap"])
  return None


# ---- pipeline folders

FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}


def load_tokenizers(folder: str | os.PathLike) -> dict:
  """{"clip_l", "clip_g"[, "t5"]} from a diffusers SD3 pipeline folder's tokenizer/, tokenizer_2/[, tokenizer_3/]."""
  folder = pathlib.Path(folder)
  for name in ("clip_l", "clip_g"):
    if not (folder / FOLDERS[name]).is_dir():
      raise TokenizerError(f"{folder} has no {FOLDERS[name]}/ folder (the {name} tokenizer)")
  out = {name: CLIPTokenizer.from_dir(folder / FOLDERS[name]) for name in ("clip_l", "clip_g")}
  if (folder / FOLDERS["t5"]).is_dir():
    out["t5"] = T5Tokenizer.from_dir(folder / FOLDERS["t5"])
  return out


def save_tokenizers(tokenizers: dict, folder: str | os.PathLike) -> pathlib.Path:
  """Write ``tokenizers`` as a pipeline folder's tokenizer/, tokenizer_2/ (and tokenizer_3/)."""
  folder = pathlib.Path(folder)
  for name, sub in FOLDERS.items():
    if name in tokenizers:
      if (folder / sub).is_dir():
        shutil.rmtree(folder / sub)
      tokenizers[name].save(folder / sub)
  return folder
