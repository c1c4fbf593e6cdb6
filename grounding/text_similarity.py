"""Phrase similarity for GCG mask recall: cosine of mean-pooled encoder states, as GLaMM computes it. GLaMM's
recall (mbzuai-oryx/groundingLMM, eval/gcg/evaluate.py ``get_bert_embedding`` and ``text_similarity_bert``)
embeds a phrase as the mean of ``bert-base-uncased``'s last hidden states over *all* tokens, [CLS] and [SEP]
included (tokenised one phrase at a time, ``max_length=512, truncation=True``), and compares two phrases with
sklearn's cosine similarity. :class:`PhraseSimilarity` does the same with any encoder folder that
``AutoModel``/``AutoTokenizer`` load offline, but batches phrases: padding is excluded by weighting the mean
with the attention mask, so each embedding equals the unpadded one up to float rounding. Each distinct phrase
is embedded once per call. The model is a plain attribute of a plain object (not an ``nn.Module`` child), so
holding one inside a torchmetrics ``Metric`` never puts encoder weights into a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from grounding.coco_io import GroundingInputError


class SimilarityFn(Protocol):
    """Anything that maps two phrase lists to a ``(len(a), len(b))`` similarity matrix."""

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray: ...


class PhraseSimilarity:
    """Cosine similarity of mean-pooled last hidden states of a local encoder model (GLaMM's recall text model).

    Args:
        model_path: a local folder with a Hugging Face encoder (``bert-base-uncased`` for GLaMM's numbers).
        device: where to run the encoder.
        batch_size: phrases per forward pass.
        max_length: tokenizer truncation length (GLaMM: 512).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 512,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise GroundingInputError(
                f"{path}: text model folder not found (expected a local Hugging Face model folder)"
            )
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GroundingInputError(f"{path}: cannot load text model ({first})") from None
        self._device = torch.device(device)
        self._batch_size = int(batch_size)
        self._max_length = int(max_length)

    @torch.inference_mode()
    def embed(self, phrases: Sequence[str]) -> np.ndarray:
        """Mean-pooled embeddings, shape ``(len(phrases), hidden)`` float32; duplicates are embedded once."""
        if isinstance(phrases, str) or not all(isinstance(p, str) for p in phrases):
            raise GroundingInputError("phrases: expected a sequence of strings")
        unique = list(dict.fromkeys(phrases))
        if not unique:
            return np.zeros((0, int(self._model.config.hidden_size)), dtype=np.float32)
        rows: list[np.ndarray] = []
        for start in range(0, len(unique), self._batch_size):
            chunk = unique[start : start + self._batch_size]
            enc = self._tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self._max_length
            )
            enc = {k: v.to(self._device) for k, v in enc.items()}
            hidden = self._model(**enc).last_hidden_state.float()
            weights = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            rows.append(mean.cpu().numpy())
        table = np.concatenate(rows, axis=0)
        index = {p: i for i, p in enumerate(unique)}
        return table[[index[p] for p in phrases]]

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity matrix ``(len(a), len(b))`` in float64 (all phrases embedded in one pass)."""
        emb = self.embed(list(a) + list(b)).astype(np.float64)
        return cosine_matrix(emb[: len(a)], emb[len(a) :])


def cosine_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity like ``sklearn.metrics.pairwise.cosine_similarity`` (zero vectors give 0)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    ny = np.linalg.norm(y, axis=1, keepdims=True)
    nx[nx == 0] = 1.0
    ny[ny == 0] = 1.0
    return (x / nx) @ (y / ny).T
