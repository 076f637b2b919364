"""One served text tower: tokenize, then forward a padded batch with the host copy.

The stages are plain synchronous functions, like the image encoder's: the text
pipeline tokenizes in the preprocessing pool and the batcher runs ``embed_batch``
on the device thread. The tokenizer is the checkpoint's own (what its processor
uses: CLIPTokenizer, SigLIP's SentencePiece one, Gemma's, XLM-R's), cut to the
context as ``tokenizer(text, truncation=True, max_length=context)`` cuts, so ids
match the reference exactly; the batch is padded as the family says
(runtime.families): to its longest text with a mask, or to the full context
without one (SigLIP), on the side the tokenizer pads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer

from clipvision.server.errors import InvalidTextError, Reason
from clipvision.server.runtime.checkpoint import TextTower
from clipvision.server.runtime.families import TextPadding
from clipvision.server.runtime.image_encoder import FloatArray

IdArray = npt.NDArray[np.int64]
# Another runtime's forward pass of the text tower (ONNX Runtime): ids and mask in.
TextRunner = Callable[[IdArray, IdArray], FloatArray]


@dataclass(frozen=True)
class TokenizedText:
    """One text as token ids (start and end tokens included), ready for a batch."""

    ids: IdArray
    truncated: bool
    """The text had more tokens than the context; only its first ones are kept."""


class ClipTextEncoder:
    """The stages of embedding a text with one loaded text tower, of any family."""

    def __init__(
        self,
        name: str,
        tower: TextTower,
        device: torch.device,
        max_text_bytes: int,
        runner: TextRunner | None = None,
    ) -> None:
        self.name = name
        self.tower = tower
        self.device = device
        self.max_text_bytes = max_text_bytes
        # ONNX Runtime's session (see backends), or None for torch.
        self.runner = runner
        self.backend = "torch" if runner is None else "onnxruntime"
        tokenizer = tower.tokenizer
        self._ids = _token_ids(tokenizer, tower.context_length)
        self._pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._to_context = tower.family.padding is TextPadding.CONTEXT
        # Only texts padded to the context follow the tokenizer's side: padding on the
        # left of a text padded to the longest would move its tokens with its batch.
        self._pad_left = self._to_context and tokenizer.padding_side == "left"

    @property
    def context_length(self) -> int:
        """The most tokens one text may have, start and end tokens included."""
        return self.tower.context_length

    def check(self, text: str) -> int:
        """Refuse an empty or oversized text before any work is spent on it; its UTF-8 size."""
        if not text:
            raise InvalidTextError(
                Reason.TEXT_EMPTY, "The text is empty; send at least one character."
            )
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > self.max_text_bytes:
            raise InvalidTextError(
                Reason.TEXT_TOO_LARGE,
                f"The text is {size} bytes and the limit is {self.max_text_bytes} "
                f"(the model reads at most {self.context_length} tokens of it anyway).",
            )
        return size

    def tokenize(self, text: str, truncate: bool) -> TokenizedText:
        """Token ids of ``text``, cut to the context unless ``truncate`` is false (then refused).

        Cut as the tokenizer cuts with ``truncation=True, max_length=context``: its first
        tokens, with the special tokens the tokenizer adds kept.
        """
        ids, total = self._ids(text)
        truncated = total > len(ids)
        if truncated and not truncate:
            raise InvalidTextError(
                Reason.TEXT_TOO_LONG,
                f"The text is {total} tokens and model {self.name!r} reads at most "
                f"{self.context_length} (start and end tokens included); shorten it, or send "
                "it with truncate unset to embed its first tokens.",
            )
        return TokenizedText(np.asarray(ids, dtype=np.int64), truncated)

    def embed_batch(self, texts: list[IdArray]) -> FloatArray:
        """Forward a padded batch, and copy the features to the host.

        One call on the device thread. Padded to the longest text with its positions
        masked (the tower pools at each text's own end token, so padding changes
        nothing), or, for a family padded to the context, every text to the full
        context with no mask, as the model was trained.
        """
        width = self.context_length if self._to_context else max(len(ids) for ids in texts)
        ids = np.full((len(texts), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, text in enumerate(texts):
            span = slice(width - len(text), width) if self._pad_left else slice(0, len(text))
            ids[row, span] = text
            mask[row, span] = 1
        if self.runner is not None:
            return self.runner(ids, mask)
        with torch.inference_mode():
            embeds = self.tower.features(
                torch.from_numpy(ids).to(self.device),
                None if self._to_context else torch.from_numpy(mask).to(self.device),
            )
            host: FloatArray = embeds.to(device="cpu", dtype=torch.float32).numpy()
        return host

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the tower once per batch size at full context length."""
        for size in batch_sizes:
            self.embed_batch([np.full(self.context_length, self._pad_id, np.int64)] * size)


# A text's ids (cut to the context) and how many tokens it has uncut.
TokenIds = Callable[[str], tuple[list[int], int]]


def _token_ids(tokenizer: Any, context: int) -> TokenIds:
    """How to tokenize one text as ``tokenizer(text, truncation=True, max_length=context)``.

    A tokenizer backed by the Rust library runs on private copies of its Rust tokenizer,
    without the Python wrapper's per-call overhead; the wrapper would also reconfigure
    the shared Rust tokenizer's truncation on every call, which threads must not race
    on. A Python (SentencePiece) tokenizer is called as its model card calls it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _python_ids(tokenizer, context)
    whole = Tokenizer.from_str(backend.to_str())
    whole.no_truncation()
    whole.no_padding()
    cut = Tokenizer.from_str(backend.to_str())
    cut.no_padding()
    cut.enable_truncation(context, strategy="longest_first", direction=tokenizer.truncation_side)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    whole.encode_special_tokens = cut.encode_special_tokens = split

    def ids(text: str) -> tuple[list[int], int]:
        full: list[int] = whole.encode(text).ids
        if len(full) <= context:
            return full, len(full)
        kept: list[int] = cut.encode(text).ids
        return kept, len(full)

    return ids


def _python_ids(tokenizer: Any, context: int) -> TokenIds:
    def ids(text: str) -> tuple[list[int], int]:
        # verbose=False: an over-long text is expected here, not worth the wrapper's warning.
        full: list[int] = tokenizer(text, verbose=False)["input_ids"]
        if len(full) <= context:
            return full, len(full)
        kept: list[int] = tokenizer(text, truncation=True, max_length=context)["input_ids"]
        return kept, len(full)

    return ids
