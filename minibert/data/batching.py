"""Batches of Features: which examples go together (by length, seeded, split over DDP ranks), and padding them into tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from minibert.config import IGNORE_INDEX
from minibert.data.encoding import Features
from minibert.data.examples import DataError


def train_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    skip: int = 0,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """One epoch of this rank's training batches (lists of example indices), grouped by length.

    Shuffle all examples; sort them by length within chunks of `chunk_batches` steps, so a batch holds
    examples of similar length and wastes little padding; cut them into steps of batch_size x world_size
    examples; shuffle the steps; give each rank its share of every step. The result depends only on
    (seed, epoch): the ranks agree without talking, and skip=N drops the first N batches of the same
    epoch to resume exactly. Every example appears exactly once per epoch across all ranks, and every
    rank gets the same number of batches; a last step too small to give each rank one example joins the
    step before it, whose batches then hold up to batch_size + 1 examples.
    """
    lengths = np.asarray(lengths)
    n, step_size = len(lengths), batch_size * world_size
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if n < world_size:
        raise DataError(f"{n} training examples cannot be shared among {world_size} processes")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    chunk = chunk_batches * step_size

    def by_length(idx: np.ndarray) -> np.ndarray:  # longest first
        return idx[np.argsort(-lengths[idx], kind="stable")]

    order = np.concatenate([by_length(c) for c in np.split(order, range(chunk, n, chunk))])
    steps = [order[start : start + step_size] for start in range(0, n, step_size)]
    if len(steps) > 1 and len(steps[-1]) < world_size:
        steps[-2:] = [by_length(np.concatenate(steps[-2:]))]
    steps = [steps[i] for i in rng.permutation(len(steps))]
    return [np.array_split(step, world_size)[rank].tolist() for step in steps[skip:]]


def eval_batches(lengths: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Evaluation batches: no shuffling, sorted by length (longest first, so memory runs out at once if
    it will) to waste little padding; in DDP, rank r takes every world_size-th batch. Put the outputs
    back in example order with in_original_order."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    return batches[rank::world_size]


def in_original_order(batches: Sequence[Sequence[int]], outputs: Iterable[Sequence]) -> list:
    """Per-example outputs of `batches` (one sequence per batch) in ascending example index: the
    original order when the batches cover every example."""
    indices = [i for batch in batches for i in batch]
    flat = [output for batch_outputs in outputs for output in batch_outputs]
    if len(flat) != len(indices):
        raise ValueError(f"{len(flat)} outputs for {len(indices)} examples")
    return [flat[k] for k in np.argsort(indices, kind="stable")]


def collate(features: Sequence[Features], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example. Returns (B = batch, T = longest length):

    input_ids (B, T) long, pad_token_id after the end; attention_mask (B, T) long, 1 on real tokens;
    token_type_ids (B, T) long; labels, when the features have them: (B,) long class ids, (B,) float
    regression targets, (B, num_labels) float multi-hot, or (B, T) long tag ids padded with IGNORE_INDEX.
    """
    batch_size, width = len(features), max(len(f) for f in features)
    input_ids = np.full((batch_size, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch_size, width), dtype=np.int64)
    token_type_ids = np.zeros((batch_size, width), dtype=np.int64)
    for row, f in enumerate(features):
        input_ids[row, : len(f)] = f.input_ids
        attention_mask[row, : len(f)] = 1
        token_type_ids[row, : len(f)] = f.token_type_ids
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
    }
    labels = [f.label for f in features]
    if all(label is None for label in labels):
        return batch
    if any(label is None for label in labels):
        raise ValueError("a batch mixes labelled and unlabelled features")
    first = labels[0]
    if isinstance(first, np.ndarray) and first.dtype.kind == "f":  # multilabel multi-hot
        batch["labels"] = torch.from_numpy(np.stack(labels))
    elif isinstance(first, np.ndarray):  # token tags
        tags = np.full((batch_size, width), IGNORE_INDEX, dtype=np.int64)
        for row, label in enumerate(labels):
            tags[row, : len(label)] = label
        batch["labels"] = torch.from_numpy(tags)
    elif isinstance(first, float):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch
