"""Prompt -> token ids for SD3's three encoders, in two profiles.

  diffusers       ``StableDiffusion3Pipeline``: each tokenizer on the whole prompt, CLIP truncated / padded to 77
                  (BOS + 75 + EOS), T5 + EOS truncated / padded with 0 to ``max_sequence_length``.
  sd35_reference  Stability's ``sd3_infer.py`` (``SDTokenizer``): A1111 weights ``(word:1.2)`` / ``(word)`` parsed and
                  dropped, ``\\(`` ``\\)`` kept as literal parentheses, newlines as spaces, the prompt split on spaces
                  and tokenized word by word with the CLIP-L tokenizer for both CLIPs. Words go into 77-token chunks
                  (BOS ... EOS); a word that does not fit starts the next chunk, unless it has 8 or more tokens, which
                  are split; only the first chunk is encoded, CLIP-L padded with EOS 49407, CLIP-G with 0. T5 sees the
                  first 226 characters, word by word, + EOS, padded with 0 to at least 77 and otherwise unpadded.

T5 attends to its padding (no mask), so the T5 length is part of the conditioning: a batch whose prompts give
different sd35_reference lengths cannot share one array and is refused (:func:`t5_lengths` tells them apart).
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("dit_jax")

PROFILES = ("diffusers", "sd35_reference")
MAX_T5_TOKENS = 512
CLIP_TOKENS = 77
REFERENCE_T5_MIN = 77      # SDTokenizer(min_length=77) for T5
REFERENCE_T5_CHARS = 226   # SD3Tokenizer passes text[:226] to T5
REFERENCE_LONG_WORD = 8    # SDTokenizer.max_word_length: words this long are split across chunks
REFERENCE_CLIP_G_PAD = 0   # SDXLClipGTokenizer(pad_with_end=False)


class TokenizerError(ValueError):
  """A user-facing problem with tokenizer files or prompts; the message is one line."""


def check_profile(profile: str, max_sequence_length: int) -> None:
  """One-line ValueError unless ``profile`` is known and 1 <= ``max_sequence_length`` <= 512."""
  if profile not in PROFILES:
    raise TokenizerError(f"unknown text profile {profile!r}: use one of {', '.join(PROFILES)}")
  if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
      or not 1 <= max_sequence_length <= MAX_T5_TOKENS:
    raise TokenizerError(f"max_sequence_length must be an integer in 1..{MAX_T5_TOKENS}, got {max_sequence_length!r}")


def prompt_list(prompts) -> list[str]:
  """``prompts`` (a string or a non-empty list of strings) as a list, else a one-line TokenizerError."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise TokenizerError("prompts must be a non-empty list of strings")
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise TokenizerError(f"prompts must be strings, got a {type(bad[0]).__name__}")
  return list(prompts)


def _check_tokenizers(tokenizers) -> None:
  missing = [k for k in ("clip_l", "clip_g") if k not in (tokenizers or {})]
  if missing:
    raise TokenizerError(f"the tokenizers lack {' and '.join(missing)}: load them with load_tokenizers(folder)")


# ---- Stability's prompt parsing (A1111 weights, escapes, word split)

def _groups(text: str) -> list[str]:
  """Split at top-level parentheses: runs of text and whole "(...)" groups (an unmatched ")" stays text)."""
  out, current, depth = [], "", 0
  for ch in text:
    if ch == "(":
      if depth == 0 and current:
        out.append(current)
        current = ""
      depth += 1
      current += ch
    elif ch == ")":
      depth -= 1
      current += ch
      if depth == 0:
        out.append(current)
        current = ""
    else:
      current += ch
  return out + [current] if current else out


def _unweighted(text: str) -> list[str]:
  """The text segments of ``text`` with the "(...)" / "(...:weight)" wrappers removed, recursively."""
  out = []
  for group in _groups(text):
    if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
      inner = group[1:-1]
      colon = inner.rfind(":")
      if colon > 0:
        try:
          float(inner[colon + 1:])
          inner = inner[:colon]
        except ValueError:
          pass
      out += _unweighted(inner)
    else:
      out.append(group)
  return out


def prompt_words(text: str) -> list[str]:
  """The words Stability's SDTokenizer tokenizes one by one: weights dropped, ``\\(`` ``\\)`` literal, split on
  spaces (after newlines become spaces), empty words skipped."""
  text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
  words = []
  for segment in _unweighted(text):
    segment = segment.replace("\0\1", ")").replace("\0\2", "(").replace("\n", " ")
    words += [w for w in segment.split(" ") if w]
  return words


def first_chunk(word_ids: list[list[int]], bos: int, eos: int, pad: int) -> tuple[list[int], bool]:
  """SDTokenizer's first 77-token CLIP chunk of the per-word ids, and whether anything was left for later chunks."""
  chunk = [bos]
  for ids in word_ids:
    if len(chunk) + len(ids) <= CLIP_TOKENS - 1:
      chunk += ids
      continue
    if len(ids) >= REFERENCE_LONG_WORD:  # long words are split at the chunk end, short ones move whole
      chunk += ids[:CLIP_TOKENS - 1 - len(chunk)]
    return chunk + [eos] + [pad] * (CLIP_TOKENS - 1 - len(chunk)), True
  return chunk + [eos] + [pad] * (CLIP_TOKENS - 1 - len(chunk)), False


def _words_ids(tokenizer, prompts: list[str]) -> list[list[list[int]]]:
  """Per prompt, the ids of each of its words (one batched call)."""
  words = [prompt_words(p) for p in prompts]
  flat = tokenizer.ids_of_batch([w for ws in words for w in ws]) if any(words) else []
  out, i = [], 0
  for ws in words:
    out.append(flat[i:i + len(ws)])
    i += len(ws)
  return out


def _reference_t5(t5, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
  rows = [[i for ids in word_ids for i in ids] + [t5.eos_id]
          for word_ids in _words_ids(t5, [p[:REFERENCE_T5_CHARS] for p in prompts])]
  rows = [r + [0] * (REFERENCE_T5_MIN - len(r)) for r in rows]
  return rows, [len(p) > REFERENCE_T5_CHARS for p in prompts]


def _reference(tokenizers: dict, prompts: list[str]) -> dict:
  clip = tokenizers["clip_l"]  # Stability tokenizes for both CLIPs with the CLIP-L tokenizer ("!" stays BPE)
  words = _words_ids(clip, prompts)
  out, cut = {}, np.zeros(len(prompts), bool)
  for name, pad in (("clip_l", clip.eos_id), ("clip_g", REFERENCE_CLIP_G_PAD)):
    chunks = [first_chunk(w, clip.bos_id, clip.eos_id, pad) for w in words]
    out[name] = np.asarray([c for c, _ in chunks], np.int32)
    cut |= [t for _, t in chunks]
  if "t5" in tokenizers:
    rows, t5_cut = _reference_t5(tokenizers["t5"], prompts)
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
      raise TokenizerError(
          f"sd35_reference gives these prompts T5 sequences of different lengths ({', '.join(map(str, lengths))}); "
          "T5 has no attention mask, so padding would change them: encode the prompts separately "
          "(t5_lengths() groups them)")
    out["t5"] = np.asarray(rows, np.int32)
    cut |= t5_cut
  out["truncated"] = [bool(c) for c in cut]
  return out


def _diffusers(tokenizers: dict, prompts: list[str], max_sequence_length: int) -> dict:
  out, cut = {}, np.zeros(len(prompts), bool)
  for name in ("clip_l", "clip_g"):
    out[name], flags = tokenizers[name].encode(prompts, CLIP_TOKENS, return_truncated=True)
    cut |= flags
  if "t5" in tokenizers:
    out["t5"], flags = tokenizers["t5"].encode(prompts, max_sequence_length, return_truncated=True)
    cut |= flags
  out["truncated"] = [bool(c) for c in cut]
  return out


def tokenize(tokenizers: dict, prompts: list[str], profile: str = "diffusers", max_sequence_length: int = 256) -> dict:
  """Token ids of ``prompts`` for CLIP-L, CLIP-G and T5 in ``profile``.

  Args:
    tokenizers: {"clip_l", "clip_g"[, "t5"]} (:func:`dit_jax.text.tokenizers.load_tokenizers`).
    max_sequence_length: the T5 length of the diffusers profile (1..512; sd35_reference checks but ignores it).
  Returns:
    {"clip_l": (B, 77) int32, "clip_g": (B, 77) int32, "t5": (B, L) int32 (absent without a "t5" tokenizer),
     "truncated": [bool] * B}; L = max_sequence_length (diffusers) or max(77, T5 tokens + EOS) (sd35_reference).
    One "dit_jax" warning names the truncated prompts.
  """
  check_profile(profile, max_sequence_length)
  _check_tokenizers(tokenizers)
  prompts = prompt_list(prompts)
  if profile == "diffusers":
    out = _diffusers(tokenizers, prompts, int(max_sequence_length))
    limits = f"CLIP keeps {CLIP_TOKENS} tokens" + (f", T5 {max_sequence_length}" if "t5" in tokenizers else "")
  else:
    out = _reference(tokenizers, prompts)
    limits = f"CLIP keeps its first {CLIP_TOKENS}-token chunk" + (
        f", T5 the first {REFERENCE_T5_CHARS} characters" if "t5" in tokenizers else "")
  cut = [i for i, c in enumerate(out["truncated"]) if c]
  if cut:
    logger.warning("%d of %d prompts truncated (%s profile: %s): prompt%s %s", len(cut), len(prompts), profile,
                   limits, "" if len(cut) == 1 else "s", ", ".join(str(i) for i in cut[:10]) +
                   (", ..." if len(cut) > 10 else ""))
  return out


def t5_lengths(tokenizers: dict, prompts: list[str], profile: str = "diffusers", max_sequence_length: int = 256
               ) -> list[int]:
  """The T5 sequence length of each prompt in ``profile`` (group sd35_reference prompts by it to batch them)."""
  check_profile(profile, max_sequence_length)
  _check_tokenizers(tokenizers)
  prompts = prompt_list(prompts)
  if "t5" not in tokenizers:
    raise TokenizerError("there is no T5 tokenizer")
  if profile == "diffusers":
    return [int(max_sequence_length)] * len(prompts)
  return [len(r) for r in _reference_t5(tokenizers["t5"], prompts)[0]]
