"""Pretrain BERT from raw text: masked language modelling + next-sentence prediction.

    # The built-in corpus (2017 news articles + Shakespeare, ~3 M words, offline), a BERT-Mini, ~17 min on 2 CPU cores
    python train_pretrain.py --preset mini --seq-len 64 --batch-size 32 --max-steps 2800 --output-dir runs/pretrain-mini
    # A quick check that everything works (under a minute on a laptop CPU)
    python train_pretrain.py --preset tiny --max-steps 20 --batch-size 16 --output-dir runs/quick
    # Your corpus: text files or folders (one sentence or paragraph per line, a blank line between
    # documents), JSON Lines with a text field, or CSV with --text-column
    python train_pretrain.py --data corpus/ more.txt --vocab-size 30522 --preset small
    # Reuse a tokenizer instead of training one; RoBERTa-style full sentences without NSP; whole-word masking
    python train_pretrain.py --data corpus/ --tokenizer bert-base-uncased --no-nsp --whole-word-mask
    # Continued pretraining of a released BERT (heads it lacks are created)
    python train_pretrain.py --init bert-base-uncased --data domain_corpus/ --lr 5e-5
    # Several GPUs (or CPU processes, over gloo): the same command under torchrun
    torchrun --nproc_per_node 8 train_pretrain.py --preset base --batch-size 256 --precision bf16
    # A killed run continues exactly: model, optimizer, schedule, RNG and data position
    python train_pretrain.py --output-dir runs/pretrain-mini --resume

Then fine-tune it: python train_finetune.py --init runs/pretrain-mini

The corpus is preprocessed once into memory-mapped token shards under the cache directory
($MINIBERT_CACHE, else ~/.cache/minibert); a second run with the same data and tokenizer starts at once.
Writes to --output-dir: an HF BertForPreTraining directory (config.json, model.safetensors with bert.*
and cls.* keys, tokenizer files), metrics.jsonl, training_curves.png, pretrain_config.json, and
checkpoint/ every --save-steps (for --resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minibert import pretraining_data as P
from minibert.assets import cache_dir
from minibert.config import PRESETS, BertConfig
from minibert.hub import resolve_model_dir
from minibert.model import BertForPreTraining
from minibert.tokenizer import REQUIRED_SPECIAL_TOKENS, check_special_tokens, load_tokenizer
from minibert.training import (
    Throughput,
    Trainer,
    TrainingSettings,
    TrainState,
    atomic_write_text,
    check_attention_backend,
    check_counts,
    find_checkpoint,
    parse_settings,
    plot_curves,
    remove_earlier_results,
    resolve_precision,
    run_cli,
    seed_everything,
    setup_distributed,
    start_output_dir,
)

logger = logging.getLogger("minibert")

# Dense bf16 peak of the GPUs people pretrain on, for model FLOPs utilisation (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


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
    whole_word_mask: bool = False  # mask all pieces of a word together
    # --- model ---
    preset: str = "mini"  # tiny | mini | small | medium | base | large
    init: str | None = None  # continue pretraining a checkpoint (hub id or directory) instead of a fresh model
    num_layers: int | None = None  # explicit sizes override the preset
    hidden_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    attn_impl: str | None = None  # eager | sdpa | triton (None: sdpa)
    dropout: float | None = None  # hidden and attention dropout; None keeps BERT's 0.1 (or the checkpoint's)
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


# What a finished run leaves in --output-dir besides the model: a new run there removes them first.
RESULT_FILES = ("metrics.jsonl", "training_curves.png")


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    return parse_settings(PretrainConfig, argv, __doc__)


# ----------------------------------------------------------------------------- data and model


def prepare_data(cfg: PretrainConfig, tokenizer, dist) -> Path:
    """Tokenizer-specific shards, built once (by rank 0; the others wait and then read the cache)."""
    if cfg.data:
        corpus_id = P.corpus_fingerprint(cfg.data, text_column=cfg.text_column, text_field=cfg.text_field)
        documents = lambda: P.read_documents(cfg.data, text_column=cfg.text_column, text_field=cfg.text_field)  # noqa: E731
    else:
        corpus_id = P.BUILTIN_CORPUS_ID
        documents = P.builtin_corpus_documents
    settings = dict(seq_len=cfg.seq_len, nsp=cfg.nsp, short_seq_prob=cfg.short_seq_prob,
                    heldout_fraction=cfg.heldout_fraction, seed=cfg.seed, corpus_id=corpus_id)
    if tokenizer is None:
        tokenizer = P.load_or_train_tokenizer(documents(), cfg.vocab_size, cache_dir() / "tokenizers", corpus_id=corpus_id)
    out = cache_dir() / "pretraining"
    if dist.is_main:
        shards = P.build_pretraining_shards(documents(), tokenizer, out, **settings)
    dist.barrier()
    if not dist.is_main:
        shards = P.build_pretraining_shards(documents(), tokenizer, out, **settings)  # a cache hit now
    return shards


def build_model(cfg: PretrainConfig, vocab_size: int) -> BertForPreTraining:
    overrides = {"attn_impl": cfg.attn_impl} if cfg.attn_impl else {}
    if cfg.dropout is not None:
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if cfg.init:
        # A classifier's labels mean nothing to a pretraining model (transformers' default is 2 unnamed labels).
        model = BertForPreTraining.from_pretrained(cfg.init, id2label=None, num_labels=2, problem_type=None,
                                                   verbose=not cfg.resume, **overrides)
        check_vocab_fits(cfg, vocab_size, model.config.vocab_size)
        return model
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    sizes = {"num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if "hidden_size" in sizes:  # keep the preset's proportions unless told otherwise
        sizes.setdefault("num_attention_heads", max(1, sizes["hidden_size"] // 64))
        sizes.setdefault("intermediate_size", 4 * sizes["hidden_size"])
    config = BertConfig.preset(cfg.preset, vocab_size=vocab_size, max_position_embeddings=max(512, cfg.seq_len),
                               **sizes, **overrides)
    return BertForPreTraining(config)


def check_vocab_fits(cfg: PretrainConfig, tokenizer_size: int, model_size: int) -> None:
    if tokenizer_size > model_size:
        fix = ("use the checkpoint's own tokenizer (drop --tokenizer)" if cfg.tokenizer else
               "the checkpoint's own tokenizer does not fit its weights: fix its tokenizer files, or pass --tokenizer")
        raise ValueError(f"the tokenizer has {tokenizer_size} tokens but --init {cfg.init} only {model_size} word "
                         f"embeddings: {fix}")


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's two T x T matmuls
    (12 * layers * hidden * T), as in the PaLM paper's MFU accounting. Embedding lookups are not matmuls."""
    C, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * C * C + 2 * C * config.intermediate_size
    weights = L * per_layer + C * C + V * C * 0.15 + C * C  # pooler, MLM decoder on ~15% of tokens, MLM transform
    return 6 * weights + 12 * L * C * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mlm_accuracy(out, batch) -> dict:
    """Share of masked positions predicted right; mlm_logits holds them in (batch, position) order."""
    labels = batch["labels"].to(out.mlm_logits.device)
    targets = labels[labels != -100]
    acc = {"mlm_accuracy": (out.mlm_logits.max(-1).indices == targets).float().mean().item() if len(targets) else 0.0}
    if out.nsp_loss is not None:
        acc["nsp_accuracy"] = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"].to(out.nsp_logits.device)).float().mean().item()
    return acc


def trim(batch: dict) -> dict:
    """Drop the columns that are padding in every row (shards store rows padded to seq_len)."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(trainer: Trainer, heldout, collate, cfg: PretrainConfig, batch_size: int) -> dict:
    """MLM loss, perplexity, MLM accuracy and NSP accuracy on the held-out split (fixed masks)."""
    model = trainer.model.eval()
    sums = {"mlm_loss": 0.0, "mlm_correct": 0.0, "masked": 0, "nsp_correct": 0.0, "pairs": 0}
    collate.epoch = 0  # the same masks at every evaluation, so the numbers compare across steps
    for i, indices in enumerate(P.batches(len(heldout), batch_size, seed=cfg.seed, epoch=0, shuffle=False, drop_last=False)):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        batch = trainer.to_device(trim(collate(heldout.batch(indices))))
        with trainer.autocast():
            out = model(**batch)
        n = int((batch["labels"] != -100).sum())
        sums["mlm_loss"] += out.mlm_loss.item() * n
        sums["mlm_correct"] += mlm_accuracy(out, batch)["mlm_accuracy"] * n
        sums["masked"] += n
        if out.nsp_loss is not None:
            sums["nsp_correct"] += (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
            sums["pairs"] += len(indices)
    mlm_loss = sums["mlm_loss"] / max(1, sums["masked"])
    metrics = {"mlm_loss": mlm_loss, "perplexity": math.exp(min(mlm_loss, 50)),
               "mlm_accuracy": sums["mlm_correct"] / max(1, sums["masked"])}
    if sums["pairs"]:
        metrics["nsp_accuracy"] = sums["nsp_correct"] / sums["pairs"]
    return metrics


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, _stop_after_steps: int | None = None) -> dict:
    """Run pretraining; returns the last held-out metrics. _stop_after_steps simulates a kill (for tests)."""
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_counts(cfg, at_least_one=("max_steps", "batch_size", "grad_accum", "seq_len"),
                 at_least_zero=("eval_steps", "eval_batches", "save_steps"))
    start_output_dir(cfg)  # may set cfg.resume: the same command continues a killed run
    dist = setup_distributed(cfg.device)
    check_attention_backend(cfg.attn_impl, dist.device)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, dist.device)
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                         f"({dist.world_size} x {cfg.grad_accum})")
    micro_batch = cfg.batch_size // (dist.world_size * cfg.grad_accum)

    if not 0.0 < cfg.mask_prob < 1.0:
        raise ValueError(f"--mask-prob must be between 0 and 1 (BERT's is 0.15), got {cfg.mask_prob}")
    if not 0.0 <= cfg.short_seq_prob <= 1.0 or not 0.0 <= cfg.heldout_fraction < 1.0:
        raise ValueError(f"--short-seq-prob must be in [0, 1] and --heldout-fraction in [0, 1), got "
                         f"{cfg.short_seq_prob} and {cfg.heldout_fraction}")
    if cfg.init:
        positions = BertConfig.from_json_file(resolve_model_dir(cfg.init) / "config.json").max_position_embeddings
        if cfg.seq_len > positions:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the {positions} positions of --init {cfg.init}: "
                             f"use --seq-len {positions} or less")
    if (cfg.init or cfg.tokenizer) and "vocab_size" in getattr(cfg, "given_flags", ()):
        logger.warning("minibert: --vocab-size is ignored: it sizes a tokenizer trained here, and "
                       "--init/--tokenizer brings its own")
    if cfg.resume:  # the run's own tokenizer: a retrained one could number the words differently
        checkpoint = find_checkpoint(out_dir)
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
            check_vocab_fits(cfg, tokenizer.get_vocab_size(with_added_tokens=True),
                             BertConfig.from_json_file(resolve_model_dir(cfg.init) / "config.json").vocab_size)
    try:
        shards = prepare_data(cfg, tokenizer, dist)
        train, heldout = P.PretrainingDataset(shards, "train"), P.PretrainingDataset(shards, "heldout")
    except (P.CorpusError, P.CorpusNotFoundError):
        raise
    except (OSError, ValueError, KeyError) as e:  # the settings are checked above: the cache was damaged outside minibert
        raise P.CorpusError(f"the preprocessed corpus under {cache_dir() / 'pretraining'} is damaged ({e}): "
                            "delete that folder and run again, it is rebuilt from the corpus") from None
    tokenizer = train.tokenizer
    if len(train) < cfg.batch_size:
        raise ValueError(f"the corpus gives {len(train)} training examples, fewer than --batch-size {cfg.batch_size}: "
                         "use more text or a smaller batch")
    collate = P.MaskingCollator.for_dataset(train, mask_prob=cfg.mask_prob, whole_word_mask=cfg.whole_word_mask, seed=cfg.seed)
    model = build_model(cfg, train.vocab_size)
    if cfg.unigram_bias_init and not cfg.init and not cfg.resume:
        with torch.no_grad():
            model.mlm_head.bias.copy_(P.unigram_log_probs(train))
    if not cfg.nsp:  # the NSP head (and the pooler, which only it reads) get no loss: keep them out of training
        model.nsp_head.requires_grad_(False)
        model.bert.pooler.requires_grad_(False)
    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, precision=precision,
                                compile=cfg.compile, adam_eps=1e-6)
    trainer = Trainer(model, settings, cfg.max_steps, out_dir, dist)
    # The settings as given (what --resume compares and restores), then what they resolved to.
    run_config = {**dataclasses.asdict(cfg), "resolved": {
        "precision": precision, "shards": str(shards), "world_size": dist.world_size, "train_examples": len(train),
        "heldout_examples": len(heldout)}}
    state = trainer.resume() if cfg.resume else TrainState()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "pretrain_config.json", json.dumps(run_config, indent=2) + "\n")
        if not cfg.resume:
            remove_earlier_results(out_dir, RESULT_FILES)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("minibert: pretraining %.1fM parameters on %d examples of %d tokens (%d held out), %d steps of %d",
                    n_params / 1e6, len(train), cfg.seq_len, len(heldout), cfg.max_steps, cfg.batch_size)

    steps_per_epoch = P.num_batches(len(train), cfg.batch_size)
    flops = flops_per_token(model.config, cfg.seq_len)
    peak = peak_flops(dist.device)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (dist.is_main and cfg.progress), desc="pretraining",
               dynamic_ncols=True)
    speed = Throughput()
    metrics = {}
    while state.step < cfg.max_steps:
        collate.epoch = state.epoch
        for indices in P.batches(len(train), cfg.batch_size, seed=cfg.seed, epoch=state.epoch, rank=dist.rank,
                                 world_size=dist.world_size, start_step=state.batch_in_epoch):
            collate.epoch = state.epoch
            micro = [trim(collate(train.batch(indices[i : i + micro_batch]))) for i in range(0, len(indices), micro_batch)]
            result = trainer.step(micro, metrics_fn=mlm_accuracy)
            state.step += 1
            state.batch_in_epoch += 1
            tokens = dist.all_reduce_mean(float(sum(int(b["attention_mask"].sum()) for b in micro))) * dist.world_size
            tokens_per_s = speed.update(int(tokens))
            postfix = {"loss": f"{result['loss']:.3f}", "mlm_acc": f"{result['mlm_accuracy']:.3f}", "tok_s": f"{tokens_per_s:.0f}"}
            if peak:
                postfix["mfu"] = f"{tokens_per_s * flops / peak:.1%}"
            bar.update(1)
            bar.set_postfix(postfix)
            trainer.log_metrics({"split": "train", "step": state.step, **{k: v for k, v in result.items() if v is not None},
                                 "tokens_per_s": tokens_per_s})
            if state.batch_in_epoch >= steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == cfg.max_steps:
                if dist.is_main and len(heldout):
                    metrics = evaluate(trainer, heldout, collate, cfg, micro_batch * cfg.grad_accum)
                    trainer.log_metrics({"split": "eval", "step": state.step, **metrics})
                    tqdm.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    collate.epoch = state.epoch
                dist.barrier()
            if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < cfg.max_steps:
                trainer.save_checkpoint(state, tokenizer=tokenizer, run_config=run_config)
            if _stop_after_steps is not None and state.step >= _stop_after_steps:
                bar.close()
                return {"stopped_at": state.step}
            if state.step >= cfg.max_steps:
                break
    bar.close()
    if dist.is_main:
        model.save_pretrained(out_dir, tokenizer=tokenizer)
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", "loss", ("mlm_loss", "mlm_accuracy", "nsp_accuracy"))
        trainer.remove_checkpoints()
        logger.info("minibert: model in %s; fine-tune it with: python train_finetune.py --init %s", out_dir, out_dir)
    dist.barrier()
    return metrics


if __name__ == "__main__":
    run_cli(main)
