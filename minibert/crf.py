"""BERT with a linear-chain CRF over its tag scores (Lample et al. 2016, "Neural Architectures for Named
Entity Recognition"; BERT-CRF in Souza et al. 2019).

The token classifier's logits are a CRF's emission scores; the CRF adds a learned score for every
pair of consecutive tags and for the first and last tag, and is trained on the log-likelihood of the
whole gold tag sequence, so that what the model learns about tag order (I-PER follows B-PER) is a
weight of its own. The sequence is each word's first piece, the positions the plain classifier is
trained on (labels other than -100); the other pieces take no part.

The CRF itself is pytorch-crf's (`torchcrf.CRF`: the forward algorithm and its weights);
decoding uses minibert.tagging.viterbi with these weights, so that the scheme's forbidden
transitions apply as they do without a CRF.

Saved as a plain token classifier (config.json, model.safetensors: what transformers'
AutoModelForTokenClassification loads, without the CRF) plus crf.safetensors beside it, holding the
CRF's transitions (L, L), start_transitions (L,) and end_transitions (L,).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torchcrf import CRF

from minibert.atomic_write import atomic_write
from minibert.config import IGNORE_INDEX, BertConfig
from minibert.hub import resolve_model_dir
from minibert.model import BertForTokenClassification, ClassifierOutput
from minibert.tagging import CRFWeights

logger = logging.getLogger("minibert")

CRF_FILE = "crf.safetensors"
# The CRF's few weights start near zero and must grow to several units to matter; at BERT's fine-tuning
# learning rate (5e-5) they would barely move in a few thousand steps, so they learn 100 times faster,
# as BERT-CRF implementations commonly set (e.g. a separate crf_learning_rate of 5e-3).
CRF_LR_SCALE = 100.0


def first_pieces(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The tagged positions of each row moved to its front, in order, for the CRF.

    logits (B, T, L) and labels (B, T), -100 where there is no tag -> emissions (B', W, L),
    tags (B', W) and mask (B', W) bool, W = the most tagged positions in a row; rows without any
    tag (B - B' of them) are left out. Masked tags are 0, a valid index for pytorch-crf.
    """
    tagged = labels != IGNORE_INDEX
    keep = tagged.any(dim=1)
    logits, labels, tagged = logits[keep], labels[keep], tagged[keep]
    width = int(tagged.sum(dim=1).max()) if len(tagged) else 0
    order = torch.argsort((~tagged).to(torch.int8), dim=1, stable=True)[:, :width]  # tagged positions first
    emissions = logits.gather(1, order[..., None].expand(-1, -1, logits.shape[-1]))
    mask = tagged.gather(1, order)
    tags = labels.gather(1, order).masked_fill(~mask, 0)
    return emissions, tags, mask


class BertCRFForTokenClassification(BertForTokenClassification):
    """BertForTokenClassification whose loss is a linear-chain CRF's negative log-likelihood."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.crf = CRF(config.num_labels, batch_first=True)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        logits = super().forward(input_ids, attention_mask, token_type_ids).logits  # (B, T, L)
        loss = None
        if labels is not None:
            emissions, tags, mask = first_pieces(logits.float(), labels)
            if len(emissions):
                # Per tag, like the cross-entropy it replaces, so the learning rate means the same.
                loss = -self.crf(emissions, tags, mask, reduction="token_mean")
            else:  # no tagged word in this batch: a zero that still reaches every weight (for DDP)
                loss = logits.sum() * 0.0
        return ClassifierOutput(loss, logits)

    def crf_weights(self) -> CRFWeights:
        """The CRF's scores for decoding (minibert.tagging.decode_tags)."""
        as_numpy = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
        return CRFWeights(as_numpy(self.crf.transitions), as_numpy(self.crf.start_transitions),
                          as_numpy(self.crf.end_transitions))

    def parameter_groups(self, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
        crf = set(self.crf.parameters())
        groups = []
        for group in super().parameter_groups(weight_decay, layer_lr_decay):
            group["params"] = [p for p in group["params"] if p not in crf]
            if group["params"]:
                groups.append(group)
        # No weight decay: a transition score is not a weight whose size should be kept small.
        return [*groups, {"params": list(self.crf.parameters()), "weight_decay": 0.0, "lr_scale": CRF_LR_SCALE}]

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """The plain token classifier transformers loads, and crf.safetensors beside it."""
        super().save_pretrained(directory, tokenizer=tokenizer)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.crf.state_dict().items()}
        atomic_write(Path(directory) / CRF_FILE, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, reinit_head: bool = False, verbose: bool = True, **config_overrides):
        """Any BERT checkpoint, as BertForTokenClassification loads it; the CRF from its crf.safetensors,
        or new (a checkpoint without a CRF, or reinit_head=True)."""
        model = super().from_pretrained(name_or_path, reinit_head=reinit_head, verbose=verbose, **config_overrides)
        path = resolve_model_dir(name_or_path) / CRF_FILE
        if not path.is_file() or reinit_head:
            model.new_keys = sorted([*model.new_keys, *(f"crf.{k}" for k in model.crf.state_dict())])
            if verbose:
                logger.info("minibert: a new CRF over the %d tags (%s has none)", model.config.num_labels,
                            "--reinit-head" if path.is_file() else name_or_path)
            return model
        weights = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in model.crf.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in weights.items()}
        if found != expected:
            raise ValueError(
                f"{path} holds {found} but a CRF over {model.config.num_labels} tags needs {expected}: it belongs "
                f"to another model; delete it (or pass --reinit-head) to train a new CRF"
            )
        model.crf.load_state_dict(weights)
        return model
