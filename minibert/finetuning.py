"""Fine-tuning as a library: each step train_finetune.py runs, callable from Python.

    task = load_task_data(train_file="train.csv", validation_file="dev.csv")    # or task="mrpc", data_dir=...
    init_dir = resolve_model_dir("bert-base-uncased")
    init_config = BertConfig.from_json_file(init_dir / "config.json")
    vocab = choose_labels(task, init_config, init="bert-base-uncased")          # None for regression
    tokenizer = load_tokenizer(init_dir)
    check_tokenizer_fits(tokenizer, init_config, "bert-base-uncased", text_pairs=False)
    features = encode_task(tokenizer, task, vocab, max_length_for(init_config, None, "bert-base-uncased"))
    model = build_model(task.task_type, vocab, init_dir)
    schedule = Schedule(batch_size=32, grad_accum=1, seed=42, group_by_length=True, epochs=3, max_steps=0,
                        eval_steps=0, save_steps=500, early_stopping=0)
    total_steps, epochs = schedule.steps([len(f) for f in features.train], Distributed())
    trainer = Trainer(model, TrainingSettings(...), total_steps, "runs/x")
    train(trainer, TrainState(), features.train, schedule, epochs=epochs, pad_token_id=tokenizer.token_to_id("[PAD]"),
          validate=lambda model: {"accuracy": ...}, main_metric="accuracy")

Task types and their models: "classification", "multilabel" and "regression" fine-tune a
BertForSequenceClassification (regression with one output), "token-classification" a
BertForTokenClassification. A checkpoint that already is a classifier keeps its head and label ids
when the data has the same labels; other labels need reinit_head.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minibert.atomic_write import write_json
from minibert.checkpoint import weight_names
from minibert.config import IGNORE_INDEX, BertConfig
from minibert.crf import BertCRFForTokenClassification
from minibert.data.batching import collate, train_batches
from minibert.data.encoding import Features, encode_examples
from minibert.data.examples import DataError
from minibert.data.labels import LabelVocab
from minibert.data.readers import infer_task_type, load_examples
from minibert.data.tasks import load_glue, movie_reviews
from minibert.hub import resolve_model_dir
from minibert.lora import LoraModel, LoraSettings, read_adapter_config, read_adapter_weights
from minibert.metrics import greater_is_better
from minibert.model import (
    BertForSequenceClassification,
    BertForTokenClassification,
    PreTrainedBert,
    classification_loss,
)
from minibert.progress import Progress
from minibert.tokenizer import load_tokenizer
from minibert.training import Distributed, Throughput, Trainer, TrainState

logger = logging.getLogger("minibert")

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
        raise DataError(f"--train-file has {len(examples)} example(s): too few to hold some out for validation; "
                        "give a --validation-file")
    held = set(np.random.default_rng(seed).choice(len(examples), count, replace=False).tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def load_task_data(
    *,
    task: str | None = None,
    data_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    task_type: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    validation_fraction: float = 0.1,
    max_train_examples: int = 0,
    seed: int = 42,
    tokenizer=None,
    tag_scheme: str = "bio",
) -> TaskData:
    """The examples to train, validate and test on: a GLUE task (task + data_dir), files (train_file, and
    validation_file or else a validation_fraction of it held out), or nothing for the built-in
    movie-review task. max_train_examples > 0 keeps a random subset (chosen by seed) of the training data.
    Span-annotated text (token classification) is split into words by the tokenizer and tagged in tag_scheme."""
    files = train_file or validation_file or test_file
    if task and files:
        raise DataError("give either --task (GLUE) or --train-file/--validation-file, not both")
    if task and task.lower() not in ("movie-reviews", "movie_reviews"):  # those name the built-in default
        if not data_dir:
            raise DataError(f"--task {task} needs --data-dir, the folder of the GLUE download holding its TSV files")
        train, validation, test, spec = load_glue(task, data_dir)
        data = TaskData(spec.task_type, train, validation, test, f"glue-{task.lower()}", spec.metrics,
                        spec.main_metric, spec.labels)
    elif files:
        if not train_file:
            raise DataError("give --train-file, the labelled examples to train on (--validation-file and --test-file "
                            "are optional)")
        if task_type is None:
            task_type, reason = infer_task_type(train_file, text_column=text_column, label_column=label_column)
            logger.info("minibert: treating the data as %s: %s (--task-type chooses)", task_type, reason)
        columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                       tokenizer=tokenizer, tag_scheme=tag_scheme)
        train = load_examples(train_file, task_type=task_type, flag="--train-file", **columns)
        if validation_file:
            validation = load_examples(validation_file, task_type=task_type, flag="--validation-file", **columns)
        else:
            train, validation = hold_out(train, validation_fraction, seed)
            logger.info("minibert: no --validation-file: %d of the %d training examples (--validation-fraction %g, "
                        "chosen by --seed) are held out for validation", len(validation), len(train) + len(validation),
                        validation_fraction)
        test = None
        if test_file:
            test = load_examples(test_file, task_type=task_type, flag="--test-file", require_labels=False, **columns)
        data = TaskData(task_type, train, validation, test, Path(train_file).stem)
    else:
        task_type = task_type or "classification"
        train, validation, test = movie_reviews(task_type)
        data = TaskData(task_type, train, validation, test, "movie-reviews")
    if 0 < max_train_examples < len(data.train):
        keep = np.sort(np.random.default_rng(seed).choice(len(data.train), max_train_examples, replace=False))
        data.train = [data.train[i] for i in keep]
    return data


COLUMN_SETTINGS = ("text_column", "text_pair_column", "label_column")


def saved_columns(model_dir: str | Path) -> dict[str, str]:
    """The column names a fine-tuned model was trained with ({"text_column": "review", ...}, the ones that
    were set), from the finetune_config.json its run wrote beside it; {} for any other model. New data
    for the model has the same columns more often than not, so they are the defaults for --predict-only."""
    path = Path(model_dir) / "finetune_config.json"
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text(encoding="utf-8"))
    return {name: settings[name] for name in COLUMN_SETTINGS if settings.get(name)}


def max_length_for(config: BertConfig, requested: int | None, init: str) -> int:
    """Tokens per example: what was asked for, else 128 or the model's positions if it has fewer."""
    max_length = requested or min(128, config.max_position_embeddings)
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the {config.max_position_embeddings} positions of --init "
                         f"{init}: use --max-length {config.max_position_embeddings} or less")
    return max_length


@dataclass
class TaskFeatures:
    """The task's examples tokenized once (data.Features), split by split."""

    train: list
    validation: list
    test: list | None


def encode_task(tokenizer, task: TaskData, vocab: LabelVocab | None, max_length: int,
                stride: int | None = None) -> TaskFeatures:
    """With a stride, sliding windows (encoding.encode_examples): an example longer than max_length is read whole."""
    def encode(examples, source):
        return encode_examples(tokenizer, examples, max_length=max_length, task_type=task.task_type,
                               label_vocab=vocab, source=source, stride=stride)

    test = encode(task.test, "the test data") if task.test else None
    return TaskFeatures(encode(task.train, "the training data"), encode(task.validation, "the validation data"), test)


# ----------------------------------------------------------------------------- labels and the model

MODEL_CLASSES = {"token-classification": BertForTokenClassification}  # every other task type: sequence classification
PROBLEM_TYPES = {"classification": "single_label_classification", "multilabel": "multi_label_classification",
                 "regression": "regression", "token-classification": None}


def model_class(task_type: str, crf: bool = False) -> type[PreTrainedBert]:
    """The model of a task type; crf: token classification with a linear-chain CRF (minibert.crf)."""
    if crf:
        if task_type != "token-classification":
            raise ValueError(f"--crf tags words in sequence: it needs --task-type token-classification, and this is {task_type}")
        return BertCRFForTokenClassification
    return MODEL_CLASSES.get(task_type, BertForSequenceClassification)


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


def choose_labels(task: TaskData, init_config: BertConfig, *, init: str, init_is_classifier: bool = False,
                  reinit_head: bool = False) -> LabelVocab | None:
    """The label vocabulary (None for regression). A classifier --init keeps its own label ids when the
    data's labels are the same set; other labels need reinit_head (--reinit-head)."""
    if task.task_type == "regression":
        if init_is_classifier and init_config.num_labels != 1 and not reinit_head:
            raise DataError(
                f"--init {init} is a classifier with {init_config.num_labels} labels, but this is a regression "
                "task: pass --reinit-head to train a new (one-output) head"
            )
        return None
    if task.label_order is not None:
        vocab = LabelVocab(task.label_order)
    else:
        vocab = LabelVocab.from_examples(task.train, task.task_type)
    if init_is_classifier and not reinit_head:
        theirs = checkpoint_labels(init_config)
        if sorted(theirs) != sorted(vocab.labels):
            raise DataError(
                f"--init {init} is a classifier for labels {theirs}, but the training data has labels {vocab.labels}: "
                "pass --reinit-head to train a new head, or use data with the checkpoint's labels"
            )
        # Same labels: continue with the checkpoint's head and ids.
        logger.info("minibert: keeping the classifier head of --init %s and its label ids %s", init,
                    dict(enumerate(theirs)))
        vocab = LabelVocab(theirs)
    if task.task_type == "classification" and len(vocab) < 2:
        raise DataError(f"the training data has one label only ({vocab.labels[0]!r}): a classifier needs examples "
                        "of at least two labels (for a score, pass --task-type regression)")
    return vocab


def build_model(
    task_type: str,
    vocab: LabelVocab | None,
    init_dir: str | Path,
    *,
    reinit_head: bool = False,
    attn_impl: str | None = None,
    dropout: float | None = None,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    reinit_layers: int = 0,
    config_overrides: dict | None = None,
    lora: LoraSettings | None = None,
    lora_adapter: str | Path | None = None,
    lora_base: str | None = None,
    verbose: bool = True,
    crf: bool = False,
) -> PreTrainedBert | LoraModel:
    """The task's model from --init, with a head for vocab's labels (one output for regression), then the
    bottom layers frozen and the top ones re-initialised as asked. config_overrides: BertConfig fields to
    set (--config), over every other setting. verbose=False: say nothing of new weights.

    LoRA (minibert/lora.py): `lora` adds new LoRA weights; `lora_adapter` loads an adapter (peft's, or a LoRA
    run's adapter/) with its own settings and head (reinit_head: a new head instead). lora_base is what the
    saved adapter names as its base (--init as given; default init_dir)."""
    overrides = dict(
        num_labels=1 if vocab is None else len(vocab),
        id2label={0: "score"} if vocab is None else dict(enumerate(vocab.labels)),
        problem_type=PROBLEM_TYPES[task_type],
    )
    if attn_impl:
        overrides["attn_impl"] = attn_impl
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    overrides.update(config_overrides or {})
    # With an adapter, the head is the adapter's (or new), whatever head --init has.
    model = model_class(task_type, crf=crf).from_pretrained(str(init_dir), reinit_head=reinit_head or lora_adapter is not None,
                                                             verbose=verbose, **overrides)
    layers = model.bert.layers
    if freeze_embeddings:
        model.bert.embeddings.requires_grad_(False)
    if freeze_layers:
        if freeze_layers > len(layers):
            raise ValueError(f"--freeze-layers {freeze_layers}: the model has only {len(layers)} layers")
        for layer in layers[:freeze_layers]:
            layer.requires_grad_(False)
    if reinit_layers:
        if reinit_layers > len(layers):
            raise ValueError(f"--reinit-layers {reinit_layers}: the model has only {len(layers)} layers")
        for part in [*layers[len(layers) - reinit_layers:], model.bert.pooler]:
            if part is not None:
                model.init_weights(part)
    if lora_adapter is not None:
        return LoraModel.from_adapter(model, lora_adapter, base=lora_base or str(init_dir), load_head=not reinit_head)
    if lora is not None:
        return LoraModel(model, lora, base=lora_base or str(init_dir))
    return model


def count_weights(model) -> tuple[int, int]:
    """(trainable, total) weights: what the log and train_results.json report."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def log_trainable_weights(model) -> None:
    """One log line: how many of the weights train, and for a LoRA model what its update adapts."""
    trainable, total = count_weights(model)
    how = ""
    if isinstance(model, LoraModel):
        lora = model.settings
        how = (f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)} of {len(model.model.bert.layers)} "
               f"layers, the classifier{' and pooler' if lora.train_pooler else ''} in full: ")
    logger.info("minibert: %s%s of %s weights train (%.2f%%)", how, f"{trainable:,}", f"{total:,}", 100 * trainable / total)


# ----------------------------------------------------------------------------- LoRA


def lora_settings(*, rank: int | None = None, alpha: float | None = None, dropout: float | None = None,
                  targets: str | None = None, train_pooler: bool = False, adapter: str | None = None,
                  freeze_layers: int = 0, layer_lr_decay: float = 1.0, reinit_layers: int = 0,
                  crf: bool = False) -> LoraSettings | None:
    """The LoRA that train_finetune.py's --lora-* flags ask for (None: full fine-tuning, or an adapter, which
    brings its own settings), checked against the flags that contradict it before any data is read.
    alpha None is 2 x rank, dropout None 0.1, targets (comma-separated) None query,value."""
    flags = {"--lora-rank": rank is not None, "--lora-alpha": alpha is not None, "--lora-dropout": dropout is not None,
             "--lora-targets": targets is not None, "--lora-train-pooler": train_pooler}
    given = [flag for flag, on in flags.items() if on]
    if adapter is not None:
        if given:
            raise ValueError(f"{given[0]} with --lora-adapter: the adapter's adapter_config.json sets rank, alpha, "
                             "dropout and targets; drop the flag")
        read_adapter_config(adapter)  # a missing folder or an adapter minibert cannot compute: say so now
    elif rank is None:
        if given:
            raise ValueError(f"{given[0]} needs --lora-rank R (LoRA of rank R, e.g. 8) or --lora-adapter DIR")
        return None
    # Other ways of choosing what trains: with LoRA their meaning would be unclear.
    for flag, used in (("--freeze-layers", freeze_layers), ("--layer-lr-decay", layer_lr_decay != 1.0),
                       ("--reinit-layers", reinit_layers)):
        if used:
            raise ValueError(f"{flag} with LoRA: LoRA already decides what trains (the LoRA weights and the head); "
                             f"drop {flag}, or drop LoRA to fine-tune layers in full")
    if crf:  # peft's token classifier is transformers' BertForTokenClassification, which has no CRF
        raise ValueError("--crf with LoRA: a peft adapter cannot carry the CRF's transition scores; drop --crf, or drop "
                         "LoRA to train the CRF with the whole model")
    if adapter is not None:
        return None
    return LoraSettings(rank=rank, alpha=2.0 * rank if alpha is None else alpha, dropout=0.1 if dropout is None else dropout,
                        targets=tuple(t.strip() for t in (targets or "query,value").split(",") if t.strip()),
                        train_pooler=train_pooler)


def adapter_head(adapter_dir: str) -> tuple[str, int]:
    """Which classifier a LoRA adapter brings ("token" or "sequence") and its number of outputs."""
    config = read_adapter_config(adapter_dir)
    weight = read_adapter_weights(Path(adapter_dir)).get("base_model.model.classifier.weight")
    if weight is None:
        raise DataError(f"--predict-only: the adapter {adapter_dir} has no classifier to label with (it trained none); "
                        "fine-tune it on labelled data first (drop --predict-only)")
    return ("token" if config.get("task_type") == "TOKEN_CLS" else "sequence"), int(weight.shape[0])


def adapter_model(init: str, adapter: str, *, task_type: str | None = None, overrides: dict | None = None) -> tuple:
    """A LoRA adapter to predict with: `init` with the adapter merged in, its task type and labels (the
    class ids: peft keeps no label names), and the tokenizer, as minibert.inference.ready_pipeline takes
    them. The task type is the adapter's head's (one output is regression, HF's rule without a
    problem_type); task_type="multilabel" says what an adapter cannot tell. overrides: BertConfig fields."""
    init_dir = resolve_model_dir(init)
    kind, num_labels = adapter_head(adapter)
    if kind == "token":
        chosen = "token-classification"
    elif task_type == "multilabel":  # an adapter cannot tell, the user can
        chosen = "multilabel"
    else:
        chosen = "regression" if num_labels == 1 else "classification"  # HF's rule without a problem_type
    model = model_class(chosen).from_pretrained(str(init_dir), verbose=False, reinit_head=True, num_labels=num_labels,
                                                **(overrides or {}))
    merged = LoraModel.from_adapter(model, adapter, base=init).merged_model()
    labels = None if chosen == "regression" else [str(i) for i in range(num_labels)]
    return merged, load_tokenizer(init_dir), chosen, labels


# ----------------------------------------------------------------------------- the training loop


def validation_loss(outputs: Sequence[np.ndarray], features: Sequence[Features], task_type: str,
                    problem_type: str | None) -> float:
    """The model's own loss over labelled outputs (per example: (L,) logits, or (T, L) for tokens), the
    number the training loss is compared with."""
    if task_type == "token-classification":
        logits = torch.from_numpy(np.concatenate(outputs))  # (tokens, L)
        labels = torch.from_numpy(np.concatenate([f.label for f in features]))
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX).item()
    logits = torch.from_numpy(np.stack(outputs))  # (examples, L)
    labels = torch.from_numpy(np.stack([np.asarray(f.label) for f in features]))
    return classification_loss(logits, labels, problem_type).item()


@dataclass
class Schedule:
    """When the loop steps, evaluates, saves and stops: train_finetune.py's flags of the same names."""

    batch_size: int  # per process
    grad_accum: int
    seed: int  # the batch order of each epoch
    group_by_length: bool
    epochs: int
    max_steps: int  # 0: all epochs
    eval_steps: int  # 0: at the end of each epoch
    save_steps: int  # 0: checkpoints only at evaluations
    early_stopping: int  # 0: never

    @classmethod
    def of(cls, settings) -> Schedule:
        """The fields of the same names of a settings object (train_finetune.FinetuneConfig)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def batches(self, lengths: Sequence[int], epoch: int, dist: Distributed, skip: int = 0) -> list[list[int]]:
        """This process's batches (example indices) of one epoch, less the first `skip`."""
        chunk_batches = 50 if self.group_by_length else 1  # sorting within one batch only leaves batches random
        return train_batches(lengths, self.batch_size, seed=self.seed, epoch=epoch, rank=dist.rank,
                             world_size=dist.world_size, skip=skip, chunk_batches=chunk_batches)

    def steps(self, lengths: Sequence[int], dist: Distributed) -> tuple[int, int]:
        """(optimizer steps of the run, epochs it takes to make them)."""
        steps_per_epoch = math.ceil(len(self.batches(lengths, 0, dist)) / self.grad_accum)
        total_steps = self.max_steps or self.epochs * steps_per_epoch
        return total_steps, math.ceil(total_steps / steps_per_epoch)


def train(
    trainer: Trainer,
    state: TrainState,
    features: Sequence[Features],
    schedule: Schedule,
    *,
    epochs: int,
    pad_token_id: int,
    validate: Callable[[PreTrainedBert], dict[str, float]],
    main_metric: str,
    tokenizer=None,
    run_config: dict | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict:
    """Fine-tune trainer.model on `features` from `state` on, to trainer.total_steps (at most `epochs`).

    At each evaluation, validate(model) (run on rank 0 only) gives the validation metrics; the best model
    by main_metric is saved to trainer.output_dir with eval_results.json, and schedule.early_stopping
    evaluations without improvement stop the run. Resumable checkpoints (with run_config) are written at
    evaluations and every schedule.save_steps. Returns {"steps", "seconds", "examples_per_s"} of training
    alone (evaluation and saving not counted); stop_after_steps simulates a kill: {"stopped_at": step}.
    """
    model, dist, out_dir, total_steps = trainer.model, trainer.dist, trainer.output_dir, trainer.total_steps
    better = greater_is_better(main_metric)

    def evaluate_and_keep_best() -> bool:
        """Score the validation set, save the model if it is the best so far; True to stop early."""
        if dist.is_main:
            scores = validate(model)  # may hold a per_class block, written to eval_results.json only
            metrics = {k: v for k, v in scores.items() if k != "per_class"}
            trainer.log_metrics({"split": "eval", "step": state.step, "epoch": state.epoch, **metrics})
            value = metrics[main_metric]
            if state.best_metric is None or (value > state.best_metric if better else value < state.best_metric):
                state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
                model.save_pretrained(out_dir, tokenizer=tokenizer)
                write_json(out_dir / "eval_results.json", {**metrics, "step": state.step, "epoch": state.epoch,
                                                           **({"per_class": scores["per_class"]} if "per_class" in scores else {})})
            else:
                state.evals_without_improvement += 1
            logger.info("minibert: step %d: %s (best %s %.4f at step %d)", state.step,
                        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), main_metric, state.best_metric,
                        state.best_step)
        stop = [bool(schedule.early_stopping) and state.evals_without_improvement >= schedule.early_stopping]
        if dist.enabled:
            torch.distributed.broadcast_object_list(stop)
        return stop[0]

    lengths = [len(f) for f in features]
    with Progress(total_steps, initial=state.step, desc="fine-tuning", enabled=dist.is_main and progress) as shown:
        speed = Throughput()  # examples per second of the last steps
        train_seconds, examples_trained = 0.0, 0  # training alone, without evaluation and saving
        stopped_early = False
        while state.step < total_steps and state.epoch < epochs and not stopped_early:
            batches = schedule.batches(lengths, state.epoch, dist, skip=state.batch_in_epoch)
            for start in range(0, len(batches), schedule.grad_accum):
                group = batches[start : start + schedule.grad_accum]
                step_start = time.perf_counter()
                micro = [collate([features[i] for i in batch], pad_token_id) for batch in group]
                result = trainer.step(micro)
                step_seconds = time.perf_counter() - step_start
                train_seconds += step_seconds
                state.step += 1
                state.batch_in_epoch += len(group)
                n = sum(len(b) for b in group) * dist.world_size
                examples_trained += n
                shown.update(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}",
                             ex_s=f"{speed.update(n, step_seconds):.0f}")
                trainer.log_metrics({"split": "train", "step": state.step, "epoch": state.epoch,
                                     "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"]})
                epoch_done = start + schedule.grad_accum >= len(batches)  # `batches` is what is left of the epoch
                if epoch_done:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                evaluate_now = ((schedule.eval_steps and state.step % schedule.eval_steps == 0)
                                or (not schedule.eval_steps and epoch_done))
                if evaluate_now or state.step == total_steps:
                    stopped_early = evaluate_and_keep_best()
                save_now = evaluate_now or (schedule.save_steps and state.step % schedule.save_steps == 0)
                if save_now and state.step < total_steps and not stopped_early:
                    trainer.save_checkpoint(state, tokenizer=tokenizer, run_config=run_config)
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    return {"stopped_at": state.step}
                if state.step >= total_steps or stopped_early:
                    break
    return {"steps": state.step, "seconds": round(train_seconds, 2),
            "examples_per_s": round(examples_trained / max(train_seconds, 1e-9), 1)}
