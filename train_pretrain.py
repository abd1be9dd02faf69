"""Pretrain BERT from raw text: masked language modelling + next-sentence prediction.

    # The built-in corpus (2017 news articles + Shakespeare, ~3 M words, offline), a BERT-Mini, ~17 min on 2 CPU cores
    python train_pretrain.py --preset mini --seq-len 64 --batch-size 32 --max-steps 2800 --output-dir runs/pretrain-mini
    # A quick check that everything works (under a minute on a laptop CPU)
    python train_pretrain.py --preset tiny --max-steps 20 --batch-size 16 --output-dir runs/quick-pretrain
    # Your corpus: text files or folders (one sentence or paragraph per line, a blank line between
    # documents), JSON Lines with a text field, or CSV with --text-column
    python train_pretrain.py --data corpus/ more.txt --vocab-size 30522 --preset small
    # Reuse a tokenizer instead of training one; RoBERTa-style full sentences without NSP; whole-word masking
    python train_pretrain.py --data corpus/ --tokenizer bert-base-uncased --no-nsp --whole-word-mask
    # Continued pretraining of a released BERT (heads it lacks are created)
    python train_pretrain.py --init bert-base-uncased --data domain_corpus/ --lr 5e-5
    # Several GPUs (or CPU processes, over gloo): the same command under torchrun
    torchrun --nproc_per_node 8 train_pretrain.py --preset base --batch-size 256 --precision bf16
    # Another architecture: any BertConfig field
    python train_pretrain.py --preset tiny --config hidden_act=silu --config intermediate_size=1024
    # A killed (or Ctrl-C'd) run continues exactly: model, optimizer, schedule, RNG and data position
    # (the same command as before does too)
    python train_pretrain.py --output-dir runs/pretrain-mini --resume

Then fine-tune it: python train_finetune.py --init runs/pretrain-mini

The corpus is preprocessed once into memory-mapped token shards under the cache directory
($MINIBERT_CACHE, else ~/.cache/minibert); a second run with the same data and tokenizer starts at once.
Writes to --output-dir: an HF BertForPreTraining directory (config.json, model.safetensors with bert.*
and cls.* keys, tokenizer files), metrics.jsonl, training_curves.png, pretrain_config.json, and
checkpoint/ every --save-steps (for --resume).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minibert import pretraining as PT
from minibert.assets import cache_dir
from minibert.config import BertConfig
from minibert.curves import plot_curves
from minibert.cli import check_counts, config_overrides, parse_settings, run_cli, setup_logging
from minibert.hub import resolve_model_dir
from minibert.pretraining_data.corpus import CorpusError, CorpusNotFoundError
from minibert.pretraining_data.dataset import PretrainingDataset, unigram_log_probs
from minibert.pretraining_data.masking import MaskingCollator
from minibert.runs import find_checkpoint, hold_output_dir, resolve_resume
from minibert.segmentation import SEGMENTERS
from minibert.tokenizer import REQUIRED_SPECIAL_TOKENS, check_special_tokens, load_tokenizer
from minibert.training import (
    Distributed,
    Trainer,
    TrainingSettings,
    TrainState,
    check_attention_backend,
    resolve_precision,
    seed_everything,
    setup_distributed,
    start_training,
)

logger = logging.getLogger("minibert")


@dataclass
class PretrainConfig:
    # --- data ---
    data: list[str] = field(default_factory=list)  # files or folders; empty = the built-in corpus
    text_column: str | None = None  # the text column of CSV/TSV files
    text_field: str = "text"  # the text field of JSON Lines
    tokenizer: str | None = None  # reuse a tokenizer (hub id or directory); None trains WordPiece on the corpus
    vocab_size: int = 8192  # of a trained tokenizer; 30522 is BERT's, smaller trains faster on small corpora
    seq_len: int = 128  # tokens per example, [CLS]/[SEP] included (BERT's phase 1)
    nsp: bool = True  # sentence pairs with next-sentence prediction (BERT); --no-nsp packs full sentences (RoBERTa)
    short_seq_prob: float = 0.1  # share of shorter examples, so the model also sees short inputs
    heldout_fraction: float = 0.01  # documents held out for evaluation
    mask_prob: float = 0.15  # share of tokens to predict; of them 80% [MASK], 10% random, 10% unchanged
    whole_word_mask: bool = False  # mask all pieces of a word together (on Chinese text: the characters of a --segmenter word)
    # With --whole-word-mask, how Chinese text (single-character tokens) is cut into words, once, when the shards
    # are built: jieba (pip install jieba), as Chinese-BERT-wwm does, or none (each character its own word)
    segmenter: str = "jieba"
    # --- model ---
    preset: str = "mini"  # tiny | mini | small | medium | base | large
    init: str | None = None  # continue pretraining a checkpoint (hub id or directory) instead of a fresh model
    num_layers: int | None = None  # explicit sizes override the preset
    hidden_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    attn_impl: str | None = None  # eager | sdpa | triton (None: sdpa)
    dropout: float | None = None  # hidden and attention dropout; None keeps BERT's 0.1 (or the checkpoint's)
    # BertConfig fields to set on the model, fresh or loaded, one FIELD=VALUE per --config (--config
    # hidden_act=silu --config num_hidden_layers=4): over every other flag, checked by BertConfig, saved with the run.
    config: list[str] = field(default_factory=list, metadata={"repeat": True, "metavar": "FIELD=VALUE"})
    # A fresh model's MLM output bias starts at the corpus's log token frequencies, so training starts at
    # the unigram loss instead of spending its first few hundred steps learning how common each word is
    # (Karpathy's "init well"); --no-unigram-bias-init keeps BERT's zeros. Not applied with --init.
    unigram_bias_init: bool = True
    # --- optimisation ---
    max_steps: int = 2000
    batch_size: int = 64  # global: across processes and accumulation steps
    grad_accum: int = 1
    lr: float = 5e-4  # small BERTs take a larger rate than bert-base's 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    # --- running ---
    output_dir: str = "runs/pretrain"
    eval_steps: int = 250  # evaluate on the held-out split every N steps (and at the end)
    eval_batches: int = 20  # batches of the held-out split per evaluation (0 = all)
    save_steps: int = 500  # write a resumable checkpoint every N steps
    precision: str = "auto"  # fp32 | bf16 | fp16; auto = bf16 on a GPU that supports it, fp32 on CPU
    compile: bool = False
    device: str | None = None
    resume: bool = False  # continue the run in --output-dir from its checkpoint, with the settings it was started with
    progress: bool = True



def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    return parse_settings(PretrainConfig, argv, __doc__)


# ----------------------------------------------------------------------------- the steps of main()
#
# Each step reads the settings it needs from the PretrainConfig and calls minibert.pretraining (or
# minibert.pretraining_data), where the work is done and where Python users find it.


def check_settings(cfg: PretrainConfig, dist: Distributed) -> None:
    """Settings that cannot work, found before the corpus is read (which can take minutes)."""
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                         f"({dist.world_size} x {cfg.grad_accum})")
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ValueError(f"--mask-prob must be between 0 and 1 (BERT's is 0.15), got {cfg.mask_prob}")
    if cfg.segmenter not in SEGMENTERS:
        raise ValueError(f"--segmenter {cfg.segmenter!r} is unknown; choose one of {', '.join(SEGMENTERS)}")
    if not 0.0 <= cfg.short_seq_prob <= 1.0 or not 0.0 <= cfg.heldout_fraction < 1.0:
        raise ValueError(f"--short-seq-prob must be in [0, 1] and --heldout-fraction in [0, 1), got "
                         f"{cfg.short_seq_prob} and {cfg.heldout_fraction}")
    if cfg.init:
        overrides = PT.model_config_overrides(init=cfg.init, attn_impl=cfg.attn_impl, dropout=cfg.dropout,
                                              config_overrides=config_overrides(cfg.config))
        init_config = BertConfig.from_json_file(resolve_model_dir(cfg.init) / "config.json", **overrides)
        positions = init_config.max_position_embeddings
        if cfg.seq_len > positions:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the {positions} positions of --init {cfg.init}: "
                             f"use --seq-len {positions} or less")
    else:  # the new model's config, less the tokenizer's size, so that BertConfig checks --config now
        PT.fresh_config(cfg.vocab_size, preset=cfg.preset, sizes=model_sizes(cfg), seq_len=cfg.seq_len,
                        attn_impl=cfg.attn_impl, dropout=cfg.dropout, config_overrides=config_overrides(cfg.config))
    if (cfg.init or cfg.tokenizer) and "vocab_size" in getattr(cfg, "given_flags", ()):
        logger.warning("minibert: --vocab-size is ignored: it sizes a tokenizer trained here, and "
                       "--init/--tokenizer brings its own")


def load_run_tokenizer(cfg: PretrainConfig):
    """The tokenizer to pretrain with: a resumed run's own, --tokenizer's or --init's, checked; None to
    train one on the corpus."""
    if cfg.resume:  # the run's own tokenizer: a retrained one could number the words differently
        checkpoint = find_checkpoint(cfg.output_dir)
        try:
            tokenizer = load_tokenizer(checkpoint)
        except (OSError, ValueError) as e:  # damaged outside minibert: its own saves are atomic
            raise ValueError(f"cannot read the checkpoint {checkpoint} ({e}): delete {checkpoint} and start again "
                             "without --resume") from None
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.init) if (cfg.tokenizer or cfg.init) else None
    if tokenizer is not None:
        check_special_tokens(tokenizer, cfg.tokenizer or cfg.init, needed=(*REQUIRED_SPECIAL_TOKENS, "[MASK]"))
        if cfg.init and not cfg.resume:  # before the corpus is tokenized, which can take minutes
            PT.check_vocab_fits(tokenizer.get_vocab_size(with_added_tokens=True),
                                BertConfig.from_json_file(resolve_model_dir(cfg.init) / "config.json").vocab_size,
                                cfg.init, cfg.tokenizer)
    return tokenizer


def load_data(cfg: PretrainConfig, tokenizer, dist: Distributed) -> tuple[PretrainingDataset, PretrainingDataset]:
    """The (train, held-out) splits of the preprocessed corpus."""
    try:
        shards = PT.prepare_shards(cfg.data, tokenizer=tokenizer, vocab_size=cfg.vocab_size, text_column=cfg.text_column,
                                   text_field=cfg.text_field, seq_len=cfg.seq_len, nsp=cfg.nsp,
                                   short_seq_prob=cfg.short_seq_prob, heldout_fraction=cfg.heldout_fraction,
                                   seed=cfg.seed, segmenter=cfg.segmenter if cfg.whole_word_mask else "none", dist=dist)
        train, heldout = PretrainingDataset(shards, "train"), PretrainingDataset(shards, "heldout")
    except (CorpusError, CorpusNotFoundError):
        raise
    except (OSError, ValueError, KeyError) as e:  # the settings are checked above: the cache was damaged outside minibert
        raise CorpusError(f"the preprocessed corpus under {cache_dir() / 'pretraining'} is damaged ({e}): "
                          "delete that folder and run again, it is rebuilt from the corpus") from None
    if len(train) < cfg.batch_size:
        raise ValueError(f"the corpus gives {len(train)} training examples, fewer than --batch-size {cfg.batch_size}: "
                         "use more text or a smaller batch")
    return train, heldout


def model_sizes(cfg: PretrainConfig) -> dict[str, int]:
    """The sizes given as flags, over the preset's."""
    sizes = {"num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
    return {k: v for k, v in sizes.items() if v is not None}


def build_model(cfg: PretrainConfig, train: PretrainingDataset):
    model = PT.build_model(train.vocab_size, preset=cfg.preset, init=cfg.init, sizes=model_sizes(cfg),
                           seq_len=cfg.seq_len, attn_impl=cfg.attn_impl, dropout=cfg.dropout,
                           tokenizer_name=cfg.tokenizer, config_overrides=config_overrides(cfg.config),
                           verbose=not cfg.resume)
    if cfg.unigram_bias_init and not cfg.init and not cfg.resume:
        with torch.no_grad():
            model.mlm_head.bias.copy_(unigram_log_probs(train))
    if not cfg.nsp:  # the NSP head (and the pooler, which only it reads) get no loss: keep them out of training
        model.nsp_head.requires_grad_(False)
        model.bert.pooler.requires_grad_(False)
    return model


def start_run(cfg: PretrainConfig, model, train: PretrainingDataset, heldout: PretrainingDataset,
              dist: Distributed) -> tuple[Trainer, TrainState, dict]:
    """The Trainer, the state to start from (a checkpoint's when resuming), and the run's settings, saved."""
    precision = resolve_precision(cfg.precision, dist.device)
    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, precision=precision,
                                compile=cfg.compile, adam_eps=1e-6)
    trainer, state, run_config = start_training(
        cfg, model, settings, cfg.max_steps, dist, record_file="pretrain_config.json",
        resolved={"shards": str(train.shard_dir), "train_examples": len(train), "heldout_examples": len(heldout)})
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("minibert: pretraining %.1fM parameters on %d examples of %d tokens (%d held out), %d steps of %d",
                    n_params / 1e6, len(train), cfg.seq_len, len(heldout), cfg.max_steps, cfg.batch_size)
    return trainer, state, run_config


def write_results(cfg: PretrainConfig, trainer: Trainer, tokenizer) -> None:
    """The model and its training curves; the resumable state, no longer needed, is removed."""
    out_dir = Path(cfg.output_dir)
    if trainer.dist.is_main:
        trainer.model.save_pretrained(out_dir, tokenizer=tokenizer)
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", eval_metrics=("mlm_accuracy", "nsp_accuracy"))
        trainer.remove_checkpoints()
        logger.info("minibert: model in %s; fine-tune it with: python train_finetune.py --init %s", out_dir, out_dir)
    trainer.dist.barrier()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, _stop_after_steps: int | None = None) -> dict:
    """Run pretraining; returns the last held-out metrics. _stop_after_steps simulates a kill (for tests)."""
    cfg = parse_args(argv) if argv is None or isinstance(argv, list) else argv
    setup_logging()
    check_counts(cfg, at_least_one=("max_steps", "batch_size", "grad_accum", "seq_len"),
                 at_least_zero=("eval_steps", "eval_batches", "save_steps"))
    dist = setup_distributed(cfg.device)
    with hold_output_dir(cfg.output_dir, dist):  # the only live run there, from here to the end
        resolve_resume(cfg)  # may set cfg.resume: the same command continues a killed run
        check_attention_backend(cfg.attn_impl, dist.device)
        seed_everything(cfg.seed, dist.rank)
        check_settings(cfg, dist)

        tokenizer = load_run_tokenizer(cfg)
        train, heldout = load_data(cfg, tokenizer, dist)
        tokenizer = train.tokenizer  # the shards' copy: the one trained on the corpus when none was given
        collate = MaskingCollator.for_dataset(train, mask_prob=cfg.mask_prob, whole_word_mask=cfg.whole_word_mask,
                                              seed=cfg.seed)
        model = build_model(cfg, train)
        trainer, state, run_config = start_run(cfg, model, train, heldout, dist)
        metrics = PT.train(trainer, state, train, collate, batch_size=cfg.batch_size, heldout=heldout,
                           eval_steps=cfg.eval_steps, eval_batches=cfg.eval_batches, save_steps=cfg.save_steps,
                           seed=cfg.seed, tokenizer=tokenizer, run_config=run_config, progress=cfg.progress,
                           stop_after_steps=_stop_after_steps)
        if "stopped_at" in metrics:
            return metrics
        write_results(cfg, trainer, tokenizer)
        return metrics


if __name__ == "__main__":
    run_cli(main, parse_args, "train_pretrain.py")
