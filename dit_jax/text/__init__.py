"""Text conditioning for SD3 and FLUX.1: offline tokenizers (and, with the encoders, prompt -> context / pooled)."""
from dit_jax.text.tokenizers import (PROFILES, CLIPTokenizer, T5Tokenizer, TokenizerError, check_profile,
                                     load_tokenizers, save_tokenizers, t5_lengths, tokenize)

__all__ = ["PROFILES", "CLIPTokenizer", "T5Tokenizer", "TokenizerError", "check_profile", "load_tokenizers",
           "save_tokenizers", "t5_lengths", "tokenize"]
