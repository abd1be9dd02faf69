r"""Fine-tune a pretrained BERT on labelled text: classification, regression, multi-label, or token tags.

    # The built-in task, offline: movie-review sentence polarity from the pretrained MiniLM (~7 min on 2 CPU cores)
    python train_finetune.py
    # A quick check that everything works (about a minute on a laptop CPU)
    python train_finetune.py --max-steps 30 --eval-steps 30 --output-dir runs/quick
    # Your own data: CSV, TSV or JSON Lines, single texts or pairs, string or integer labels
    python train_finetune.py --init bert-base-uncased --train-file train.csv --validation-file dev.csv \
        --test-file test.csv --text-column review --label-column stars
    python train_finetune.py --init bert-base-uncased --train-file train.jsonl --validation-file dev.jsonl \
        --text-pair-column hypothesis --task-type classification
    # Regression, multi-label, named entities (CoNLL files or JSON Lines with "tokens" and "tags")
    python train_finetune.py --task-type regression --train-file train.tsv --validation-file dev.tsv --label-column score
    python train_finetune.py --task-type token-classification --train-file train.conll --validation-file dev.conll
    # GLUE, from the GLUE download's folders
    python train_finetune.py --init bert-base-uncased --task mrpc --data-dir glue_data/MRPC
    # Several GPUs: the same command under torchrun
    torchrun --nproc_per_node 8 train_finetune.py --init bert-base-uncased --task mnli --data-dir glue_data --precision bf16
    # A killed run continues exactly where it stopped, with the settings it was started with
    python train_finetune.py --output-dir runs/x --resume
    # Label new data with a fine-tuned model (predictions.jsonl; test_results.json when it has labels)
    python train_finetune.py --init runs/x --predict-only --test-file new.csv --output-dir runs/x-new

Writes to --output-dir: the best model as an HF directory (config.json with id2label, model.safetensors,
tokenizer files) that `--init DIR`, minibert and transformers' AutoModelFor... load; eval_results.json
and test_results.json; train_results.json (steps, seconds, examples/s); predictions.jsonl for the test set; metrics.jsonl; training_curves.png;
finetune_config.json (the resolved settings); checkpoint/ while the run is in progress (for --resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minibert import data as D
from minibert.assets import MINILM_HUB_ID
from minibert.checkpoint import weight_names
from minibert.config import BertConfig
from minibert.hub import resolve_model_dir
from minibert.metrics import MAIN_METRIC, compute_metrics, greater_is_better
from minibert.model import BertForSequenceClassification, BertForTokenClassification
from minibert.tokenizer import load_tokenizer
from minibert.training import (
    Distributed,
    Throughput,
    Trainer,
    TrainingSettings,
    TrainState,
    atomic_write_text,
    check_attention_backend,
    check_counts,
    check_layer_lr_decay,
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


@dataclass
class FinetuneConfig:
    # --- model ---
    init: str = MINILM_HUB_ID  # hub id, HF directory, or a directory minibert wrote (train_pretrain.py's too)
    reinit_head: bool = False  # train a new head when --init is a classifier for other labels
    attn_impl: str | None = None  # eager | sdpa | triton; None keeps the checkpoint's (sdpa by default)
    dropout: float | None = None  # overrides hidden and attention dropout; None keeps the checkpoint's (0.1)
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
    # --- running ---
    output_dir: str = "runs/finetune"
    eval_steps: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    # Also write a resumable checkpoint every N steps between evaluations (0 = only at evaluations), so a
    # killed run loses at most N steps even when it evaluates once an epoch. HF Trainer's default is 500.
    save_steps: int = 500
    early_stopping: int = 0  # stop after N evaluations without improvement; 0 = never
    precision: str = "auto"  # fp32 | bf16 | fp16; auto = bf16 on a GPU that supports it, fp32 on CPU
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    device: str | None = None  # cuda | cpu; default: the GPU if there is one
    resume: bool = False  # continue the run in --output-dir from its last checkpoint, with the settings it was started with
    # Train nothing: the fine-tuned model --init labels --test-file, into --output-dir/predictions.jsonl
    # (and test_results.json when the file has labels). The task type and labels are the model's own.
    predict_only: bool = False
    progress: bool = True  # show the progress bar


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    return parse_settings(FinetuneConfig, argv, __doc__)


# ----------------------------------------------------------------------------- data


@dataclass
class TaskData:
    task_type: str
    train: list
    validation: list
    test: list | None
    name: str
    metric_names: tuple[str, ...] | None = None  # None: every metric of the task type
    main_metric: str | None = None
    label_order: tuple[str, ...] | None = None  # fixed label ids (GLUE's), else sorted training labels


def hold_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random share of the examples as validation data, the rest (in their order) for training."""
    if not 0 < fraction < 1:
        raise ValueError(f"--validation-fraction must be between 0 and 1, got {fraction}")
    count = max(1, round(fraction * len(examples)))
    if len(examples) - count < 1:
        raise D.DataError(f"--train-file has {len(examples)} example(s): too few to hold some out for validation; "
                          "give a --validation-file")
    held = set(np.random.default_rng(seed).choice(len(examples), count, replace=False).tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def load_task_data(cfg: FinetuneConfig) -> TaskData:
    files = cfg.train_file or cfg.validation_file or cfg.test_file
    if cfg.task and files:
        raise D.DataError("give either --task (GLUE) or --train-file/--validation-file, not both")
    if cfg.task and cfg.task.lower() not in ("movie-reviews", "movie_reviews"):  # those name the built-in default
        if not cfg.data_dir:
            raise D.DataError(f"--task {cfg.task} needs --data-dir, the folder of the GLUE download holding its TSV files")
        train, validation, test, spec = D.load_glue(cfg.task, cfg.data_dir)
        return TaskData(spec.task_type, train, validation, test, f"glue-{cfg.task.lower()}", spec.metrics,
                        spec.main_metric, spec.labels)
    if files:
        if not cfg.train_file:
            raise D.DataError("give --train-file, the labelled examples to train on (--validation-file and --test-file "
                              "are optional)")
        task_type = cfg.task_type
        if task_type is None:
            task_type, reason = D.infer_task_type(cfg.train_file, text_column=cfg.text_column, label_column=cfg.label_column)
            logger.info("minibert: treating the data as %s: %s (--task-type chooses)", task_type, reason)
        columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
        train = D.load_examples(cfg.train_file, task_type=task_type, flag="--train-file", **columns)
        if cfg.validation_file:
            validation = D.load_examples(cfg.validation_file, task_type=task_type, flag="--validation-file", **columns)
        else:
            train, validation = hold_out(train, cfg.validation_fraction, cfg.seed)
            logger.info("minibert: no --validation-file: %d of the %d training examples (--validation-fraction %g, "
                        "chosen by --seed) are held out for validation", len(validation), len(train) + len(validation),
                        cfg.validation_fraction)
        test = None
        if cfg.test_file:
            test = D.load_examples(cfg.test_file, task_type=task_type, flag="--test-file", require_labels=False, **columns)
        return TaskData(task_type, train, validation, test, Path(cfg.train_file).stem)
    task_type = cfg.task_type or "classification"
    train, validation, test = D.movie_reviews(task_type)
    return TaskData(task_type, train, validation, test, "movie-reviews")


# ----------------------------------------------------------------------------- model


MODEL_CLASSES = {"token-classification": BertForTokenClassification}
PROBLEM_TYPES = {"classification": "single_label_classification", "multilabel": "multi_label_classification",
                 "regression": "regression", "token-classification": None}


def classifier_kind(config: BertConfig, init_dir: Path) -> str | None:
    """Which head --init has: "token" or "sequence" (a classifier), or None. transformers names it in
    config.json's architectures; without that, a classifier.weight in the weights still makes it one."""
    architectures = config.extra.get("architectures")
    if not architectures:
        return "sequence" if "classifier.weight" in weight_names(init_dir) else None
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "token"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence"
    return None


def checkpoint_labels(config: BertConfig) -> list[str]:
    """A classifier checkpoint's label names by id. transformers leaves id2label out of config.json when
    the names are its defaults, LABEL_0, LABEL_1, ..., which is what a model trained on integer labels
    has: such labels are the ids themselves, "0", "1", ... (the names data with integer labels uses)."""
    if config.id2label:
        names = [config.id2label[i] for i in range(len(config.id2label))]
    else:
        names = [f"LABEL_{i}" for i in range(config.num_labels)]
    if names == [f"LABEL_{i}" for i in range(len(names))]:
        return [str(i) for i in range(len(names))]
    return names


def check_tokenizer_fits(tokenizer, config: BertConfig, init: str, text_pairs: bool) -> None:
    """Token ids the model has no embedding for would stop a run at the first batch that holds one."""
    if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise ValueError(
            f"the tokenizer of --init {init} has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model "
            f"only {config.vocab_size} word embeddings: the tokenizer files belong to another model; put the "
            "checkpoint's own tokenizer (vocab.txt / tokenizer.json) next to its weights"
        )
    if text_pairs and config.type_vocab_size < 2:
        raise ValueError(f"--text-pair-column needs two segment (token type) embeddings, and --init {init} has "
                         f"type_vocab_size {config.type_vocab_size}: join the two texts into one column instead")


def choose_labels(cfg: FinetuneConfig, task: TaskData, init_config: BertConfig, init_is_classifier: bool):
    """The label vocabulary, and whether the head must be new. A classifier --init keeps its own label
    ids when the data's labels are the same set; other labels need --reinit-head."""
    if task.task_type == "regression":
        if init_is_classifier and init_config.num_labels != 1 and not cfg.reinit_head:
            raise D.DataError(
                f"--init {cfg.init} is a classifier with {init_config.num_labels} labels, but this is a regression "
                "task: pass --reinit-head to train a new (one-output) head"
            )
        return None
    if task.label_order is not None:
        vocab = D.LabelVocab(task.label_order)
    else:
        vocab = D.LabelVocab.from_examples(task.train, task.task_type)
    if init_is_classifier and not cfg.reinit_head:
        theirs = checkpoint_labels(init_config)
        if sorted(theirs) == sorted(vocab.labels):  # same labels: continue with the checkpoint's head and ids
            logger.info("minibert: keeping the classifier head of --init %s and its label ids %s", cfg.init,
                        dict(enumerate(theirs)))
            return D.LabelVocab(theirs)
        raise D.DataError(
            f"--init {cfg.init} is a classifier for labels {theirs}, but the training data has labels {vocab.labels}: "
            "pass --reinit-head to train a new head, or use data with the checkpoint's labels"
        )
    return vocab


def build_model(cfg: FinetuneConfig, task: TaskData, vocab, init_dir: Path):
    cls = MODEL_CLASSES.get(task.task_type, BertForSequenceClassification)
    overrides = dict(
        num_labels=1 if vocab is None else len(vocab),
        id2label={0: "score"} if vocab is None else dict(enumerate(vocab.labels)),
        problem_type=PROBLEM_TYPES[task.task_type],
    )
    if cfg.attn_impl:
        overrides["attn_impl"] = cfg.attn_impl
    if cfg.dropout is not None:
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    # A resumed run's weights come from its checkpoint: what --init lacks is no news then.
    model = cls.from_pretrained(str(init_dir), reinit_head=cfg.reinit_head, verbose=not cfg.resume, **overrides)
    if cfg.freeze_embeddings:
        model.bert.embeddings.requires_grad_(False)
    if cfg.freeze_layers:
        if cfg.freeze_layers > len(model.bert.layers):
            raise ValueError(f"--freeze-layers {cfg.freeze_layers}: the model has only {len(model.bert.layers)} layers")
        for layer in model.bert.layers[: cfg.freeze_layers]:
            layer.requires_grad_(False)
    if cfg.reinit_layers:
        if cfg.reinit_layers > len(model.bert.layers):
            raise ValueError(f"--reinit-layers {cfg.reinit_layers}: the model has only {len(model.bert.layers)} layers")
        for part in [*model.bert.layers[len(model.bert.layers) - cfg.reinit_layers:], model.bert.pooler]:
            if part is not None:
                model.init_weights(part)
    return model


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model, features, batch_size: int, pad_token_id: int, device, autocast) -> list[np.ndarray]:
    """Raw outputs per example, in example order: (L,) logits, or (T, L) per-token logits."""
    model.eval()
    batches = D.eval_batches([len(f) for f in features], batch_size)
    outputs = []
    for batch in batches:
        inputs = D.collate([features[i] for i in batch], pad_token_id)
        inputs.pop("labels", None)
        with autocast():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu().numpy()
        outputs.append([logits[row, : len(features[i])] if logits.ndim == 3 else logits[row] for row, i in enumerate(batch)])
    return D.in_original_order(batches, outputs)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def score(task: TaskData, outputs, features, vocab) -> dict[str, float]:
    id2label = dict(enumerate(vocab.labels)) if vocab is not None else None
    if task.task_type == "classification":
        preds, refs = np.stack(outputs), np.array([f.label for f in features])
    elif task.task_type == "regression":
        preds, refs = np.stack(outputs)[:, 0], np.array([f.label for f in features])
    elif task.task_type == "multilabel":
        preds, refs = 1 / (1 + np.exp(-np.stack(outputs))), np.stack([f.label for f in features])
    else:
        preds = [o.argmax(-1)[f.label != D.IGNORE_INDEX] for o, f in zip(outputs, features)]
        refs = [f.label[f.label != D.IGNORE_INDEX] for f in features]
    return compute_metrics(task.task_type, preds, refs, id2label=id2label, metric_names=task.metric_names)


def prediction_records(task: TaskData, examples, outputs, features, vocab) -> list[dict]:
    records = []
    for ex, out, feat in zip(examples, outputs, features):
        record = {"text": ex.text} if ex.text_pair is None else {"text": ex.text, "text_pair": ex.text_pair}
        if task.task_type == "classification":
            probs = _softmax(out)
            record.update(label=vocab.labels[int(probs.argmax())], probabilities=dict(zip(vocab.labels, probs.round(6).tolist())))
        elif task.task_type == "regression":
            record["prediction"] = float(out[0])
        elif task.task_type == "multilabel":
            probs = 1 / (1 + np.exp(-out))
            record.update(labels=[l for l, p in zip(vocab.labels, probs) if p >= 0.5],
                          probabilities=dict(zip(vocab.labels, probs.round(6).tolist())))
        else:
            first = feat.word_ids >= 0
            tags = {int(w): vocab.labels[int(t)] for w, t in zip(feat.word_ids[first], out[first].argmax(-1))}
            record = {"tokens": ex.text, "tags": [tags.get(i) for i in range(len(ex.text))]}  # None: cut by --max-length
        if ex.label is not None:
            record["gold"] = ex.label
        records.append(record)
    return records


def predict_only(cfg: FinetuneConfig) -> dict:
    """--predict-only: a fine-tuned model (--init) labels --test-file; nothing is trained."""
    if not cfg.test_file:
        raise D.DataError("--predict-only needs --test-file, the examples to label")
    init_dir = resolve_model_dir(cfg.init)
    config = BertConfig.from_json_file(init_dir / "config.json")
    kind = classifier_kind(config, init_dir)
    if kind == "token":
        task_type = "token-classification"
    elif kind == "sequence":
        guess = "regression" if config.num_labels == 1 else "classification"  # HF's rule without a problem_type
        task_type = {"regression": "regression", "multi_label_classification": "multilabel",
                     "single_label_classification": "classification"}.get(config.problem_type, guess)
    else:
        raise D.DataError(f"--predict-only needs a fine-tuned model as --init, and {cfg.init} has no classifier head: "
                          "fine-tune it first (drop --predict-only)")
    vocab = None if task_type == "regression" else D.LabelVocab(checkpoint_labels(config))
    max_length = cfg.max_length or min(128, config.max_position_embeddings)
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the {config.max_position_embeddings} positions of --init "
                         f"{cfg.init}: use --max-length {config.max_position_embeddings} or less")
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
    examples = D.load_examples(cfg.test_file, task_type=task_type, flag="--test-file", require_labels=False, **columns)
    tokenizer = load_tokenizer(init_dir)
    check_tokenizer_fits(tokenizer, config, cfg.init, text_pairs=bool(cfg.text_pair_column))
    pad_id = tokenizer.token_to_id("[PAD]")
    features = D.encode_examples(tokenizer, examples, max_length=max_length, task_type=task_type, label_vocab=vocab,
                                 source="the test data")
    device = setup_distributed(cfg.device).device
    check_attention_backend(cfg.attn_impl, device)
    precision = resolve_precision(cfg.precision, device)
    overrides = {"attn_impl": cfg.attn_impl} if cfg.attn_impl else {}
    model = MODEL_CLASSES.get(task_type, BertForSequenceClassification).from_pretrained(str(init_dir), verbose=False, **overrides)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = lambda: torch.autocast(device.type, dtype=dtypes[precision]) if precision in dtypes else contextlib.nullcontext()  # noqa: E731
    outputs = predict(model.to(device), features, cfg.eval_batch_size, pad_id, device, autocast)
    task = TaskData(task_type, [], [], examples, Path(cfg.test_file).stem)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_records(task, examples, outputs, features, vocab))
    atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
    logger.info("minibert: %s predictions of %s in %s", len(examples), cfg.init, out_dir / "predictions.jsonl")
    results = {"eval": None, "test": None, "output_dir": str(out_dir)}
    if features and features[0].label is not None:
        results["test"] = score(task, outputs, features, vocab)
        _write_json(out_dir / "test_results.json", results["test"])
        logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
    return results


# What a finished run leaves in --output-dir besides the model: a new run there removes them first.
RESULT_FILES = ("eval_results.json", "test_results.json", "train_results.json", "predictions.jsonl", "metrics.jsonl",
                "training_curves.png")


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, _stop_after_steps: int | None = None) -> dict:
    """Run fine-tuning; returns {"eval": metrics, "test": metrics or None, "output_dir": path}.
    _stop_after_steps simulates a kill after that many steps (for the resume test)."""
    cfg = parse_args(argv) if argv is None or isinstance(argv, list) else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Everything that can be wrong with the input is checked here, before any training.
    check_counts(cfg, at_least_one=("epochs", "batch_size", "eval_batch_size"),
                 at_least_zero=("max_steps", "eval_steps", "save_steps", "early_stopping", "max_train_examples"))
    check_layer_lr_decay(cfg.layer_lr_decay)
    if cfg.predict_only:
        return predict_only(cfg)
    start_output_dir(cfg)  # may set cfg.resume: the same command continues a killed run
    dist = setup_distributed(cfg.device)
    check_attention_backend(cfg.attn_impl, dist.device)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, dist.device)

    task = load_task_data(cfg)
    if 0 < cfg.max_train_examples < len(task.train):
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(task.train), cfg.max_train_examples, replace=False))
        task.train = [task.train[i] for i in keep]
    init_dir = resolve_model_dir(cfg.init)
    init_config = BertConfig.from_json_file(init_dir / "config.json")
    max_length = cfg.max_length or min(128, init_config.max_position_embeddings)
    if max_length > init_config.max_position_embeddings:
        raise ValueError(
            f"--max-length {max_length} exceeds the {init_config.max_position_embeddings} positions of --init "
            f"{cfg.init}: use --max-length {init_config.max_position_embeddings} or less"
        )
    vocab = choose_labels(cfg, task, init_config, classifier_kind(init_config, init_dir) is not None)
    if task.task_type == "classification" and len(vocab) < 2:
        raise D.DataError(f"the training data has one label only ({vocab.labels[0]!r}): a classifier needs examples "
                          "of at least two labels (for a score, pass --task-type regression)")
    tokenizer = load_tokenizer(init_dir)
    check_tokenizer_fits(tokenizer, init_config, cfg.init, text_pairs=any(ex.text_pair is not None for ex in task.train[:1]))
    pad_id = tokenizer.token_to_id("[PAD]")
    encode = lambda examples, source: D.encode_examples(  # noqa: E731
        tokenizer, examples, max_length=max_length, task_type=task.task_type, label_vocab=vocab, source=source)
    train_features = encode(task.train, "the training data")
    val_features = encode(task.validation, "the validation data")
    test_features = encode(task.test, "the test data") if task.test else None
    model = build_model(cfg, task, vocab, init_dir)

    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                layer_lr_decay=cfg.layer_lr_decay, precision=precision, compile=cfg.compile)
    lengths = [len(f) for f in train_features]
    chunk_batches = 50 if cfg.group_by_length else 1  # sorting within one batch only leaves batches random
    batches_per_epoch = len(D.train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=0,
                                            rank=dist.rank, world_size=dist.world_size, chunk_batches=chunk_batches))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    trainer = Trainer(model, settings, total_steps, out_dir, dist)
    # The settings as given (what --resume compares and restores), then what they resolved to.
    run_config = {**dataclasses.asdict(cfg), "resolved": {
        "precision": precision, "task_type": task.task_type, "task_name": task.name, "max_length": max_length,
        "total_steps": total_steps, "world_size": dist.world_size, "init_dir": str(init_dir)}}
    state = trainer.resume() if cfg.resume else TrainState()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "finetune_config.json", run_config)
        if not cfg.resume:
            remove_earlier_results(out_dir, RESULT_FILES)
        logger.info("minibert: %s, %s: %d train / %d validation / %s test examples, %d steps of %d x %d x %d",
                    task.name, task.task_type, len(train_features), len(val_features),
                    len(test_features) if test_features else 0, total_steps, cfg.batch_size, cfg.grad_accum, dist.world_size)

    main_metric = task.main_metric or MAIN_METRIC[task.task_type]
    better = greater_is_better(main_metric)

    def evaluate_and_keep_best() -> bool:
        """Score the validation set, save the model if it is the best so far; True to stop early."""
        metrics = score(task, predict(model, val_features, cfg.eval_batch_size, pad_id, dist.device, trainer.autocast),
                        val_features, vocab) if dist.is_main else {}
        if dist.is_main:
            trainer.log_metrics({"split": "eval", "step": state.step, "epoch": state.epoch, **metrics})
            value = metrics[main_metric]
            if state.best_metric is None or (value > state.best_metric if better else value < state.best_metric):
                state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
                model.save_pretrained(out_dir, tokenizer=tokenizer)
                _write_json(out_dir / "eval_results.json", {**metrics, "step": state.step, "epoch": state.epoch})
            else:
                state.evals_without_improvement += 1
            tqdm.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                       + f" (best {main_metric} {state.best_metric:.4f} at step {state.best_step})")
        stop = [bool(cfg.early_stopping) and state.evals_without_improvement >= cfg.early_stopping]
        if dist.enabled:
            torch.distributed.broadcast_object_list(stop)
        return stop[0]

    bar = tqdm(total=total_steps, initial=state.step, disable=not (dist.is_main and cfg.progress), desc="fine-tuning",
               dynamic_ncols=True)
    speed = Throughput()
    train_seconds, examples_trained = 0.0, 0  # training alone, without evaluation and saving
    stopped_early = False
    while state.step < total_steps and state.epoch < epochs and not stopped_early:
        batches = D.train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=state.epoch, rank=dist.rank,
                                  world_size=dist.world_size, skip=state.batch_in_epoch, chunk_batches=chunk_batches)
        for start in range(0, len(batches), cfg.grad_accum):
            group = batches[start : start + cfg.grad_accum]
            step_start = time.perf_counter()
            micro = [D.collate([train_features[i] for i in batch], pad_id) for batch in group]
            result = trainer.step(micro)
            train_seconds += time.perf_counter() - step_start
            state.step += 1
            state.batch_in_epoch += len(group)
            n = sum(len(b) for b in group) * dist.world_size
            state.examples_seen += n
            examples_trained += n
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}", ex_s=f"{speed.update(n):.0f}")
            trainer.log_metrics({"split": "train", "step": state.step, "epoch": state.epoch, "loss": result["loss"],
                                 "lr": result["lr"], "grad_norm": result["grad_norm"]})
            epoch_done = start + cfg.grad_accum >= len(batches)  # `batches` holds what is left of this epoch
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            evaluate_now = (cfg.eval_steps and state.step % cfg.eval_steps == 0) or (not cfg.eval_steps and epoch_done)
            if evaluate_now or state.step == total_steps:
                stopped_early = evaluate_and_keep_best()
            save_now = evaluate_now or (cfg.save_steps and state.step % cfg.save_steps == 0)
            if save_now and state.step < total_steps and not stopped_early:
                trainer.save_checkpoint(state, tokenizer=tokenizer, run_config=run_config)
            if _stop_after_steps is not None and state.step >= _stop_after_steps:
                bar.close()
                return {"stopped_at": state.step}
            if state.step >= total_steps or stopped_early:
                break
    bar.close()

    results = {"eval": None, "test": None, "output_dir": str(out_dir),
               "train": {"steps": state.step, "seconds": round(train_seconds, 2),
                         "examples_per_s": round(examples_trained / max(train_seconds, 1e-9), 1)}}
    if dist.is_main:
        _write_json(out_dir / "train_results.json", results["train"])
        if state.best_step is None:  # a resumed run that had nothing left to do
            model.save_pretrained(out_dir, tokenizer=tokenizer)
        best = type(model).from_pretrained(str(out_dir), verbose=False, attn_impl=model.config.attn_impl).to(dist.device)
        results["eval"] = json.loads((out_dir / "eval_results.json").read_text()) if (out_dir / "eval_results.json").exists() else None
        if test_features:
            outputs = predict(best, test_features, cfg.eval_batch_size, pad_id, dist.device, trainer.autocast)
            records = prediction_records(task, task.test, outputs, test_features, vocab)
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # UTF-8: texts stay readable
            atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
            if test_features[0].label is not None:
                results["test"] = score(task, outputs, test_features, vocab)
                _write_json(out_dir / "test_results.json", results["test"])
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", "loss", (main_metric,))
        # The run is complete: the resumable state is no longer needed.
        trainer.remove_checkpoints()
        logger.info("minibert: best %s %.4f (step %s); model in %s", main_metric, float("nan") if state.best_metric is None else state.best_metric,
                    state.best_step, out_dir)
        if results["test"]:
            logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
    dist.barrier()
    return results


if __name__ == "__main__":
    run_cli(main)
