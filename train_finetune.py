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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minibert import data as D
from minibert import finetuning as F
from minibert.assets import MINILM_HUB_ID
from minibert.config import BertConfig
from minibert.hub import resolve_model_dir
from minibert.metrics import MAIN_METRIC, compute_metrics
from minibert.tokenizer import load_tokenizer
from minibert.training import (
    Distributed,
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


# ----------------------------------------------------------------------------- the steps of main()
#
# Each step reads the settings it needs from the FinetuneConfig and calls minibert.finetuning, where
# the work is done (and where Python users find it).


def load_data(cfg: FinetuneConfig) -> F.TaskData:
    return F.load_task_data(
        task=cfg.task, data_dir=cfg.data_dir, train_file=cfg.train_file, validation_file=cfg.validation_file,
        test_file=cfg.test_file, task_type=cfg.task_type, text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
        validation_fraction=cfg.validation_fraction, max_train_examples=cfg.max_train_examples, seed=cfg.seed)


def read_init(cfg: FinetuneConfig) -> tuple[Path, BertConfig]:
    """--init's directory and config, read before the model so that a misfit stops the run early."""
    init_dir = resolve_model_dir(cfg.init)
    return init_dir, BertConfig.from_json_file(init_dir / "config.json")


def choose_labels(cfg: FinetuneConfig, task: F.TaskData, init_dir: Path, init_config: BertConfig):
    init_is_classifier = F.classifier_kind(init_config, init_dir) is not None
    return F.choose_labels(task, init_config, init=cfg.init, init_is_classifier=init_is_classifier,
                           reinit_head=cfg.reinit_head)


def load_task_tokenizer(cfg: FinetuneConfig, task: F.TaskData, init_dir: Path, init_config: BertConfig):
    tokenizer = load_tokenizer(init_dir)
    text_pairs = any(ex.text_pair is not None for ex in task.train[:1])
    F.check_tokenizer_fits(tokenizer, init_config, cfg.init, text_pairs=text_pairs)
    return tokenizer


def build_model(cfg: FinetuneConfig, task_type: str, vocab, init_dir: Path):
    # A resumed run's weights come from its checkpoint: what --init lacks is no news then.
    return F.build_model(task_type, vocab, init_dir, reinit_head=cfg.reinit_head, attn_impl=cfg.attn_impl,
                         dropout=cfg.dropout, freeze_embeddings=cfg.freeze_embeddings, freeze_layers=cfg.freeze_layers,
                         reinit_layers=cfg.reinit_layers, verbose=not cfg.resume)


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
              init_dir: Path, dist: Distributed) -> Run:
    """The Trainer, the state to start from (a checkpoint's when resuming), and the run's settings, saved."""
    out_dir = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, dist.device)
    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                layer_lr_decay=cfg.layer_lr_decay, precision=precision, compile=cfg.compile)
    schedule = F.Schedule.of(cfg)
    total_steps, epochs = schedule.steps([len(f) for f in features.train], dist)
    trainer = Trainer(model, settings, total_steps, out_dir, dist)
    # The settings as given (what --resume compares and restores), then what they resolved to.
    run_config = {**dataclasses.asdict(cfg), "resolved": {
        "precision": precision, "task_type": task.task_type, "task_name": task.name, "max_length": max_length,
        "total_steps": total_steps, "world_size": dist.world_size, "init_dir": str(init_dir)}}
    state = trainer.resume() if cfg.resume else TrainState()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        F.write_json(out_dir / "finetune_config.json", run_config)
        if not cfg.resume:
            remove_earlier_results(out_dir, RESULT_FILES)
        logger.info("minibert: %s, %s: %d train / %d validation / %s test examples, %d steps of %d x %d x %d",
                    task.name, task.task_type, len(features.train), len(features.validation),
                    len(features.test) if features.test else 0, total_steps, cfg.batch_size, cfg.grad_accum,
                    dist.world_size)
    return Run(trainer, state, schedule, epochs, run_config, task.main_metric or MAIN_METRIC[task.task_type])


def train(cfg: FinetuneConfig, run: Run, task: F.TaskData, features: F.TaskFeatures, vocab, tokenizer,
          stop_after_steps: int | None = None) -> dict:
    trainer, pad_id = run.trainer, tokenizer.token_to_id("[PAD]")

    def validate(model) -> dict[str, float]:
        outputs = predict(model, features.validation, cfg.eval_batch_size, pad_id, trainer.device, trainer.autocast)
        return score(task, outputs, features.validation, vocab)

    return F.train(trainer, run.state, features.train, run.schedule, epochs=run.epochs, pad_token_id=pad_id,
                   validate=validate, main_metric=run.main_metric, tokenizer=tokenizer, run_config=run.run_config,
                   progress=cfg.progress, stop_after_steps=stop_after_steps)


def evaluate_and_write_results(cfg: FinetuneConfig, run: Run, task: F.TaskData, features: F.TaskFeatures, vocab,
                               tokenizer, train_stats: dict) -> dict:
    """The best model on the test data (predictions.jsonl; test_results.json when it has labels), the
    run's figures, the training curves; then the resumable state, no longer needed, is removed."""
    trainer, state, out_dir = run.trainer, run.state, Path(cfg.output_dir)
    model, dist = trainer.model, trainer.dist
    results = {"eval": None, "test": None, "output_dir": str(out_dir), "train": train_stats}
    if dist.is_main:
        F.write_json(out_dir / "train_results.json", train_stats)
        if state.best_step is None:  # a resumed run that had nothing left to do
            model.save_pretrained(out_dir, tokenizer=tokenizer)
        best = type(model).from_pretrained(str(out_dir), verbose=False, attn_impl=model.config.attn_impl).to(dist.device)
        results["eval"] = json.loads((out_dir / "eval_results.json").read_text()) if (out_dir / "eval_results.json").exists() else None
        if features.test:
            pad_id = tokenizer.token_to_id("[PAD]")
            outputs = predict(best, features.test, cfg.eval_batch_size, pad_id, dist.device, trainer.autocast)
            records = prediction_records(task, task.test, outputs, features.test, vocab)
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # UTF-8: texts stay readable
            atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
            if features.test[0].label is not None:
                results["test"] = score(task, outputs, features.test, vocab)
                F.write_json(out_dir / "test_results.json", results["test"])
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", "loss", (run.main_metric,))
        trainer.remove_checkpoints()
        logger.info("minibert: best %s %.4f (step %s); model in %s", run.main_metric,
                    float("nan") if state.best_metric is None else state.best_metric, state.best_step, out_dir)
        if results["test"]:
            logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
    dist.barrier()
    return results


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


def score(task: F.TaskData, outputs, features, vocab) -> dict[str, float]:
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


def prediction_records(task: F.TaskData, examples, outputs, features, vocab) -> list[dict]:
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
    kind = F.classifier_kind(config, init_dir)
    if kind == "token":
        task_type = "token-classification"
    elif kind == "sequence":
        guess = "regression" if config.num_labels == 1 else "classification"  # HF's rule without a problem_type
        task_type = {"regression": "regression", "multi_label_classification": "multilabel",
                     "single_label_classification": "classification"}.get(config.problem_type, guess)
    else:
        raise D.DataError(f"--predict-only needs a fine-tuned model as --init, and {cfg.init} has no classifier head: "
                          "fine-tune it first (drop --predict-only)")
    vocab = None if task_type == "regression" else D.LabelVocab(F.checkpoint_labels(config))
    max_length = F.max_length_for(config, cfg.max_length, cfg.init)
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
    examples = D.load_examples(cfg.test_file, task_type=task_type, flag="--test-file", require_labels=False, **columns)
    tokenizer = load_tokenizer(init_dir)
    F.check_tokenizer_fits(tokenizer, config, cfg.init, text_pairs=bool(cfg.text_pair_column))
    pad_id = tokenizer.token_to_id("[PAD]")
    features = D.encode_examples(tokenizer, examples, max_length=max_length, task_type=task_type, label_vocab=vocab,
                                 source="the test data")
    device = setup_distributed(cfg.device).device
    check_attention_backend(cfg.attn_impl, device)
    precision = resolve_precision(cfg.precision, device)
    overrides = {"attn_impl": cfg.attn_impl} if cfg.attn_impl else {}
    model = F.model_class(task_type).from_pretrained(str(init_dir), verbose=False, **overrides)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = lambda: torch.autocast(device.type, dtype=dtypes[precision]) if precision in dtypes else contextlib.nullcontext()  # noqa: E731
    outputs = predict(model.to(device), features, cfg.eval_batch_size, pad_id, device, autocast)
    task = F.TaskData(task_type, [], [], examples, Path(cfg.test_file).stem)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_records(task, examples, outputs, features, vocab))
    atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
    logger.info("minibert: %s predictions of %s in %s", len(examples), cfg.init, out_dir / "predictions.jsonl")
    results = {"eval": None, "test": None, "output_dir": str(out_dir)}
    if features and features[0].label is not None:
        results["test"] = score(task, outputs, features, vocab)
        F.write_json(out_dir / "test_results.json", results["test"])
        logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
    return results


# What a finished run leaves in --output-dir besides the model: a new run there removes them first.
RESULT_FILES = ("eval_results.json", "test_results.json", "train_results.json", "predictions.jsonl", "metrics.jsonl",
                "training_curves.png")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, _stop_after_steps: int | None = None) -> dict:
    """Run fine-tuning; returns {"eval": metrics, "test": metrics or None, "output_dir": path, "train": figures}.
    _stop_after_steps simulates a kill after that many steps (for the resume test)."""
    cfg = parse_args(argv) if argv is None or isinstance(argv, list) else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Everything that can be wrong with the input is checked before any training.
    check_counts(cfg, at_least_one=("epochs", "batch_size", "eval_batch_size"),
                 at_least_zero=("max_steps", "eval_steps", "save_steps", "early_stopping", "max_train_examples"))
    check_layer_lr_decay(cfg.layer_lr_decay)
    if cfg.predict_only:
        return predict_only(cfg)
    start_output_dir(cfg)  # may set cfg.resume: the same command continues a killed run
    dist = setup_distributed(cfg.device)
    check_attention_backend(cfg.attn_impl, dist.device)
    seed_everything(cfg.seed)

    task = load_data(cfg)
    init_dir, init_config = read_init(cfg)
    max_length = F.max_length_for(init_config, cfg.max_length, cfg.init)
    vocab = choose_labels(cfg, task, init_dir, init_config)
    tokenizer = load_task_tokenizer(cfg, task, init_dir, init_config)
    features = F.encode_task(tokenizer, task, vocab, max_length)
    model = build_model(cfg, task.task_type, vocab, init_dir)
    run = start_run(cfg, model, task, features, max_length, init_dir, dist)
    train_stats = train(cfg, run, task, features, vocab, tokenizer, stop_after_steps=_stop_after_steps)
    if "stopped_at" in train_stats:
        return train_stats
    return evaluate_and_write_results(cfg, run, task, features, vocab, tokenizer, train_stats)


if __name__ == "__main__":
    run_cli(main)
