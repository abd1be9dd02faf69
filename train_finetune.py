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
    # Documents longer than --max-length, read whole in overlapping windows (training, evaluation, prediction)
    python train_finetune.py --train-file reviews.csv --validation-file dev.csv --max-length 256 --sliding-window
    # Label new data with a fine-tuned model (predictions.jsonl; test_results.json when it has labels),
    # in bf16 on a CPU with AMX or AVX512-BF16 (auto), or --precision int8 on one without
    python train_finetune.py --init runs/x --predict-only --test-file new.csv --output-dir runs/x-new
    # ... with each prediction's word attributions, and explanations.html to read them
    python train_finetune.py --init runs/x --predict-only --explain --test-file new.csv --output-dir runs/x-why
    # In Python: minibert.pipeline("runs/x")("A gripping film.")  (minibert/inference.py)

Writes to --output-dir: the best model as an HF directory (config.json with id2label, model.safetensors,
tokenizer files) that `--init DIR`, minibert and transformers' AutoModelFor... load; eval_results.json
and test_results.json; train_results.json (steps, seconds, examples/s); predictions.jsonl for the test set (each
input with its result as minibert.pipeline gives it: label, score and probabilities, labels, a value, or word
tags and entities); metrics.jsonl; training_curves.png;
finetune_config.json (the resolved settings); checkpoint/ while the run is in progress (for --resume). A LoRA
run's model is the merged one (a plain BERT), and adapter/ holds the adapter in peft's format. test_results.json
has ece, brier, nll before and after temperature scaling for classifiers (the temperature is in config.json), and
reliability.png shows them; with --seeds, seeds/seed-N/ per run and seeds_results.json (and while the seeds run,
seeds/run_config.json and seeds/seed-N.json for the seeds finished: a stopped --seeds run continues too).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minibert import evaluation as E
from minibert import finetuning as F
from minibert import inference as I
from minibert import seeds as S
from minibert.assets import MINILM_HUB_ID
from minibert.calibration import CONFIG_KEY as TEMPERATURE_KEY
from minibert.class_weights import class_weights, weighted_loss
from minibert.cli import check_counts, config_overrides, parse_settings, run_cli, setup_logging
from minibert.config import BertConfig
from minibert.data.encoding import check_stride
from minibert.data.examples import DataError
from minibert.hub import resolve_model_dir
from minibert.inference import TAG_SCHEME_KEY, THRESHOLDS_KEY
from minibert.lora import LoraSettings
from minibert.metrics import MAIN_METRIC, METRICS
from minibert.runs import absolute_paths, hold_output_dir, remove_earlier_results, resolve_resume
from minibert.tagging import SCHEMES, detect_scheme
from minibert.tokenizer import load_tokenizer
from minibert.training import (
    Distributed,
    Trainer,
    TrainingSettings,
    TrainState,
    check_attention_backend,
    check_layer_lr_decay,
    resolve_precision,
    seed_everything,
    setup_distributed,
    start_training,
)

logger = logging.getLogger("minibert")


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
    max_length: int | None = None  # tokens per example with [CLS]/[SEP]; longer ones are cut (see --sliding-window). None: 128, or fewer if the model has fewer positions
    # Read examples longer than --max-length whole, in overlapping windows of --max-length tokens: in training
    # each window is an example with its text's label; evaluation and prediction average a text's window
    # logits (a word takes its tag from the window where it sits farthest from a cut edge), and the metrics
    # count texts, not windows.
    sliding_window: bool = False
    stride: int | None = None  # with --sliding-window: tokens neighbouring windows share; None: a quarter of --max-length
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
    # fp32 | bf16 | fp16 | int8 (--predict-only, CPU); auto = bf16 on a GPU that supports it, fp32 for training on a
    # CPU; --predict-only's auto is bf16 on a CPU with AMX or AVX512-BF16 too (it logs which and why)
    precision: str = "auto"
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
# Each step reads the settings it needs from the FinetuneConfig and calls minibert.finetuning (or, for
# the results and --predict-only, minibert.evaluation), where the work is done and Python users find it.


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
    return F.lora_settings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                           train_pooler=cfg.lora_train_pooler, adapter=cfg.lora_adapter, freeze_layers=cfg.freeze_layers,
                           layer_lr_decay=cfg.layer_lr_decay, reinit_layers=cfg.reinit_layers, crf=cfg.crf)


def window_stride(cfg: FinetuneConfig, task: F.TaskData, tokenizer, max_length: int) -> int | None:
    """--stride, or its default, with --sliding-window (checked: each window must hold new text); None
    (inputs are cut at --max-length) without."""
    if not cfg.sliding_window:
        return None
    stride = max_length // 4 if cfg.stride is None else cfg.stride
    pairs = task.train[0].text_pair is not None
    check_stride(stride, max_length, tokenizer.num_special_tokens_to_add(pairs), pairs)
    return stride


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
    F.log_trainable_weights(model)
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
    precision = resolve_precision(cfg.precision, dist.device)
    settings = TrainingSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                layer_lr_decay=cfg.layer_lr_decay, precision=precision, compile=cfg.compile)
    schedule = F.Schedule.of(cfg)
    total_steps, epochs = schedule.steps([len(f) for f in features.train], dist)
    trainer, state, run_config = start_training(
        cfg, model, settings, total_steps, dist, record_file="finetune_config.json", loss_fn=loss_fn,
        resolved={"task_type": task.task_type, "task_name": task.name, "max_length": max_length,
                  "total_steps": total_steps, "init_dir": str(init_dir),
                  "text_pairs": task.train[0].text_pair is not None})  # what minibert.pipeline then accepts
    if dist.is_main:
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
        return E.validate(model, task, vocab, features, batch_size=cfg.eval_batch_size, pad_token_id=pad_id,
                          device=trainer.device, precision=trainer.settings.precision,
                          constrained=cfg.constrained_decoding)

    return F.train(trainer, run.state, features.train, run.schedule, epochs=run.epochs, pad_token_id=pad_id,
                   validate=validate, main_metric=run.main_metric, tokenizer=tokenizer, run_config=run.run_config,
                   progress=cfg.progress, stop_after_steps=stop_after_steps)


def evaluate_and_write_results(cfg: FinetuneConfig, run: Run, task: F.TaskData, features: F.TaskFeatures, vocab,
                               tokenizer, train_stats: dict) -> dict:
    """The best model on the test data, the run's figures and curves (minibert.evaluation.write_results)."""
    return E.write_results(run.trainer, run.state, task, features, vocab, tokenizer, train_stats,
                           main_metric=run.main_metric, batch_size=cfg.eval_batch_size,
                           constrained=cfg.constrained_decoding, calibrated=cfg.calibrate,
                           tune_thresholds=cfg.tune_thresholds)


def predict_only(cfg: FinetuneConfig) -> dict:
    """--predict-only: the fine-tuned model --init labels --test-file through minibert.pipeline, with its
    own task type and labels; nothing is trained."""
    if not cfg.test_file:
        raise DataError("--predict-only needs --test-file, the examples to label")
    if cfg.tune_thresholds:
        raise ValueError("--tune-thresholds picks thresholds on a validation set, and --predict-only has none: tune "
                         "them while fine-tuning (the model keeps them in its config.json)")
    pipe = prediction_pipeline(cfg)
    init_dir = resolve_model_dir(cfg.init)
    config = BertConfig.from_json_file(init_dir / "config.json", **config_overrides(cfg.config))
    # The columns the model was trained with are the defaults: new data has them more often than not.
    columns = {**F.saved_columns(init_dir), **{name: getattr(cfg, name) for name in F.COLUMN_SETTINGS if getattr(cfg, name)}}
    return E.label_file(pipe, cfg.test_file, cfg.output_dir, init=cfg.init, config=config, columns=columns,
                        tag_scheme=cfg.tag_scheme, progress=cfg.progress, explain=cfg.explain,
                        explain_target=cfg.explain_target, explain_steps=cfg.explain_steps)


def prediction_pipeline(cfg: FinetuneConfig) -> I.Pipeline:
    """--init (with --lora-adapter merged in) as minibert.pipeline, in the precision and on the device asked for."""
    device = setup_distributed(cfg.device).device
    check_attention_backend(cfg.attn_impl, device)
    # Attributions take gradients through the model's own weights: auto keeps them fp32 with --explain.
    precision = "fp32" if cfg.explain and cfg.precision == "auto" else cfg.precision
    settings = dict(precision=precision, device=str(device), batch_size=cfg.eval_batch_size, max_length=cfg.max_length,
                    sliding_window=cfg.sliding_window, stride=cfg.stride, progress=cfg.progress)
    overrides = {**config_overrides(cfg.config), **({"attn_impl": cfg.attn_impl} if cfg.attn_impl else {})}
    if cfg.lora_adapter is None:
        pipe = I.pipeline(cfg.init, **settings, attn_impl=cfg.attn_impl, config_overrides=config_overrides(cfg.config))
    else:
        adapter = F.adapter_model(cfg.init, cfg.lora_adapter, task_type=cfg.task_type, overrides=overrides)
        pipe = I.ready_pipeline(*adapter, name=cfg.lora_adapter, **settings)
    if not cfg.constrained_decoding:
        pipe.task = dataclasses.replace(pipe.task, tag_scheme=None)
    return pipe


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
    if cfg.stride is not None and not cfg.sliding_window:
        raise ValueError(f"--stride {cfg.stride} is the overlap of sliding windows: add --sliding-window")
    if cfg.precision == "int8" and not cfg.predict_only:
        raise ValueError("--precision int8 is for prediction (--predict-only); train in fp32 or bf16")
    if cfg.tag_scheme not in SCHEMES:
        raise ValueError(f"--tag-scheme {cfg.tag_scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if (cfg.explain or cfg.explain_target is not None) and not cfg.predict_only:
        raise ValueError("--explain explains the predictions of --predict-only: add --predict-only, with the fine-tuned "
                         "model as --init and the texts as --test-file")
    # A folder with an unfinished --seeds run: that run's rules (the same command or --resume continues it).
    if cfg.seeds is not None or (not cfg.predict_only and S.find_unfinished_run(cfg.output_dir) is not None):
        return finetune_seeds(cfg)
    return finetune(cfg, _stop_after_steps=_stop_after_steps)


def finetune_seeds(cfg: FinetuneConfig) -> dict:
    """--seeds: one fine-tuning per seed on the same data, in turn (minibert.seeds); the best kept in --output-dir.
    A stopped --seeds run continues as a single run does, skipping the seeds that finished."""
    if cfg.seeds is not None:
        S.parse_seeds(cfg.seeds)  # a bad list stops before the folder is touched
    if cfg.predict_only:
        raise ValueError("--seeds fine-tunes once per seed, and --predict-only trains nothing: drop one of them")
    dist = setup_distributed(cfg.device)
    with hold_output_dir(cfg.output_dir, dist):
        out_dir = Path(cfg.output_dir)
        if cfg.resume and S.find_unfinished_run(out_dir) is None and not (out_dir / S.RESULTS_FILE).is_file():
            raise FileNotFoundError(f"--resume: no --seeds run in {out_dir} to continue (expected "
                                    f"{out_dir / S.SEEDS_DIR / S.RUN_CONFIG}); drop --resume to start one")
        resolve_resume(cfg, S.find_unfinished_run)  # may set cfg.resume, and with --resume restore the run's --seeds
        seeds = S.parse_seeds(cfg.seeds)
        dist.barrier()  # every rank has decided whether the run continues before the main one writes
        if dist.is_main and not cfg.resume:
            remove_earlier_results(cfg.output_dir)
            S.start_run(cfg.output_dir, absolute_paths(dataclasses.asdict(cfg)))
        data_seed = seeds[0] if cfg.data_seed is None else cfg.data_seed

        def run_one(seed: int, directory: Path) -> dict:
            # resume=False: a seed's own folder decides, as for any run (the stopped seed continues from its checkpoint)
            return finetune(dataclasses.replace(cfg, seed=seed, seeds=None, data_seed=data_seed, output_dir=str(directory),
                                                resume=False))

        summary = S.run_seeds(seeds, run_one, cfg.output_dir, resume=cfg.resume, is_main=dist.is_main, barrier=dist.barrier)
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
        features = F.encode_task(tokenizer, task, vocab, max_length, window_stride(cfg, task, tokenizer, max_length))
        model = build_model(cfg, task, vocab, init_dir)
        run = start_run(cfg, model, task, features, max_length, init_dir, dist,
                        loss_fn=loss_for(cfg, task, features, vocab))
        train_stats = train(cfg, run, task, features, vocab, tokenizer, stop_after_steps=_stop_after_steps)
        if "stopped_at" in train_stats:
            return train_stats
        return evaluate_and_write_results(cfg, run, task, features, vocab, tokenizer, train_stats)


if __name__ == "__main__":
    run_cli(main, parse_args, "train_finetune.py")
