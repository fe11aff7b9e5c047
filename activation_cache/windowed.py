"""WindowedTextDataset: documents tokenized once and cut into fixed-length windows with masks.

Layout of one window of ``max_length`` T (``prepend_bos=True``)::

    position   0     1 .. n        n+1 .. T-1
    tokens     BOS   doc tokens    pad
    attention  1     1             0          (real tokens, BOS included)
    train      0*    1             0          (* BOS is excluded by default: exclude_bos)

Each document is tokenized on its own (no special tokens added by the tokenizer), then cut into
consecutive, non-overlapping chunks of ``T - 1`` tokens (``T`` without BOS); every chunk
becomes one window starting with BOS, and the last chunk of a document is padded. Windows never
mix documents, so a document's tokens all land on one side of a train/validation split.

``train_mask`` marks the tokens an SAE trains and is evaluated on: padding is always out; BOS
(any position holding the BOS id) is out unless ``exclude_bos=False`` (its huge norm eats
BatchTopK's shared budget); ``exclude_token_ids`` and ``exclude_first_positions`` (attention
sinks when no BOS is prepended) remove more.
"""

from __future__ import annotations

import logging

import numbers
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpus import Document
from .errors import UserError


class WindowError(UserError):
    """Windowing parameters that cannot work (window longer than the context, no pad token...)."""


def train_mask_for(tokens: torch.Tensor, attention_mask: torch.Tensor, *,
                   bos_token_id: int | None, exclude_bos: bool = True,
                   exclude_token_ids: Sequence[int] = (),
                   exclude_first_positions: int = 0) -> torch.Tensor:
    """The train mask of windows ``tokens`` [..., T] with ``attention_mask`` [..., T] (bool).

    True where the token is real and not excluded: BOS ids (when ``exclude_bos``), any id in
    ``exclude_token_ids``, and the first ``exclude_first_positions`` positions of each window.
    """
    mask = attention_mask.to(torch.bool).clone()
    if exclude_bos and bos_token_id is not None:
        mask &= tokens != bos_token_id
    if len(exclude_token_ids):
        mask &= ~torch.isin(tokens, torch.as_tensor(list(exclude_token_ids), dtype=tokens.dtype))
    if exclude_first_positions > 0:
        mask[..., :exclude_first_positions] = False
    return mask


class WindowedTextDataset(Dataset):
    """Fixed-length token windows of a list of texts or :class:`Document` s (a torch Dataset).

    Item ``i`` is a dict of ``tokens`` [T] int64, ``attention_mask`` [T] bool, ``train_mask``
    [T] bool and ``doc_id`` (int64 scalar: the index of the window's document in
    :attr:`documents`), so a ``DataLoader`` batches them into [B, T] tensors. The whole set is
    also available as stacked tensors: :attr:`tokens`, :attr:`attention_mask`,
    :attr:`train_mask` [N, T] and :attr:`doc_ids` [N].
    """

    def __init__(
        self,
        texts: Sequence[str] | Sequence[Document],
        tokenizer: Any,
        max_length: int,
        prepend_bos: bool = True,
        *,
        exclude_bos: bool = True,
        exclude_token_ids: Sequence[int] = (),
        exclude_first_positions: int = 0,
        n_ctx: int | None = None,
        show_progress: bool = False,
    ) -> None:
        """
        Args:
            texts: the documents (plain strings get ids "0", "1", ...).
            tokenizer: a HuggingFace tokenizer (e.g. ``model.tokenizer``).
            max_length: tokens per window T (BOS included): CacheConfig.max_text_length.
            prepend_bos: start every window with the tokenizer's BOS token.
            exclude_bos: leave BOS tokens out of ``train_mask``.
            exclude_token_ids: further token ids to leave out of ``train_mask``.
            exclude_first_positions: leave the first n positions of every window out of
                ``train_mask`` (e.g. the attention sink at position 0 when no BOS is prepended).
            n_ctx: the model's context length; a longer window is refused.
            show_progress: show a tqdm bar while tokenizing.
        """
        if not (_is_int(max_length) and max_length >= (2 if prepend_bos else 1)):
            raise WindowError(f"max_text_length: must be an integer >= {2 if prepend_bos else 1} "
                              f"(BOS plus at least one token), got {max_length!r}")
        if n_ctx is not None and max_length > n_ctx:
            raise WindowError(f"max_text_length: windows of {max_length} tokens are longer than "
                              f"the model's context n_ctx={n_ctx}; use at most {n_ctx}")
        if not (_is_int(exclude_first_positions) and 0 <= exclude_first_positions <= max_length):
            raise WindowError(f"exclude_first_positions: must be an integer in [0, {max_length}], "
                              f"got {exclude_first_positions!r}")
        bad_ids = [t for t in exclude_token_ids if not (_is_int(t) and t >= 0)]
        if bad_ids:
            raise WindowError(f"exclude_token_ids: token ids must be integers >= 0, got {bad_ids}")
        if not callable(tokenizer):
            raise WindowError(f"tokenizer: expected a HuggingFace tokenizer (e.g. model.tokenizer), "
                              f"got {type(tokenizer).__name__}")
        self.documents: list[Document] = [
            t if isinstance(t, Document) else Document(str(i), _as_text(t, i))
            for i, t in enumerate(texts)
        ]
        self.max_length = int(max_length)
        self.prepend_bos = bool(prepend_bos)
        self.bos_token_id = _special_id(tokenizer, "bos") if prepend_bos or exclude_bos else None
        if prepend_bos and self.bos_token_id is None:
            raise WindowError("prepend_bos: the tokenizer has no BOS token; set prepend_bos: false")
        self.pad_token_id = _pad_id(tokenizer)

        offset = 1 if self.prepend_bos else 0
        content = self.max_length - offset
        per_doc = _tokenize(tokenizer, self.documents, show_progress)
        counts = [-(-len(ids) // content) for ids in per_doc]  # windows per document (ceil)
        n, t = sum(counts), self.max_length
        tokens = np.full((n, t), self.pad_token_id, dtype=np.int64)
        attention = np.zeros((n, t), dtype=bool)
        doc_ids = np.repeat(np.arange(len(per_doc), dtype=np.int64), counts)
        row = 0
        for ids, count in zip(per_doc, counts):
            full = len(ids) // content
            if full:
                tokens[row:row + full, offset:] = ids[:full * content].reshape(full, content)
                attention[row:row + full] = True
            rest = len(ids) - full * content
            if rest:  # the document's last window, padded
                tokens[row + full, offset:offset + rest] = ids[full * content:]
                attention[row + full, :offset + rest] = True
            row += count
        if self.prepend_bos:
            tokens[:, 0] = self.bos_token_id
        self.tokens = torch.from_numpy(tokens)
        self.attention_mask = torch.from_numpy(attention)
        self.doc_ids = torch.from_numpy(doc_ids)
        self.train_mask = train_mask_for(
            self.tokens, self.attention_mask, bos_token_id=self.bos_token_id,
            exclude_bos=exclude_bos, exclude_token_ids=exclude_token_ids,
            exclude_first_positions=exclude_first_positions)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens[index],
            "attention_mask": self.attention_mask[index],
            "train_mask": self.train_mask[index],
            "doc_id": self.doc_ids[index],
        }

    @property
    def num_tokens(self) -> int:
        """Real tokens (BOS included, padding not)."""
        return int(self.attention_mask.sum())

    @property
    def num_train_tokens(self) -> int:
        """Tokens in ``train_mask``."""
        return int(self.train_mask.sum())


def _tokenize(tokenizer: Any, documents: list[Document], show_progress: bool) -> list[np.ndarray]:
    """Token ids (int64 arrays) of every document, without special tokens added or parsed from
    the text; documents go through the tokenizer in small batches to bound memory."""
    from .progress import progress_bar

    out: list[np.ndarray] = []
    batch = 16
    with progress_bar(len(documents), desc="tokenizing", unit="doc", disable=not show_progress,
                      emit=logging.getLogger("activation_cache").info) as bar:
        for start in range(0, len(documents), batch):
            texts = [d.text for d in documents[start:start + batch]]
            # split_special_tokens: a literal "<|im_start|>" in a document is text, not a control
            # token (otherwise text could forge BOS tokens).
            encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                                verbose=False)["input_ids"]
            out.extend(np.asarray(ids, dtype=np.int64) for ids in encoded)
            bar.update(len(texts))
    return out


def _special_id(tokenizer: Any, which: str) -> int | None:
    value = getattr(tokenizer, f"{which}_token_id", None)
    return None if value is None else int(value)


def _pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (padding is masked out anyway)."""
    for which in ("pad", "eos"):
        value = _special_id(tokenizer, which)
        if value is not None:
            return value
    return 0


def _as_text(value: Any, index: int) -> str:
    if not isinstance(value, str):
        raise WindowError(f"texts[{index}]: expected a string or a Document, got "
                          f"{type(value).__name__}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
