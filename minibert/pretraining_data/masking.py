"""BERT's masked-LM corruption at batch time: 80/10/10 masking, whole-word masking, a fresh mask every
epoch from a generator seeded per example, and MaskingCollator, which masks PretrainingDataset rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from minibert.config import IGNORE_INDEX
from minibert.pretraining_data.dataset import PretrainingDataset

def continuation_mask(tokenizer: Tokenizer) -> torch.Tensor:
    """``is_continuation``: (vocab_size,) bool, True for WordPiece continuation pieces (``##ing``),
    which whole-word masking keeps together with the piece before them."""
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", "##")
    mask = torch.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=torch.bool)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        mask[index] = token.startswith(prefix) and len(token) > len(prefix)
    return mask


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that masks example ``index`` in ``epoch``: a fresh mask every epoch (dynamic
    masking), independent of which batch, step or rank the example lands in."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniforms(shape: tuple[int, int], generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """(B, 3, T) float64 uniforms: from one generator, or row b from generator[b]."""
    batch, length = shape
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, 3, length, generator=generator, dtype=torch.float64)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} rows: pass one per row")
    return torch.stack([torch.rand(3, length, generator=g, dtype=torch.float64) for g in generator])


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    mask_prob: float = 0.15,
    generator: torch.Generator | Sequence[torch.Generator],
    whole_word_mask: bool = False,
    is_continuation: torch.Tensor | None = None,
    word_continues: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption. input_ids, attention_mask: (B, T) -> (masked_input_ids, labels),
    both (B, T); labels (int64) hold the original id at chosen positions and IGNORE_INDEX (-100) elsewhere.

    Each real, non-special token is chosen with probability ``mask_prob`` (padding and special
    tokens never are). A chosen token becomes [MASK] 80% of the time, a random non-special token 10%
    and stays unchanged 10%, so the model cannot learn that only [MASK] positions matter.

    ``whole_word_mask``: choose words, not pieces; a word is a piece plus the ``##`` pieces after it
    (``is_continuation``: (vocab_size,) bool, see continuation_mask). Each word is chosen with
    probability mask_prob, so about mask_prob of the tokens are still chosen; 80/10/10 then applies
    per token, as in Google's code. A continuation piece right after a special token (a segment cut
    mid-word) starts its own word. ``word_continues`` (B, T) bool marks more positions that continue a
    word: CJK characters inside a segmented Chinese word (PretrainingDataset of segmented shards), so
    that its characters are masked together while each stays a token (Chinese-BERT-wwm).

    ``generator``: one torch.Generator for the batch, or a sequence of B generators, one per row
    (see example_generator); then each row's mask depends only on its own generator.
    """
    batch, length = input_ids.shape
    u = _uniforms((batch, length), generator)  # (B, 3, T): choose, action, random-token draws
    special = torch.tensor(sorted(set(special_token_ids)), dtype=input_ids.dtype)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)

    if whole_word_mask:
        if is_continuation is None:
            raise ValueError("whole_word_mask needs is_continuation: pass continuation_mask(tokenizer)")
        previous_eligible = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), eligible[:, :-1]], dim=1)
        continues = is_continuation[input_ids]
        if word_continues is not None:
            continues = continues | word_continues
        word_start = eligible & (~continues | ~previous_eligible)
        word = torch.cumsum(word_start.long(), dim=1)  # (B, T): 1-based word number of each token
        chosen_words = torch.zeros(batch, length + 1, dtype=torch.bool)
        # Write each word's draw (taken at its first piece) into its slot; non-starts write False to slot 0.
        chosen_words.scatter_(1, word * word_start, word_start & (u[:, 0] < mask_prob))
        chosen = eligible & chosen_words.gather(1, word)
    else:
        chosen = eligible & (u[:, 0] < mask_prob)

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX)).long()
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    allowed_ids = allowed.nonzero().squeeze(1).to(input_ids.dtype)
    random_ids = allowed_ids[(u[:, 2] * len(allowed_ids)).long().clamp_max(len(allowed_ids) - 1)]
    masked = input_ids.clone()
    masked = torch.where(chosen & (u[:, 1] < 0.8), torch.full_like(input_ids, mask_token_id), masked)
    masked = torch.where(chosen & (u[:, 1] >= 0.8) & (u[:, 1] < 0.9), random_ids, masked)
    return masked, labels


@dataclasses.dataclass
class MaskingCollator:
    """Turns PretrainingDataset rows into an MLM(+NSP) batch; give it to a DataLoader as collate_fn.

    Output: input_ids (masked), attention_mask, token_type_ids, labels: (B, T) int64;
    next_sentence_label (B,) int64 for NSP shards. Each row is masked with
    example_generator(seed, epoch, index): set ``epoch`` before each epoch's iterator is created.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int]
    is_continuation: torch.Tensor | None = None
    mask_prob: float = 0.15
    whole_word_mask: bool = False
    seed: int = 0
    epoch: int = 0

    @classmethod
    def for_dataset(cls, dataset: PretrainingDataset, **settings) -> MaskingCollator:
        """A collator with the dataset's tokenizer facts; ``settings`` sets mask_prob, seed, ..."""
        return cls(
            mask_token_id=dataset.mask_token_id,
            vocab_size=dataset.vocab_size,
            special_token_ids=dataset.special_token_ids,
            is_continuation=continuation_mask(dataset.tokenizer),
            **settings,
        )

    def __call__(self, examples: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not isinstance(examples, dict):  # a list of ds[i] rather than ds.batch(indices)
            examples = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        generators = [example_generator(self.seed, self.epoch, int(i)) for i in examples["index"]]
        input_ids, labels = mask_tokens(
            examples["input_ids"],
            examples["attention_mask"],
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            special_token_ids=self.special_token_ids,
            mask_prob=self.mask_prob,
            generator=generators,
            whole_word_mask=self.whole_word_mask,
            is_continuation=self.is_continuation,
            word_continues=examples.get("word_continues"),
        )
        batch = {k: v for k, v in examples.items() if k not in ("index", "word_continues")}
        return {**batch, "input_ids": input_ids, "labels": labels}
