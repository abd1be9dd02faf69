r"""Fine-tune a pretrained BERT on labelled text: classification, regression, multi-label, or token tags.

    # The built-in task, offline: movie-review sentence polarity from the pretrained MiniLM (~7 min on 2 CPU cores)
    python train_finetune.py
    # A quick check that everything works (about a minute on a laptop CPU)
    python train_finetune.py --max-steps 30 --eval-steps 30 --output-dir runs/quick-finetune
    # Your own data: CSV, TSV or JSON Lines, single texts or pairs, string or integer labels
    python train_finetune.py --init bert-base-uncased --train-file train.csv --validation-file dev.csv \
        --test-file test.csv --text-column review --label-column stars
    python train_finetune.py --init bert-base-uncased --train-file train.jsonl --validation-file dev.jsonl \
        --text-pair-column hypothesis --task-type classification
    # Regression, multi-label, named entities (CoNLL files or JSON Lines with "tokens" and "tags")
    python train_finetune.py --task-type regression --train-file train.tsv --validation-file dev.tsv --label-column score
    python train_finetune.py --task-type token-classification --train-file train.conll --validation-file dev.conll
    # Named entities as annotation tools export them ({"text", "spans"}, doccano, Label Studio), with a CRF
    python train_finetune.py --train-file train.jsonl --validation-file dev.jsonl --tag-scheme bioes --crf
    # Imbalanced classes; multi-label thresholds tuned per label on the validation set
    python train_finetune.py --train-file train.csv --class-weights balanced --best-metric f1
    python train_finetune.py --task-type multilabel --train-file train.jsonl --validation-file dev.jsonl --tune-thresholds
    # Results over several seeds (mean and std in seeds_results.json; the best run kept); raw probabilities
    python train_finetune.py --train-file train.csv --validation-file dev.csv --seeds 42,1,2
    python train_finetune.py --train-file train.csv --validation-file dev.csv --no-calibrate
    # GLUE, from the GLUE download's folders
    python train_finetune.py --init bert-base-uncased --task mrpc --data-dir glue_data/MRPC
    # Several GPUs: the same command under torchrun
    torchrun --nproc_per_node 8 train_finetune.py --init bert-base-uncased --task mnli --data-dir glue_data --precision bf16
    # A researcher's change to the model: any BertConfig field, on a fresh or loaded model
    python train_finetune.py --config hidden_act=silu --config num_hidden_layers=4
    # LoRA: train ~1% of the weights (a rank-8 update of query and value, and the head)
    python train_finetune.py --lora-rank 8 --lr 5e-4 --output-dir runs/lora
    # A killed (or Ctrl-C'd) run continues exactly where it stopped, with the settings it was started with;
    # the same command as before does too
    python train_finetune.py --output-dir runs/x --resume
    # Label new data with a fine-tuned model (predictions.jsonl; test_results.json when it has labels)
    python train_finetune.py --init runs/x --predict-only --test-file new.csv --output-dir runs/x-new
    # ... with each prediction's word attributions, and explanations.html to read them
    python train_finetune.py --init runs/x --predict-only --explain --test-file new.csv --output-dir runs/x-why

Writes to --output-dir: the best model as an HF directory (config.json with id2label, model.safetensors,
tokenizer files) that `--init DIR`, minibert and transformers' AutoModelFor... load; eval_results.json
and test_results.json; train_results.json (steps, seconds, examples/s); predictions.jsonl for the test set; metrics.jsonl; training_curves.png;
finetune_config.json (the resolved settings); checkpoint/ while the run is in progress (for --resume). A LoRA
run's model is the merged one (a plain BERT), and adapter/ holds the adapter in peft's format. test_results.json
has ece, brier, nll before and after temperature scaling for classifiers (the temperature is in config.json), and
reliability.png shows them; with --seeds, seeds/seed-N/ per run and seeds_results.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minibert import finetuning as F
from minibert.assets import MINILM_HUB_ID
from minibert.attributions import explain_records
from minibert.atomic_write import atomic_write_text, write_json
from minibert.calibration import (
    CALIBRATED_TASKS,
    calibration_report,
    fit_temperature,
    plot_reliability,
    probabilities,
    temperature_for_config,
    temperature_from_config,
    top_label,
)
from minibert.calibration import CONFIG_KEY as TEMPERATURE_KEY
from minibert.class_weights import class_weights, weighted_loss
from minibert.cli import check_counts, config_overrides, parse_settings, run_cli, setup_logging
from minibert.config import BertConfig
from minibert.crf import CRF_FILE, BertCRFForTokenClassification
from minibert.curves import plot_curves
from minibert.explanation_page import write_page
from minibert.hub import resolve_model_dir
from minibert.lora import LoraModel, LoraSettings, read_adapter_config, read_adapter_weights
from minibert.seeds import parse_seeds, run_seeds
from minibert.metrics import MAIN_METRIC, METRICS, compute_metrics, per_class_scores
from minibert.spans import entity_spans, span_record
from minibert.tagging import SCHEMES, CRFWeights, decode_tags, detect_scheme, log_softmax
from minibert.thresholds import threshold_vector, tune_thresholds
from minibert.tokenizer import load_tokenizer
from minibert.training import (
    Distributed,
    Trainer,
    TrainingSettings,
    TrainState,
    check_attention_backend,
    check_layer_lr_decay,
    hold_output_dir,
    remove_earlier_results,
    resolve_precision,
    resolve_resume,
    seed_everything,
    setup_distributed,
)
from minibert.data.batching import collate, eval_batches, in_original_order
from minibert.data.encoding import encode_examples
from minibert.data.examples import DataError
from minibert.data.labels import LabelVocab
from minibert.data.readers import load_examples

logger = logging.getLogger("minibert")

# Saved by fine-tuning in config.json (BertConfig.extra), read by every prediction after it.
TAG_SCHEME_KEY = "tag_scheme"  # the scheme decoding keeps to: bio, bioes, or null (IOB1 or plain tags)
THRESHOLDS_KEY = "label_thresholds"  # multilabel: {label: threshold} from --tune-thresholds


@dataclass
class FinetuneConfig:
    # --- model ---
    init: str = MINILM_HUB_ID  # hub id, HF directory, or a directory minibert wrote (train_pretrain.py's too)
    reinit_head: bool = False  # train a new head when --init is a classifier for other labels
    attn_impl: str | None = None  # eager | sdpa | triton; None keeps the checkpoint's (sdpa by default)
    dropout: float | None = None  # overrides hidden and attention dropout; None keeps the checkpoint's (0.1)
    # BertConfig fields to set on the model, fresh or loaded, one FIELD=VALUE per --config (--config
    # hidden_act=silu --config num_hidden_layers=4): over every other flag, checked by BertConfig, saved with the run.
    config: list[str] = field(default_factory=list, metadata={"repeat": True, "metavar": "FIELD=VALUE"})
    # --- data: files, a GLUE task, or nothing for the built-in movie-review task ---
    train_file: str | None = None  # .csv, .tsv, .jsonl/.json, or CoNLL (.conll/.iob/.bio) for token classification
    validation_file: str | None = None  # the same format: picks the best checkpoint, and early stopping
    validation_fraction: float = 0.1  # without --validation-file: this share of --train-file is held out instead
    test_file: str | None = None  # optional: scored at the end with the best model, and predictions.jsonl written
    task: str | None = None  # a GLUE task (sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli) with --data-dir
    data_dir: str | None = None  # the GLUE task's folder (train.tsv, dev.tsv, ... as GLUE ships them)
    text_column: str | None = None  # default "text" ("tokens" for token classification)
    text_pair_column: str | None = None  # the second text of sentence-pair tasks
    label_column: str | None = None  # default "label" ("tags" for token classification)
    task_type: str | None = None  # classification | regression | multilabel | token-classification
    # Train on a random subset of N examples (0 = all; the subset depends on --seed): quick runs, and
    # learning curves over the number of labels (benchmarks/transfer.py --label-budgets).
    max_train_examples: int = 0
    group_by_length: bool = True  # batches of similar lengths: less padding, faster; --no-group-by-length shuffles freely
    max_length: int | None = None  # tokens per example with [CLS]/[SEP]; longer ones are truncated. None: 128, or fewer if the model has fewer positions
    tag_scheme: str = "bio"  # bio | bioes: the tags span-annotated text ({"text", "spans"}, doccano, Label Studio) gets
    # --- imbalanced data, tags and thresholds ---
    # balanced (n_samples / (n_classes * count), scikit-learn's) or FILE.json ({label: weight}): weights the loss per
    # class; for multilabel, BCE pos_weight per label (balanced: negatives / positives)
    class_weights: str | None = None
    tune_thresholds: bool = False  # multilabel: per label, the threshold with the best F1 on the validation set (config.json)
    crf: bool = False  # token classification: a linear-chain CRF over the tags, trained jointly (crf.safetensors)
    # Token classification: decode the most probable valid BIO/BIOES tag sequence (Viterbi, no I- tag after O);
    # --no-constrained-decoding takes each word's most probable tag
    constrained_decoding: bool = True
    # Classification and multilabel: fit a temperature T on the validation set (temperature scaling, Guo et al.
    # 2017: fine-tuned BERTs are over-confident), saved in config.json as calibration_temperature and applied to
    # every probability after it (softmax(logits / T)); labels and accuracy do not change. --no-calibrate: T = 1.
    calibrate: bool = True
    # --- optimisation (BERT's recipe) ---
    epochs: int = 3
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    batch_size: int = 32  # per process; the global batch is batch_size * grad_accum * processes
    eval_batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    layer_lr_decay: float = 1.0  # in (0, 1]; < 1 gives lower layers smaller learning rates
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the bottom N encoder layers
    # Re-initialise the top N encoder layers (and the pooler) before fine-tuning: helps when the top of a
    # pretrained model is specialised to its pretraining task (Zhang et al. 2021, "Revisiting Few-sample
    # BERT Fine-tuning").
    reinit_layers: int = 0
    seed: int = 42
    # --- LoRA (minibert/lora.py): train a low-rank update of chosen layers and the head, ~1% of the weights ---
    # The rank r of the update W + (alpha/r) B A of each adapted layer; None trains every weight. The output
    # directory holds the merged model, and adapter/ a peft adapter. LoRA wants a higher --lr (5e-4 at rank 8).
    lora_rank: int | None = None
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 x rank
    lora_dropout: float | None = None  # on the input of the LoRA branch; None: 0.1
    # Comma-separated, of query, key, value, attention-output, intermediate (or up), output (or down). None: query,value
    lora_targets: str | None = None
    lora_train_pooler: bool = False  # train the pooler in full too, as the classifier is
    # A LoRA adapter on --init, its base (peft's save_pretrained folder, or a LoRA run's adapter/), to train
    # further or to label --test-file with --predict-only. Its rank, alpha, dropout and targets are its own.
    lora_adapter: str | None = None
    # Fine-tune once per seed (e.g. 42,1,2), one run after another, each in OUTPUT_DIR/seeds/seed-N/;
    # seeds_results.json gives the mean and standard deviation of every metric, and the run with the best
    # validation metric is kept as the model in --output-dir (Devlin et al. 2019 on small tasks)
    seeds: str | None = None
    # The seed of the data split: the held-out validation share and the --max-train-examples subset. None: --seed,
    # or with --seeds the first of them, so that every seed trains and validates on the same examples
    data_seed: int | None = None
    # --- running ---
    output_dir: str = "runs/finetune"
    eval_steps: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    # Also write a resumable checkpoint every N steps between evaluations (0 = only at evaluations), so a
    # killed run loses at most N steps even when it evaluates once an epoch. HF Trainer's default is 500.
    save_steps: int = 500
    early_stopping: int = 0  # stop after N evaluations without improvement; 0 = never
    # The validation metric that picks the best checkpoint (and early stopping); None: the task's main one
    # (accuracy for classification). With imbalanced classes, f1 (of class id 1 when there are two) or mcc says more.
    best_metric: str | None = None
    precision: str = "auto"  # fp32 | bf16 | fp16; auto = bf16 on a GPU that supports it, fp32 on CPU
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    device: str | None = None  # cuda | cpu; default: the GPU if there is one
    resume: bool = False  # continue the run in --output-dir from its last checkpoint, with the settings it was started with
    # Train nothing: the fine-tuned model --init labels --test-file, into --output-dir/predictions.jsonl
    # (and test_results.json when the file has labels). The task type and labels are the model's own.
    predict_only: bool = False
    # With --predict-only: word attributions for each prediction (integrated gradients on the word embeddings,
    # minibert/attributions.py) in predictions.jsonl, and explanations.html to read them (each entity of a tagger)
    explain: bool = False
    explain_steps: int = 50  # integration points to start with; raised while the attributions miss completeness
    explain_target: str | None = None  # classification/multilabel: explain this label's probability, not the predicted one
    progress: bool = True  # show the progress bar


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    return parse_settings(FinetuneConfig, argv, __doc__)


# ----------------------------------------------------------------------------- the steps of main()
#
# Each step reads the settings it needs from the FinetuneConfig and calls minibert.finetuning, where
# the work is done (and where Python users find it).


def load_data(cfg: FinetuneConfig, tokenizer) -> F.TaskData:
    """The task's examples; the tokenizer splits span-annotated text into the words that get tags."""
    return F.load_task_data(
        task=cfg.task, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
        test_file=cfg.test_file, task_type=cfg.task_type, text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
        validation_fraction=cfg.validation_fraction, max_train_examples=cfg.max_train_examples,
        seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
        tokenizer=tokenizer, tag_scheme=cfg.tag_scheme)


def read_init(cfg: FinetuneConfig) -> tuple[Path, BertConfig]:
    """--init's directory and config, read before the model so that a misfit stops the run early."""
    init_dir = resolve_model_dir(cfg.init)
    return init_dir, BertConfig.from_json_file(init_dir / "config.json", **config_overrides(cfg.config))


def choose_labels(cfg: FinetuneConfig, task: F.TaskData, init_dir: Path, init_config: BertConfig):
    # With --lora-adapter the head is the adapter's, whatever head --init has.
    init_is_classifier = F.classifier_kind(init_config, init_dir) is not None and cfg.lora_adapter is None
    return F.choose_labels(task, init_config, init=cfg.init, init_is_classifier=init_is_classifier,
                           reinit_head=cfg.reinit_head)


def check_task_tokenizer(cfg: FinetuneConfig, task: F.TaskData, tokenizer, init_config: BertConfig):
    text_pairs = any(ex.text_pair is not None for ex in task.train[:1])
    F.check_tokenizer_fits(tokenizer, init_config, cfg.init, text_pairs=text_pairs)


def lora_settings(cfg: FinetuneConfig) -> LoraSettings | None:
    """The LoRA the flags ask for (None: full fine-tuning, or an adapter's own settings), checked before any
    data is read."""
    flags = {"--lora-rank": cfg.lora_rank is not None, "--lora-alpha": cfg.lora_alpha is not None,
             "--lora-dropout": cfg.lora_dropout is not None, "--lora-targets": cfg.lora_targets is not None,
             "--lora-train-pooler": cfg.lora_train_pooler}
    given = [flag for flag, on in flags.items() if on]
    if cfg.lora_adapter is not None:
        if given:
            raise ValueError(f"{given[0]} with --lora-adapter: the adapter's adapter_config.json sets rank, alpha, "
                             "dropout and targets; drop the flag")
        read_adapter_config(cfg.lora_adapter)  # a missing folder or an adapter minibert cannot compute: say so now
    elif cfg.lora_rank is None:
        if given:
            raise ValueError(f"{given[0]} needs --lora-rank R (LoRA of rank R, e.g. 8) or --lora-adapter DIR")
        return None
    # Other ways of choosing what trains: with LoRA their meaning would be unclear.
    for flag, used in (("--freeze-layers", cfg.freeze_layers), ("--layer-lr-decay", cfg.layer_lr_decay != 1.0),
                       ("--reinit-layers", cfg.reinit_layers)):
        if used:
            raise ValueError(f"{flag} with LoRA: LoRA already decides what trains (the LoRA weights and the head); "
                             f"drop {flag}, or drop LoRA to fine-tune layers in full")
    if cfg.crf:  # peft's token classifier is transformers' BertForTokenClassification, which has no CRF
        raise ValueError("--crf with LoRA: a peft adapter cannot carry the CRF's transition scores; drop --crf, or drop "
                         "LoRA to train the CRF with the whole model")
    if cfg.lora_adapter is not None:
        return None
    return LoraSettings(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha,
                        dropout=0.1 if cfg.lora_dropout is None else cfg.lora_dropout,
                        targets=tuple(t.strip() for t in (cfg.lora_targets or "query,value").split(",") if t.strip()),
                        train_pooler=cfg.lora_train_pooler)


def count_weights(model) -> tuple[int, int]:
    """(trainable, total) weights: what the log and train_results.json report."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def build_model(cfg: FinetuneConfig, task: F.TaskData, vocab, init_dir: Path):
    # A resumed run's weights come from its checkpoint: what --init lacks is no news then.
    model = F.build_model(task.task_type, vocab, init_dir, reinit_head=cfg.reinit_head, attn_impl=cfg.attn_impl,
                          dropout=cfg.dropout, freeze_embeddings=cfg.freeze_embeddings, freeze_layers=cfg.freeze_layers,
                          reinit_layers=cfg.reinit_layers, config_overrides=config_overrides(cfg.config),
                          lora=lora_settings(cfg), lora_adapter=cfg.lora_adapter, lora_base=cfg.init,
                          verbose=not cfg.resume, crf=cfg.crf)
    # An --init's thresholds and temperature do not fit the model trained now.
    model.config.extra.pop(THRESHOLDS_KEY, None)
    model.config.extra.pop(TEMPERATURE_KEY, None)
    if task.task_type == "token-classification":
        scheme = detect_scheme([ex.label for ex in task.train], vocab.labels)
        model.config.extra[TAG_SCHEME_KEY] = scheme
        if scheme is None and any(label[:2] in ("B-", "I-") for label in vocab.labels):
            logger.info("minibert: the training tags break the BIO rules (I- after O: IOB1, as CoNLL-2003's original "
                        "files): predictions take each word's most probable tag, without sequence constraints")
    trainable, total = count_weights(model)
    how = ""
    if isinstance(model, LoraModel):
        lora = model.settings
        how = (f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)} of {len(model.model.bert.layers)} "
               f"layers, the classifier{' and pooler' if lora.train_pooler else ''} in full: ")
    logger.info("minibert: %s%s of %s weights train (%.2f%%)", how, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def loss_for(cfg: FinetuneConfig, task: F.TaskData, features: F.TaskFeatures, vocab):
    """--class-weights: the weighted loss (logged), else None (the model's own)."""
    if not cfg.class_weights:
        return None
    labels = vocab.labels if vocab is not None else []  # regression: class_weights says it has no classes
    weights = class_weights(cfg.class_weights, task.task_type, labels, [f.label for f in features.train])
    logger.info("minibert: class weights (%s)%s: %s", cfg.class_weights, " as BCE pos_weight" if task.task_type ==
                "multilabel" else "", ", ".join(f"{label} {w:.4g}" for label, w in zip(labels, weights)))
    return weighted_loss(task.task_type, torch.tensor(weights, dtype=torch.float32))


@dataclass
class Run:
    """A started run: what the training and result steps share."""

    trainer: Trainer
    state: TrainState
    schedule: F.Schedule
    epochs: int
    run_config: dict
    main_metric: str


def start_run(cfg: FinetuneConfig, model, task: F.TaskData, features: F.TaskFeatures, max_length: int,
              init_dir: Path, dist: Distributed, loss_fn=None) -> Run:
    """The Trainer, the state to start from (a checkpoint's when resuming), and the run's settings, saved."""
    out_dir = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, dist.device)
    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                layer_lr_decay=cfg.layer_lr_decay, precision=precision, compile=cfg.compile)
    schedule = F.Schedule.of(cfg)
    total_steps, epochs = schedule.steps([len(f) for f in features.train], dist)
    trainer = Trainer(model, settings, total_steps, out_dir, dist, loss_fn=loss_fn)
    # The settings as given (what --resume compares and restores), then what they resolved to.
    run_config = {**dataclasses.asdict(cfg), "resolved": {
        "precision": precision, "task_type": task.task_type, "task_name": task.name, "max_length": max_length,
        "total_steps": total_steps, "world_size": dist.world_size, "init_dir": str(init_dir)}}
    state = trainer.resume() if cfg.resume else TrainState()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            remove_earlier_results(out_dir)
        write_json(out_dir / "finetune_config.json", run_config)
        logger.info("minibert: %s, %s: %d train / %d validation / %s test examples, %d steps of %d x %d x %d",
                    task.name, task.task_type, len(features.train), len(features.validation),
                    len(features.test) if features.test else 0, total_steps, cfg.batch_size, cfg.grad_accum,
                    dist.world_size)
    return Run(trainer, state, schedule, epochs, run_config, main_metric_of(cfg, task))


def main_metric_of(cfg: FinetuneConfig, task: F.TaskData) -> str:
    """The validation metric that picks the best checkpoint (and the best of several seeds)."""
    return cfg.best_metric or task.main_metric or MAIN_METRIC[task.task_type]


def train(cfg: FinetuneConfig, run: Run, task: F.TaskData, features: F.TaskFeatures, vocab, tokenizer,
          stop_after_steps: int | None = None) -> dict:
    trainer, pad_id = run.trainer, tokenizer.token_to_id("[PAD]")

    def validate(model) -> dict:
        decoding = Decoding.of(model, task.task_type, vocab, cfg.constrained_decoding)
        outputs = predict(model, features.validation, cfg.eval_batch_size, pad_id, trainer.device, trainer.autocast)
        loss = F.validation_loss(outputs, features.validation, task.task_type, model.config.problem_type)
        return {**score(task, outputs, features.validation, vocab, decoding), "loss": loss,
                "per_class": per_class(task, outputs, features.validation, vocab, decoding)}

    return F.train(trainer, run.state, features.train, run.schedule, epochs=run.epochs, pad_token_id=pad_id,
                   validate=validate, main_metric=run.main_metric, tokenizer=tokenizer, run_config=run.run_config,
                   progress=cfg.progress, stop_after_steps=stop_after_steps)


def evaluate_and_write_results(cfg: FinetuneConfig, run: Run, task: F.TaskData, features: F.TaskFeatures, vocab,
                               tokenizer, train_stats: dict) -> dict:
    """The best model on the test data (predictions.jsonl; test_results.json when it has labels), the
    run's figures, the training curves; then the resumable state, no longer needed, is removed."""
    trainer, state, out_dir = run.trainer, run.state, Path(cfg.output_dir)
    model, dist = trainer.model, trainer.dist
    results = {"eval": None, "test": None, "output_dir": str(out_dir), "train": train_stats, "main_metric": run.main_metric}
    if dist.is_main:
        if state.best_step is None:  # a resumed run that had nothing left to do
            model.save_pretrained(out_dir, tokenizer=tokenizer)
        train_stats["trainable_parameters"], train_stats["total_parameters"] = count_weights(model)
        if isinstance(model, LoraModel):
            adapter = out_dir / "adapter"
            train_stats["adapter_bytes"] = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
            logger.info("minibert: the LoRA adapter (%.1f kB) in %s; the merged model in %s",
                        train_stats["adapter_bytes"] / 1e3, adapter, out_dir)
        write_json(out_dir / "train_results.json", train_stats)
        best = type(model).from_pretrained(str(out_dir), verbose=False, attn_impl=model.config.attn_impl).to(dist.device)
        results["eval"] = json.loads((out_dir / "eval_results.json").read_text()) if (out_dir / "eval_results.json").exists() else None
        pad_id = tokenizer.token_to_id("[PAD]")
        predict_fn = lambda m, f: predict(m, f, cfg.eval_batch_size, pad_id, dist.device, trainer.autocast)  # noqa: E731
        if task.task_type in CALIBRATED_TASKS:  # first T, then any thresholds: they apply to calibrated probabilities
            results["eval"] = calibrate(best, task, features.validation, vocab, results["eval"], out_dir, tokenizer,
                                        predict_fn, fit=cfg.calibrate)
        if cfg.tune_thresholds:
            results["eval"] = keep_tuned_thresholds(best, task, features.validation, vocab, results["eval"], out_dir, tokenizer,
                                                    predict_fn)
        decoding = Decoding.of(best, task.task_type, vocab, cfg.constrained_decoding)
        temperature = decoding.temperature if cfg.calibrate else None  # None: the results say T = 1 was not fitted
        outputs = None
        if features.test:
            outputs = predict_fn(best, features.test)
            records = prediction_records(task, task.test, outputs, features.test, vocab, decoding)
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # UTF-8: texts stay readable
            atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
            if features.test[0].label is not None:
                results["test"] = score(task, outputs, features.test, vocab, decoding)
                if task.task_type in CALIBRATED_TASKS:
                    results["test"].update(calibration_report(task.task_type, np.stack(outputs),
                                                              calibration_labels(features.test), temperature))
                logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
                results["test"]["per_class"] = per_class(task, outputs, features.test, vocab, decoding)
                write_json(out_dir / "test_results.json", results["test"])
        if task.task_type in CALIBRATED_TASKS:
            # On the test set when it has labels: T was fitted on the validation set, where "after" would flatter.
            if results["test"] is not None:
                split, logits, labels = "test", np.stack(outputs), calibration_labels(features.test)
            else:
                split, logits = "validation", np.stack(predict_fn(best, features.validation))
                labels = calibration_labels(features.validation)
            plot_calibration(out_dir / "reliability.png", f"{task.name}, {split} set ({len(labels)} examples)",
                             task.task_type, logits, labels, temperature)
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", eval_metrics=(run.main_metric,))
        trainer.remove_checkpoints()
        logger.info("minibert: best %s %.4f (step %s); model in %s", run.main_metric,
                    float("nan") if state.best_metric is None else state.best_metric, state.best_step, out_dir)
    dist.barrier()
    return results


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model, features, batch_size: int, pad_token_id: int, device, autocast) -> list[np.ndarray]:
    """Raw outputs per example, in example order: (L,) logits, or (T, L) per-token logits."""
    model.eval()
    batches = eval_batches([len(f) for f in features], batch_size)
    outputs = []
    for batch in batches:
        inputs = collate([features[i] for i in batch], pad_token_id)
        inputs.pop("labels", None)
        with autocast():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu().numpy()
        outputs.append([logits[row, : len(features[i])] if logits.ndim == 3 else logits[row] for row, i in enumerate(batch)])
    return in_original_order(batches, outputs)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Decoding:
    """How a model's outputs become predictions, from its config.json and head."""

    scheme: str | None = None  # token classification: the tag scheme whose rules decoding keeps; None: argmax
    crf: CRFWeights | None = None  # the CRF's transition scores (--crf models)
    thresholds: np.ndarray | None = None  # multilabel: (L,) per-label thresholds (0.5 unless tuned), on calibrated probabilities
    temperature: float | list[float] = 1.0  # classification, multilabel: the calibration temperature (one per label for multilabel)

    @classmethod
    def of(cls, model, task_type: str, vocab, constrained: bool) -> Decoding:
        extra = model.config.extra
        return cls(
            scheme=extra.get(TAG_SCHEME_KEY) if constrained and task_type == "token-classification" else None,
            crf=model.crf_weights() if isinstance(model, BertCRFForTokenClassification) else None,
            thresholds=threshold_vector(extra.get(THRESHOLDS_KEY), vocab.labels) if task_type == "multilabel" else None,
            temperature=temperature_from_config(extra, vocab.labels) if task_type in CALIBRATED_TASKS else 1.0,
        )


def word_tag_ids(output: np.ndarray, feature, vocab, decoding: Decoding) -> np.ndarray:
    """The tag id of each word with a first piece, in word order: (T, L) logits -> (W,)."""
    logits = output[feature.word_ids >= 0]
    scores = logits if decoding.crf is not None else log_softmax(logits)  # a CRF scores logits, not log-probs
    return np.array(decode_tags(scores, vocab.labels, decoding.scheme, decoding.crf), dtype=np.int64)


def _predictions(task: F.TaskData, outputs, features, vocab, decoding: Decoding):
    """(predictions, references) as minibert.metrics takes them."""
    if task.task_type == "classification":
        return np.stack(outputs), np.array([f.label for f in features])
    if task.task_type == "regression":
        return np.stack(outputs)[:, 0], np.array([f.label for f in features])
    if task.task_type == "multilabel":
        decisions = (probabilities("multilabel", np.stack(outputs), decoding.temperature) >= decoding.thresholds).astype(np.int64)
        return decisions, np.stack([f.label for f in features])
    preds = [word_tag_ids(o, f, vocab, decoding) for o, f in zip(outputs, features)]
    return preds, [f.label[f.word_ids >= 0] for f in features]


def score(task: F.TaskData, outputs, features, vocab, decoding: Decoding) -> dict[str, float]:
    id2label = dict(enumerate(vocab.labels)) if vocab is not None else None
    preds, refs = _predictions(task, outputs, features, vocab, decoding)
    return compute_metrics(task.task_type, preds, refs, id2label=id2label, metric_names=task.metric_names)


def per_class(task: F.TaskData, outputs, features, vocab, decoding: Decoding) -> dict | None:
    """Precision, recall, F1 and support of each class, label or entity type; None for regression."""
    if task.task_type == "regression":
        return None
    preds, refs = _predictions(task, outputs, features, vocab, decoding)
    return per_class_scores(task.task_type, preds, refs, id2label=dict(enumerate(vocab.labels)))


def _token_record(ex, out: np.ndarray, feat, vocab, decoding: Decoding) -> dict:
    """Tags per word ({"tokens", "tags"}), or for span-annotated input the entities as spans in its own format."""
    first = feat.word_ids >= 0
    ids = word_tag_ids(out, feat, vocab, decoding)
    chosen = _softmax(out[first])[np.arange(len(ids)), ids]  # the probability of each word's tag
    words = feat.word_ids[first]
    tags = {int(w): vocab.labels[int(t)] for w, t in zip(words, ids)}
    word_tags = [tags.get(i) for i in range(len(ex.text))]  # None: cut by --max-length
    if ex.tagged_text is None:
        return {"tokens": ex.text, "tags": word_tags, **({"gold": ex.label} if ex.label is not None else {})}
    probability = dict(zip(words.tolist(), chosen.tolist()))
    entities = [(span, float(np.mean([probability[w] for w in range(a, b + 1)])))
                for span, a, b in entity_spans(word_tags, ex.tagged_text.offsets)]
    return span_record(ex.tagged_text.record, ex.tagged_text.fmt, ex.tagged_text.text, entities)


def prediction_records(task: F.TaskData, examples, outputs, features, vocab, decoding: Decoding) -> list[dict]:
    records = []
    for ex, out, feat in zip(examples, outputs, features):
        if task.task_type == "token-classification":
            records.append(_token_record(ex, out, feat, vocab, decoding))
            continue
        record = {"text": ex.text} if ex.text_pair is None else {"text": ex.text, "text_pair": ex.text_pair}
        if task.task_type == "classification":
            probs = probabilities("classification", out[None], decoding.temperature)[0]
            record.update(label=vocab.labels[int(probs.argmax())], probabilities=dict(zip(vocab.labels, probs.round(6).tolist())))
        elif task.task_type == "regression":
            record["prediction"] = float(out[0])
        else:
            probs = probabilities("multilabel", out[None], decoding.temperature)[0]
            record.update(labels=[l for l, p, t in zip(vocab.labels, probs, decoding.thresholds) if p >= t],
                          probabilities=dict(zip(vocab.labels, probs.round(6).tolist())))
        if ex.label is not None:
            record["gold"] = ex.label
        records.append(record)
    return records


def adapter_head(adapter_dir: str) -> tuple[str, int]:
    """Which classifier a LoRA adapter brings ("token" or "sequence") and its number of outputs."""
    config = read_adapter_config(adapter_dir)
    weight = read_adapter_weights(Path(adapter_dir)).get("base_model.model.classifier.weight")
    if weight is None:
        raise DataError(f"--predict-only: the adapter {adapter_dir} has no classifier to label with (it trained none); "
                        "fine-tune it on labelled data first (drop --predict-only)")
    return ("token" if config.get("task_type") == "TOKEN_CLS" else "sequence"), int(weight.shape[0])


def predict_only(cfg: FinetuneConfig) -> dict:
    """--predict-only: a fine-tuned model (--init) labels --test-file; nothing is trained."""
    if not cfg.test_file:
        raise DataError("--predict-only needs --test-file, the examples to label")
    if cfg.tune_thresholds:
        raise ValueError("--tune-thresholds picks thresholds on a validation set, and --predict-only has none: tune "
                         "them while fine-tuning (the model keeps them in its config.json)")
    init_dir = resolve_model_dir(cfg.init)
    config = BertConfig.from_json_file(init_dir / "config.json", **config_overrides(cfg.config))
    kind = F.classifier_kind(config, init_dir)
    if cfg.lora_adapter is not None:  # the head is the adapter's; peft keeps no label names, so they are the ids
        kind, num_labels = adapter_head(cfg.lora_adapter)
        config = config.replace(num_labels=num_labels, id2label=None, problem_type=None)
    if kind == "token":
        task_type = "token-classification"
    elif kind == "sequence":
        guess = "regression" if config.num_labels == 1 else "classification"  # HF's rule without a problem_type
        task_type = {"regression": "regression", "multi_label_classification": "multilabel",
                     "single_label_classification": "classification"}.get(config.problem_type, guess)
        if cfg.lora_adapter is not None and cfg.task_type == "multilabel":  # an adapter cannot tell, the user can
            task_type = "multilabel"
    else:
        raise DataError(f"--predict-only needs a fine-tuned model as --init, and {cfg.init} has no classifier head: "
                        "fine-tune it first (drop --predict-only)")
    vocab = None if task_type == "regression" else LabelVocab(F.checkpoint_labels(config))
    max_length = F.max_length_for(config, cfg.max_length, cfg.init)
    tokenizer = load_tokenizer(init_dir)
    # New data for a model has the columns it was trained on, more often than not: those are the defaults.
    columns = {**F.saved_columns(init_dir), **{name: getattr(cfg, name) for name in F.COLUMN_SETTINGS if getattr(cfg, name)}}
    F.check_tokenizer_fits(tokenizer, config, cfg.init, text_pairs=bool(columns.get("text_pair_column")))
    # Gold spans of a labelled test file are tagged as the model was trained (a CoNLL-trained model: --tag-scheme).
    scheme = config.extra.get(TAG_SCHEME_KEY) if config.extra.get(TAG_SCHEME_KEY) in SCHEMES else cfg.tag_scheme
    columns.update(tokenizer=tokenizer, tag_scheme=scheme)
    examples = load_examples(cfg.test_file, task_type=task_type, flag="--test-file", require_labels=False, **columns)
    pad_id = tokenizer.token_to_id("[PAD]")
    features = encode_examples(tokenizer, examples, max_length=max_length, task_type=task_type, label_vocab=vocab,
                               source="the test data")
    device = setup_distributed(cfg.device).device
    check_attention_backend(cfg.attn_impl, device)
    precision = resolve_precision(cfg.precision, device)
    overrides = {**({"attn_impl": cfg.attn_impl} if cfg.attn_impl else {}), **config_overrides(cfg.config)}
    if cfg.lora_adapter is None:
        crf = task_type == "token-classification" and (init_dir / CRF_FILE).is_file()
        model = F.model_class(task_type, crf=crf).from_pretrained(str(init_dir), verbose=False, **overrides)
    else:
        model = F.model_class(task_type).from_pretrained(str(init_dir), verbose=False, reinit_head=True,
                                                         **{**overrides, "num_labels": config.num_labels})
        model = LoraModel.from_adapter(model, cfg.lora_adapter, base=cfg.init)
    decoding = Decoding.of(model, task_type, vocab, cfg.constrained_decoding)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = lambda: torch.autocast(device.type, dtype=dtypes[precision]) if precision in dtypes else contextlib.nullcontext()  # noqa: E731
    outputs = predict(model.to(device), features, cfg.eval_batch_size, pad_id, device, autocast)
    task = F.TaskData(task_type, [], [], examples, Path(cfg.test_file).stem)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = prediction_records(task, examples, outputs, features, vocab, decoding)
    if cfg.explain:
        inner = model.model if isinstance(model, LoraModel) else model  # the LoRA layers sit inside it
        if cfg.explain_target is not None and task_type not in CALIBRATED_TASKS:
            raise ValueError(f"--explain-target names a label to explain, and a {task_type} model explains "
                             f"{'its value' if task_type == 'regression' else 'each entity'}: drop --explain-target")
        tags = None
        if task_type == "token-classification":  # each word's predicted tag (None: cut off by --max-length)
            tags = [[None] * len(ex.text) for ex in examples]
            for words, out, feat in zip(tags, outputs, features):
                for w, t in zip(feat.word_ids[feat.word_ids >= 0], word_tag_ids(out, feat, vocab, decoding)):
                    words[int(w)] = vocab.labels[int(t)]
        records, page = explain_records(inner.float().eval(), tokenizer, task_type, vocab.labels if vocab else None,
                                        examples, records, tags=tags, temperature=decoding.temperature,
                                        target=cfg.explain_target, steps=cfg.explain_steps, max_length=max_length,
                                        device=device)
        write_page(out_dir / "explanations.html", page, title=f"minibert: what {cfg.init}'s predictions rest on")
        logger.info("minibert: %d explanations in %s", len(page), out_dir / "explanations.html")
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
    logger.info("minibert: %s predictions of %s in %s", len(examples), cfg.init, out_dir / "predictions.jsonl")
    results = {"eval": None, "test": None, "output_dir": str(out_dir)}
    if features and features[0].label is not None:
        results["test"] = score(task, outputs, features, vocab, decoding)
        if task_type in CALIBRATED_TASKS:  # with the uncalibrated figures beside when the model has a temperature
            temperature = decoding.temperature if TEMPERATURE_KEY in model.config.extra else None
            results["test"].update(calibration_report(task_type, np.stack(outputs), calibration_labels(features), temperature))
        logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
        results["test"]["per_class"] = per_class(task, outputs, features, vocab, decoding)
        write_json(out_dir / "test_results.json", results["test"])
    return results


def check_task_settings(cfg: FinetuneConfig, task: F.TaskData) -> None:
    """Settings that only some task types have: one line each, before anything is trained."""
    task_type = task.task_type
    allowed = task.metric_names or METRICS[task_type]
    if cfg.best_metric is not None and cfg.best_metric not in allowed:
        raise ValueError(f"--best-metric {cfg.best_metric}: a {task_type} task reports {', '.join(allowed)}; choose one")
    if cfg.crf and task_type != "token-classification":
        raise ValueError(f"--crf tags words in sequence: it needs --task-type token-classification, and this is {task_type}")
    if cfg.tune_thresholds and task_type != "multilabel":
        raise ValueError(f"--tune-thresholds sets a threshold per label of a multilabel task; a {task_type} task takes "
                         "the most probable class: drop it")
    if cfg.class_weights and cfg.crf:
        raise ValueError("--class-weights and --crf: the CRF's loss is over whole tag sequences, not per tag: drop one")


def calibration_labels(features) -> np.ndarray:
    """The labels calibration compares with: (N,) class ids, or (N, L) multi-hot for multilabel."""
    return np.stack([f.label for f in features])


def calibrate(model, task: F.TaskData, val_features, vocab, eval_results: dict | None, out_dir: Path, tokenizer,
              predict_fn, fit: bool) -> dict:
    """Temperature scaling: T fitted on the best model's validation logits (minimum NLL), saved in config.json as
    calibration_temperature, so that every prediction after it applies it. eval_results.json gains ece, brier and
    nll at T, the same at T = 1 beside them (ece_uncalibrated, ...) and T itself. fit=False (--no-calibrate):
    the three at T = 1 only, and no temperature saved."""
    logits, labels = np.stack(predict_fn(model, val_features)), calibration_labels(val_features)
    eval_results = dict(eval_results or {})
    temperature = fit_temperature(task.task_type, logits, labels) if fit else None
    if temperature is not None:
        saved = temperature_for_config(temperature, vocab.labels if task.task_type == "multilabel" else None)
        model.config.extra[TEMPERATURE_KEY] = saved
        model.save_pretrained(out_dir, tokenizer=tokenizer)
        eval_results[TEMPERATURE_KEY] = saved
        logger.info("minibert: calibration temperature %s",
                    saved if isinstance(saved, dict) else f"{saved:.4f}")
    report = calibration_report(task.task_type, logits, labels, temperature)
    logger.info("minibert: validation %s", ", ".join(f"{k} {v:.4f}" for k, v in report.items()))
    eval_results.update(report)
    write_json(out_dir / "eval_results.json", eval_results)
    return eval_results


def plot_calibration(path: Path, title: str, task_type: str, logits: np.ndarray, labels: np.ndarray,
                     temperature: float | list[float] | None) -> None:
    """reliability.png: accuracy against confidence at T = 1, and at the fitted temperature (None: not fitted)."""
    curves = {"before (T = 1)": top_label(task_type, logits, labels)}
    if temperature is not None:
        shown = f"{temperature:.3g}" if np.ndim(temperature) == 0 else "one per label"
        curves[f"after (T = {shown})"] = top_label(task_type, logits, labels, temperature)
    plot_reliability(path, curves, title=title)


def keep_tuned_thresholds(model, task: F.TaskData, val_features, vocab, eval_results: dict, out_dir: Path, tokenizer,
                          predict_fn) -> dict:
    """--tune-thresholds: each label's F1-best threshold on the validation set, saved in config.json (as
    label_thresholds) and in eval_results.json, with the validation scores at them (tuned on that data, so
    an optimistic estimate: the test set tells the truth). They are tuned on the probabilities as predicted, at
    the calibration temperature, so call it after calibrate()."""
    outputs = predict_fn(model, val_features)
    probs = probabilities("multilabel", np.stack(outputs), temperature_from_config(model.config.extra, vocab.labels))
    thresholds, untuned = tune_thresholds(probs, np.stack([f.label for f in val_features]), vocab.labels)
    if untuned:
        logger.warning("minibert: the validation set has no example of %s: %s keep the threshold 0.5",
                       ", ".join(untuned), "it" if len(untuned) == 1 else "they")
    model.config.extra[THRESHOLDS_KEY] = thresholds
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    decoding = Decoding.of(model, task.task_type, vocab, constrained=True)
    tuned = score(task, outputs, val_features, vocab, decoding)
    logger.info("minibert: label thresholds %s; validation at them: %s",
                ", ".join(f"{label} {t:.3f}" for label, t in thresholds.items()),
                ", ".join(f"{k} {v:.4f}" for k, v in tuned.items()))
    eval_results = {**(eval_results or {}), THRESHOLDS_KEY: thresholds, "at_tuned_thresholds": {
        **tuned, "per_class": per_class(task, outputs, val_features, vocab, decoding)}}
    write_json(out_dir / "eval_results.json", eval_results)
    return eval_results



# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, _stop_after_steps: int | None = None) -> dict:
    """Run fine-tuning; returns {"eval": metrics, "test": metrics or None, "output_dir": path, "train": figures,
    "main_metric": the validation metric that picked the best checkpoint}, and with --seeds "seeds" (what
    seeds_results.json holds) with the kept run's eval and test. _stop_after_steps simulates a kill after that
    many steps (for the resume test)."""
    cfg = parse_args(argv) if argv is None or isinstance(argv, list) else argv
    setup_logging()
    # Everything that can be wrong with the input is checked before any training.
    check_counts(cfg, at_least_one=("epochs", "batch_size", "eval_batch_size", "explain_steps"),
                 at_least_zero=("max_steps", "eval_steps", "save_steps", "early_stopping", "max_train_examples"))
    check_layer_lr_decay(cfg.layer_lr_decay)
    lora_settings(cfg)  # LoRA flags that contradict each other, or an adapter minibert cannot load
    if cfg.tag_scheme not in SCHEMES:
        raise ValueError(f"--tag-scheme {cfg.tag_scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if (cfg.explain or cfg.explain_target is not None) and not cfg.predict_only:
        raise ValueError("--explain explains the predictions of --predict-only: add --predict-only, with the fine-tuned "
                         "model as --init and the texts as --test-file")
    if cfg.seeds is not None:
        return finetune_seeds(cfg)
    return finetune(cfg, _stop_after_steps=_stop_after_steps)


def finetune_seeds(cfg: FinetuneConfig) -> dict:
    """--seeds: one fine-tuning per seed on the same data, in turn (minibert.seeds); the best kept in --output-dir."""
    seeds = parse_seeds(cfg.seeds)
    if cfg.predict_only:
        raise ValueError("--seeds fine-tunes once per seed, and --predict-only trains nothing: drop one of them")
    data_seed = seeds[0] if cfg.data_seed is None else cfg.data_seed
    dist = setup_distributed(cfg.device)
    with hold_output_dir(cfg.output_dir, dist):
        if dist.is_main:
            remove_earlier_results(cfg.output_dir)

        def run_one(seed: int, directory: Path) -> dict:
            return finetune(dataclasses.replace(cfg, seed=seed, seeds=None, data_seed=data_seed, output_dir=str(directory)))

        summary = run_seeds(seeds, run_one, cfg.output_dir, is_main=dist.is_main, barrier=dist.barrier)
    best = summary["runs"][str(summary["best_seed"])]
    return {"eval": best["eval"], "test": best["test"], "output_dir": cfg.output_dir, "main_metric": summary["metric"],
            "seeds": summary}


def finetune(cfg: FinetuneConfig, *, _stop_after_steps: int | None = None) -> dict:
    """One fine-tuning run (or --predict-only), from checked settings."""
    dist = setup_distributed(cfg.device)
    with hold_output_dir(cfg.output_dir, dist):  # the only live run there, from here to the end
        if cfg.predict_only:
            return predict_only(cfg)
        resolve_resume(cfg)  # may set cfg.resume: the same command continues a killed run
        check_attention_backend(cfg.attn_impl, dist.device)
        seed_everything(cfg.seed, dist.rank)

        init_dir, init_config = read_init(cfg)
        tokenizer = load_tokenizer(init_dir)  # before the data: span-annotated text is split into its words
        task = load_data(cfg, tokenizer)
        check_task_settings(cfg, task)
        max_length = F.max_length_for(init_config, cfg.max_length, cfg.init)
        vocab = choose_labels(cfg, task, init_dir, init_config)
        check_task_tokenizer(cfg, task, tokenizer, init_config)
        features = F.encode_task(tokenizer, task, vocab, max_length)
        model = build_model(cfg, task, vocab, init_dir)
        run = start_run(cfg, model, task, features, max_length, init_dir, dist,
                        loss_fn=loss_for(cfg, task, features, vocab))
        train_stats = train(cfg, run, task, features, vocab, tokenizer, stop_after_steps=_stop_after_steps)
        if "stopped_at" in train_stats:
            return train_stats
        return evaluate_and_write_results(cfg, run, task, features, vocab, tokenizer, train_stats)


if __name__ == "__main__":
    run_cli(main, parse_args, "train_finetune.py")
