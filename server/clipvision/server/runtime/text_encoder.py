"""One served text tower: tokenize, then forward a padded batch with the host copy.

The stages are plain synchronous functions, like the image encoder's: the text
pipeline tokenizes in the preprocessing pool and the batcher runs ``embed_batch``
on the device thread. The tokenizer is the checkpoint's own (transformers'
CLIPTokenizer, the one CLIPProcessor uses), so ids match the reference exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from clipvision.server.errors import InvalidTextError, Reason
from clipvision.server.runtime.checkpoint import TextTower
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
    """The stages of embedding a text with one loaded text tower."""

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
        # The Rust tokenizer CLIPTokenizer wraps: same normaliser, pre-tokenizer, BPE and
        # special tokens, without the Python wrapper's per-call overhead.
        self._backend = tokenizer.backend_tokenizer
        self._pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

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

        Cut as CLIPTokenizer(truncation=True, max_length=context) cuts: the first
        ``context - 2`` tokens of the text between the start and end tokens.
        """
        ids = self._backend.encode(text).ids
        limit = self.context_length
        truncated = len(ids) > limit
        if truncated:
            if not truncate:
                raise InvalidTextError(
                    Reason.TEXT_TOO_LONG,
                    f"The text is {len(ids)} tokens and model {self.name!r} reads at most "
                    f"{limit} (start and end tokens included); shorten it, or send it with "
                    "truncate unset to embed its first tokens.",
                )
            ids = [*ids[: limit - 1], ids[-1]]
        return TokenizedText(np.asarray(ids, dtype=np.int64), truncated)

    def embed_batch(self, texts: list[IdArray]) -> FloatArray:
        """Forward a batch padded to its longest text, and copy the features to the host.

        One call on the device thread: padding positions are masked, and the tower
        pools at each text's own end token, so padding changes nothing.
        """
        longest = max(len(ids) for ids in texts)
        ids = np.full((len(texts), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), longest), dtype=np.int64)
        for row, text in enumerate(texts):
            ids[row, : len(text)] = text
            mask[row, : len(text)] = 1
        if self.runner is not None:
            return self.runner(ids, mask)
        with torch.inference_mode():
            embeds: torch.Tensor = self.tower.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
            ).text_embeds
            host: FloatArray = embeds.to(device="cpu", dtype=torch.float32).numpy()
        return host

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the tower once per batch size at full context length."""
        for size in batch_sizes:
            self.embed_batch([np.full(self.context_length, self._pad_id, np.int64)] * size)
