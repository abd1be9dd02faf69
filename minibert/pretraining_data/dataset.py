"""Reading the shards back: PretrainingDataset (memory-mapped rows), the corpus's unigram statistics, and
the seeded, resumable, DDP-sharded batch order."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from minibert.pretraining_data.shards import ROW_ARRAYS, SHARD_ARRAYS
from minibert.tokenizer import special_token_ids


class PretrainingDataset(torch.utils.data.Dataset):
    """One split of build_pretraining_shards' output, memory-mapped (rows are read on access).

    ``ds[i]`` is a dict of tensors: input_ids (T,) int64, attention_mask (T,) int64,
    token_type_ids (T,) int64, next_sentence_label () int64 (only for NSP shards),
    word_continues (T,) bool (only for segmented shards) and index () int64 (= i, which seeds the
    example's mask). ``ds.batch(indices)`` (also used by a
    DataLoader as ``__getitems__``) returns the same keys stacked: (B, T) and (B,).
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        self.shard_dir = Path(shard_dir)
        meta_path = self.shard_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: build the shards with build_pretraining_shards")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if split not in self.meta["splits"]:
            raise ValueError(f"split must be one of {sorted(self.meta['splits'])}, got {split!r}")
        self.split = split
        self.seq_len = self.meta["settings"]["seq_len"]
        self.nsp = self.meta["settings"]["nsp"]
        self.segmented = "segmenter" in self.meta["settings"]
        self.tokenizer = Tokenizer.from_file(str(self.shard_dir / "tokenizer.json"))
        self.mask_token_id = self.meta["special_token_ids"]["[MASK]"]
        self.vocab_size = self.meta["vocab_size"]
        self.special_token_ids = special_token_ids(self.tokenizer)
        n = self.meta["splits"][split]["num_examples"]
        self.arrays = {}
        for name, dtype in SHARD_ARRAYS.items():
            if (name == "nsp_labels" and not self.nsp) or (name == "word_continues" and not self.segmented):
                continue
            shape = (n, self.seq_len) if name in ROW_ARRAYS else (n,)
            # np.memmap cannot map an empty file, which an empty split (heldout_fraction=0) has.
            path = self.shard_dir / split / f"{name}.bin"
            self.arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape) if n else np.zeros(shape, dtype)

    def __len__(self) -> int:
        return len(self.arrays["lengths"])

    # DataLoader workers started with "spawn" receive a pickled dataset: send the path and reopen
    # the maps there, instead of pickling the memory-mapped arrays as in-memory copies.
    def __getstate__(self) -> dict:
        return {"shard_dir": self.shard_dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shard_dir"], state["split"])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows ``indices`` stacked: input_ids/attention_mask/token_type_ids (B, T) int64,
        next_sentence_label (B,) int64 (NSP shards only), index (B,) int64."""
        index = np.asarray(indices, dtype=np.int64)
        input_ids = torch.from_numpy(self.arrays["input_ids"][index].astype(np.int64))
        positions = torch.arange(self.seq_len)
        lengths = torch.from_numpy(self.arrays["lengths"][index].astype(np.int64))[:, None]
        b_start = torch.from_numpy(self.arrays["b_start"][index].astype(np.int64))[:, None]
        out = {
            "input_ids": input_ids,
            "attention_mask": (positions < lengths).long(),
            "token_type_ids": ((positions >= b_start) & (positions < lengths)).long(),
            "index": torch.from_numpy(index),
        }
        if self.nsp:
            out["next_sentence_label"] = torch.from_numpy(self.arrays["nsp_labels"][index].astype(np.int64))
        if self.segmented:
            out["word_continues"] = torch.from_numpy(self.arrays["word_continues"][index].astype(bool))
        return out

    __getitems__ = batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}


def unigram_log_probs(dataset: PretrainingDataset, smoothing: float = 1.0) -> torch.Tensor:
    """(vocab_size,) float32: log frequency of each token among the real, non-special tokens of
    ``dataset`` (add-``smoothing`` counts, so unseen tokens get a finite value), special tokens at
    the smallest value. The masked-LM answer distribution when context is ignored: see
    train_pretrain.py's ``--unigram-bias-init``."""
    ids, lengths = dataset.arrays["input_ids"], dataset.arrays["lengths"]
    counts = np.zeros(dataset.vocab_size, dtype=np.float64)
    for start in range(0, len(ids), 65_536):  # a chunk at a time: the shard stays memory-mapped
        rows, row_lengths = ids[start : start + 65_536], lengths[start : start + 65_536]
        real = np.arange(rows.shape[1])[None, :] < row_lengths[:, None]
        counts += np.bincount(rows[real], minlength=dataset.vocab_size)[: dataset.vocab_size]
    counts[dataset.special_token_ids] = 0.0
    log_probs = np.log(counts + smoothing) - np.log(counts.sum() + smoothing * dataset.vocab_size)
    log_probs[dataset.special_token_ids] = log_probs.min()
    return torch.from_numpy(log_probs).float()


def num_batches(num_examples: int, global_batch_size: int, drop_last: bool = True) -> int:
    """Steps in one epoch of ``batches``."""
    return num_examples // global_batch_size if drop_last else -(-num_examples // global_batch_size)


def batches(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[list[int]]:
    """Yield this rank's example indices for each step of one epoch, from ``start_step`` on.

    The epoch's order is a permutation seeded by (seed, epoch), the same on every rank; global batch
    s is its slice [s*G, (s+1)*G), and rank r takes the r-th contiguous part of it (G/world_size
    rows). So concatenating the ranks' lists gives the single-process batch, in the same order, and
    resuming at (epoch, step) continues exactly where a run stopped. ``drop_last=False`` (for
    evaluation) keeps the last short batch; its parts may then differ by one row across ranks.
    """
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle else np.arange(num_examples)
    for step in range(start_step, num_batches(num_examples, global_batch_size, drop_last)):
        global_batch = order[step * global_batch_size : (step + 1) * global_batch_size]
        yield np.array_split(global_batch, world_size)[rank].tolist()
