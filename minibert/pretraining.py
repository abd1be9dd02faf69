"""Pretraining as a library: each step train_pretrain.py runs, callable from Python.

    shards = prepare_shards(None, tokenizer=None, vocab_size=8192, seq_len=128)    # None: the built-in corpus
    train_split, heldout = PretrainingDataset(shards, "train"), PretrainingDataset(shards, "heldout")
    collate = MaskingCollator.for_dataset(train_split, mask_prob=0.15, seed=0)
    model = build_model(train_split.vocab_size, preset="mini", seq_len=128)
    trainer = Trainer(model, TrainingSettings(lr=5e-4, adam_eps=1e-6), 2000, "runs/pretrain")
    metrics = train(trainer, TrainState(), train_split, collate, batch_size=64, heldout=heldout)

The data side (corpus reading, tokenizer training, shards, masking) is in minibert.pretraining_data;
this module puts it together with the model and the Trainer.

Reproducible on a CPU: the same command gives the same tokenizer, shards and weights from the first run on.
The tokenizer files are byte-identical in every process and on every machine (minibert.wordpiece, because
tokenizers' trainer is not: huggingface/tokenizers#1794); the rest holds given the same versions of minibert,
torch and tokenizers and the same number of torch threads. Not promised: bitwise-equal GPU runs, or runs with
another number of DDP processes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from minibert.assets import cache_dir
from minibert.config import IGNORE_INDEX, PRESETS, BertConfig
from minibert.model import BertForPreTraining
from minibert.pretraining_data.corpus import BUILTIN_CORPUS_ID, builtin_corpus_documents, corpus_fingerprint, read_documents
from minibert.pretraining_data.dataset import PretrainingDataset, batches, num_batches
from minibert.pretraining_data.masking import MaskingCollator
from minibert.pretraining_data.shards import build_pretraining_shards
from minibert.progress import Progress
from minibert.tokenizer_training import load_or_train_tokenizer
from minibert.training import Distributed, Throughput, Trainer, TrainState

logger = logging.getLogger("minibert")

# Dense bf16 peak of the GPUs people pretrain on, for model FLOPs utilisation (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


# ----------------------------------------------------------------------------- data


def prepare_shards(
    data: Sequence[str] | None,
    *,
    tokenizer=None,
    vocab_size: int = 8192,
    text_column: str | None = None,
    text_field: str = "text",
    seq_len: int = 128,
    nsp: bool = True,
    short_seq_prob: float = 0.1,
    heldout_fraction: float = 0.01,
    seed: int = 0,
    segmenter: str = "none",
    dist: Distributed | None = None,
) -> Path:
    """The corpus (files or folders in `data`; None or empty: the built-in corpus) preprocessed into shards
    for `tokenizer` (None: a WordPiece tokenizer of vocab_size trained on the corpus, cached), built once
    in the cache directory (segmenter "jieba": Chinese words for whole-word masking, minibert.segmentation).
    Under DDP rank 0 builds them; the others wait and then read the cache."""
    dist = dist or Distributed()
    if data:
        corpus_id = corpus_fingerprint(data, text_column=text_column, text_field=text_field)
        documents = lambda: read_documents(data, text_column=text_column, text_field=text_field)  # noqa: E731
    else:
        corpus_id = BUILTIN_CORPUS_ID
        documents = builtin_corpus_documents
    settings = dict(seq_len=seq_len, nsp=nsp, short_seq_prob=short_seq_prob, heldout_fraction=heldout_fraction,
                    seed=seed, corpus_id=corpus_id, segmenter=segmenter)
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(documents(), vocab_size, cache_dir() / "tokenizers", corpus_id=corpus_id)
    out = cache_dir() / "pretraining"
    if dist.is_main:
        shards = build_pretraining_shards(documents(), tokenizer, out, **settings)
    dist.barrier()
    if not dist.is_main:
        shards = build_pretraining_shards(documents(), tokenizer, out, **settings)  # a cache hit now
    return shards


# ----------------------------------------------------------------------------- the model


def build_model(
    vocab_size: int,
    *,
    preset: str = "mini",
    init: str | None = None,
    sizes: dict[str, int] | None = None,
    seq_len: int = 128,
    attn_impl: str | None = None,
    dropout: float | None = None,
    tokenizer_name: str | None = None,
    config_overrides: dict | None = None,
    verbose: bool = True,
) -> BertForPreTraining:
    """A fresh BERT of `preset` (sizes: BertConfig fields that override it), or `init` for continued
    pretraining (its MLM/NSP heads are created where it lacks them), whose embeddings must hold the
    tokenizer's vocab_size (tokenizer_name: where that tokenizer came from, None for init's own).
    config_overrides: BertConfig fields to set (--config), over every other setting."""
    if init:
        model = BertForPreTraining.from_pretrained(init, verbose=verbose, **model_config_overrides(
            init=init, attn_impl=attn_impl, dropout=dropout, config_overrides=config_overrides))
        check_vocab_fits(vocab_size, model.config.vocab_size, init, tokenizer_name)
        return model
    config = fresh_config(vocab_size, preset=preset, sizes=sizes, seq_len=seq_len, attn_impl=attn_impl,
                          dropout=dropout, config_overrides=config_overrides)
    if config.vocab_size < vocab_size or config.max_position_embeddings < seq_len:
        raise ValueError(f"--config sets vocab_size {config.vocab_size} and max_position_embeddings "
                         f"{config.max_position_embeddings}, but the tokenizer has {vocab_size} tokens and --seq-len is "
                         f"{seq_len}: the model needs at least as many")
    return BertForPreTraining(config)


def model_config_overrides(*, init: str | None, attn_impl: str | None, dropout: float | None,
                           config_overrides: dict | None) -> dict:
    """The BertConfig fields the flags set, --config's last."""
    overrides = {"attn_impl": attn_impl} if attn_impl else {}
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if init:
        # A classifier's labels mean nothing to a pretraining model (transformers' default is 2 unnamed labels).
        overrides.update(id2label=None, num_labels=2, problem_type=None)
    return {**overrides, **(config_overrides or {})}


def fresh_config(vocab_size: int, *, preset: str = "mini", sizes: dict[str, int] | None = None, seq_len: int = 128,
                 attn_impl: str | None = None, dropout: float | None = None,
                 config_overrides: dict | None = None) -> BertConfig:
    """A new model's config: the preset, resized by `sizes`, with room for seq_len positions."""
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = model_config_overrides(init=None, attn_impl=attn_impl, dropout=dropout, config_overrides=config_overrides)
    return BertConfig.preset(preset, **{"vocab_size": vocab_size, "max_position_embeddings": max(512, seq_len),
                                        **(sizes or {}), **overrides})


def check_vocab_fits(tokenizer_size: int, model_size: int, init: str, tokenizer_name: str | None = None) -> None:
    """A tokenizer of more tokens than --init has embeddings (tokenizer_name: --tokenizer, None for init's own)."""
    if tokenizer_size > model_size:
        fix = ("use the checkpoint's own tokenizer (drop --tokenizer)" if tokenizer_name else
               "the checkpoint's own tokenizer does not fit its weights: fix its tokenizer files, or pass --tokenizer")
        raise ValueError(f"the tokenizer has {tokenizer_size} tokens but --init {init} only {model_size} word "
                         f"embeddings: {fix}")


def flops_per_token(config: BertConfig, seq_len: int, mask_prob: float = 0.15) -> float:
    """Training FLOPs per token: 6 per weight a token passes (forward 2, backward 4) plus attention's two
    T x T matmuls (12 * layers * hidden * T), as in the PaLM paper's MFU accounting. The encoder runs on
    every token, the pooler and NSP head once per sequence, the MLM head (transform and decoder) only on
    the masked share. Embedding lookups are not matmuls."""
    C, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * C * C + 2 * C * config.intermediate_size
    weights = L * per_layer + (C * C + 2 * C) / seq_len + mask_prob * (C * C + V * C)
    return 6 * weights + 12 * L * C * seq_len


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, devices: int) -> float:
    """The share of the hardware's peak that the model's FLOPs use: each device's tokens per second (all
    processes' tokens divided among them) against one device's peak."""
    return tokens_per_s / devices * flops_per_token / peak_flops_per_device


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------- training and evaluation


def pretraining_accuracies(out, batch) -> dict:
    """Share of masked positions predicted right (mlm_logits holds them in (batch, position) order), and of
    sentence pairs whose next-sentence label is right (NSP batches only)."""
    labels = batch["labels"].to(out.mlm_logits.device)
    targets = labels[labels != IGNORE_INDEX]
    acc = {"mlm_accuracy": (out.mlm_logits.max(-1).indices == targets).float().mean().item() if len(targets) else 0.0}
    if out.nsp_loss is not None:
        acc["nsp_accuracy"] = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"].to(out.nsp_logits.device)).float().mean().item()
    return acc


def trim(batch: dict) -> dict:
    """Drop the columns that are padding in every row (shards store rows padded to seq_len)."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(trainer: Trainer, heldout: PretrainingDataset, collate: MaskingCollator, *, batch_size: int,
             seed: int, max_batches: int = 0) -> dict:
    """On the held-out split (fixed masks), over its first max_batches batches (0: all of it): the loss
    (MLM plus NSP, as in training), MLM loss, perplexity and accuracy, NSP loss and accuracy."""
    model = trainer.model.eval()
    sums = {"mlm_loss": 0.0, "mlm_correct": 0.0, "masked": 0, "nsp_loss": 0.0, "nsp_correct": 0.0, "pairs": 0}
    collate.epoch = 0  # the same masks at every evaluation, so the numbers compare across steps
    for i, indices in enumerate(batches(len(heldout), batch_size, seed=seed, epoch=0, shuffle=False, drop_last=False)):
        if max_batches and i >= max_batches:
            break
        batch = trainer.to_device(trim(collate(heldout.batch(indices))))
        with trainer.autocast():
            out = model(**batch)
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        sums["mlm_loss"] += out.mlm_loss.item() * n
        sums["mlm_correct"] += pretraining_accuracies(out, batch)["mlm_accuracy"] * n
        sums["masked"] += n
        if out.nsp_loss is not None:
            sums["nsp_loss"] += out.nsp_loss.item() * len(indices)
            sums["nsp_correct"] += (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
            sums["pairs"] += len(indices)
    mlm_loss = sums["mlm_loss"] / max(1, sums["masked"])
    nsp_loss = sums["nsp_loss"] / max(1, sums["pairs"])
    metrics = {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "perplexity": math.exp(min(mlm_loss, 50)),
               "mlm_accuracy": sums["mlm_correct"] / max(1, sums["masked"])}
    if sums["pairs"]:
        metrics.update(nsp_loss=nsp_loss, nsp_accuracy=sums["nsp_correct"] / sums["pairs"])
    return metrics


def train(
    trainer: Trainer,
    state: TrainState,
    train_split: PretrainingDataset,
    collate: MaskingCollator,
    *,
    batch_size: int,
    heldout: PretrainingDataset | None = None,
    eval_steps: int = 250,
    eval_batches: int = 20,
    save_steps: int = 500,
    seed: int = 0,
    tokenizer=None,
    run_config: dict | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict:
    """Pretrain trainer.model from `state` to trainer.total_steps, global batches of batch_size rows split
    over the processes and trainer.settings.grad_accum micro-batches. Evaluates on `heldout` every
    eval_steps and at the end (rank 0), writes a resumable checkpoint every save_steps. Returns the last
    held-out metrics; stop_after_steps simulates a kill: {"stopped_at": step}."""
    dist, total_steps, grad_accum = trainer.dist, trainer.total_steps, trainer.settings.grad_accum
    micro_batch = batch_size // (dist.world_size * grad_accum)
    steps_per_epoch = num_batches(len(train_split), batch_size)
    flops = flops_per_token(trainer.model.config, train_split.seq_len, collate.mask_prob)
    peak = peak_flops(dist.device)
    speed = Throughput()  # tokens per second of the last steps
    metrics = {}
    with Progress(total_steps, initial=state.step, desc="pretraining", enabled=dist.is_main and progress) as shown:
        while state.step < total_steps:
            collate.epoch = state.epoch
            for indices in batches(len(train_split), batch_size, seed=seed, epoch=state.epoch, rank=dist.rank,
                                   world_size=dist.world_size, start_step=state.batch_in_epoch):
                collate.epoch = state.epoch
                step_start = time.perf_counter()
                micro = [trim(collate(train_split.batch(indices[i : i + micro_batch])))
                         for i in range(0, len(indices), micro_batch)]
                result = trainer.step(micro, metrics_fn=pretraining_accuracies)
                step_seconds = time.perf_counter() - step_start
                state.step += 1
                state.batch_in_epoch += 1
                tokens = dist.all_reduce_mean(float(sum(int(b["attention_mask"].sum()) for b in micro))) * dist.world_size
                tokens_per_s = speed.update(tokens, step_seconds)  # all processes together
                figures = {"loss": f"{result['loss']:.3f}", "mlm_acc": f"{result['mlm_accuracy']:.3f}",
                           "tok_s": f"{tokens_per_s:.0f}"}
                if peak:
                    figures["mfu"] = f"{model_flops_utilization(tokens_per_s, flops, peak, dist.world_size):.1%}"
                shown.update(**figures)
                trainer.log_metrics({"split": "train", "step": state.step,
                                     **{k: v for k, v in result.items() if v is not None}, "tokens_per_s": tokens_per_s})
                if state.batch_in_epoch >= steps_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if (eval_steps and state.step % eval_steps == 0) or state.step == total_steps:
                    if dist.is_main and heldout is not None and len(heldout):
                        metrics = evaluate(trainer, heldout, collate, batch_size=micro_batch * grad_accum, seed=seed,
                                           max_batches=eval_batches)
                        trainer.log_metrics({"split": "eval", "step": state.step, **metrics})
                        logger.info("minibert: step %d: %s", state.step,
                                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                        collate.epoch = state.epoch
                    dist.barrier()
                if save_steps and state.step % save_steps == 0 and state.step < total_steps:
                    trainer.save_checkpoint(state, tokenizer=tokenizer, run_config=run_config)
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    return {"stopped_at": state.step}
                if state.step >= total_steps:
                    break
    return metrics
