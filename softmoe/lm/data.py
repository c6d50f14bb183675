"""Corpora for the char-level LM, as bytes (vocabulary 256: any text works, nothing to save).

`load_corpus("pydoc")`: Python's own `pydoc_data.topics` (ships with CPython, ~465k
characters, no download); or a path: one text file, or a folder whose *.txt / *.md / *.rst /
*.py files are concatenated in sorted order. The held-out part is the corpus's last
`val_fraction` (contiguous, so no training window overlaps it), cut in two halves: the
validation split first (for decisions: evaluations during training, choosing a recipe), the
test split last (reported once, at the end), as the vision rules have it (docs/design.md §8.6).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def load_corpus(spec: str) -> str:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"corpus must be 'pydoc' or a path to a text file or folder, got {spec!r}")
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"corpus folder {spec!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    raise FileNotFoundError(f"corpus {spec!r} is neither 'pydoc' nor an existing file or folder")


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 (N,)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


SPLITS = ("val", "test")


@dataclass
class CharCorpus:
    train: torch.Tensor  # (N_train,) int64 bytes
    val: torch.Tensor  # (N_val,) the first half of the held-out tail: decisions
    test: torch.Tensor  # (N_test,) its second half: reported once

    @classmethod
    def from_spec(cls, spec: str, val_fraction: float, block_size: int) -> CharCorpus:
        """`val_fraction`: the held-out share of the corpus (validation + test, half each)."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        data = encode(load_corpus(spec))
        n_held = int(len(data) * val_fraction)
        n_val = n_held // 2
        if n_val < block_size + 1 or n_held - n_val < block_size + 1 or len(data) - n_held < block_size + 1:
            raise ValueError(f"corpus {spec!r} has {len(data)} bytes: too short for block_size={block_size} "
                             f"with val_fraction={val_fraction} (each of train, validation and test needs "
                             f"block_size + 1 bytes)")
        held = data[-n_held:]
        return cls(data[:-n_held], held[:n_val], held[n_val:])

    def batch(self, batch_size: int, block_size: int, generator: torch.Generator):
        """Random training windows: inputs (B, T) and next-byte targets (B, T)."""
        start = torch.randint(0, len(self.train) - block_size - 1, (batch_size,), generator=generator)
        rows = start.unsqueeze(1) + torch.arange(block_size + 1)
        w = self.train[rows]  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def windows(self, split: str, block_size: int, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping windows (W, T+1) of held-out `split` ("val" or "test"): all of them,
        or at most `max_windows`, evenly spread (always the same ones)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = getattr(self, split)
        n = (len(data) - 1) // block_size
        k = n if max_windows is None else min(n, max_windows)
        idx = torch.linspace(0, n - 1, k).round().to(torch.int64)
        rows = (idx * block_size).unsqueeze(1) + torch.arange(block_size + 1)
        return data[rows]

    def val_windows(self, block_size: int, max_windows: int) -> torch.Tensor:
        """`windows("val", block_size, max_windows)`."""
        return self.windows("val", block_size, max_windows)
