"""The client-side tokenizer: the trajectory lives as token ids, text is derived from them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from relaygen_sgl.core.errors import ConfigError, TokenizerMismatch


class Tokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises OSError/ValueError/HF errors alike
            raise ConfigError(f"cannot load the tokenizer at {path}: {e}") from e
        self.path = path
        self.eos_ids = {i for i in [self._tok.eos_token_id] if i is not None}

    @functools.cached_property
    def eos_texts(self) -> frozenset[str]:
        """The EOS tokens as text ("<|im_end|>"): as stop strings they are redundant with EOS,
        and SGLang checks stop strings first, so they would hide an EOS finish."""
        return frozenset(str(t) for t in self._tok.convert_ids_to_tokens(sorted(self.eos_ids)) if t)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        kwargs.setdefault("add_generation_prompt", True)
        return self._tok.apply_chat_template(messages, tokenize=False, **kwargs)

    @functools.cached_property
    def fingerprint(self) -> int:
        """Equal for two tokenizers that map every string to the same ids."""
        vocab = self._tok.get_vocab()
        return hash(tuple(sorted(vocab.items())))

    def cut_index(self, ids: Sequence[int], char_end: int) -> int:
        """Smallest k such that decode(ids[:k]) covers the first `char_end` characters."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(ids[:mid])) >= char_end:
                hi = mid
            else:
                lo = mid + 1
        return lo


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def check_same_vocabulary(a: Tokenizer, b: Tokenizer) -> None:
    if a.path != b.path and a.fingerprint != b.fingerprint:
        raise TokenizerMismatch(
            f"the two roles use different tokenizers ({a.path} vs {b.path}); "
            "token-exact handoff needs one vocabulary"
        )
