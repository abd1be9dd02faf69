"""A fine-tuned model scored, and the files that say how it did: train_finetune.py's last steps, callable from Python.

    scores = validate(model, task, vocab, features, batch_size=128, pad_token_id=0, device=device, precision="fp32")
    results = write_results(trainer, state, task, features, vocab, tokenizer, train_stats, main_metric="accuracy",
                            batch_size=128)                                     # after training
    results = label_file(minibert.pipeline("runs/x"), "new.csv", "runs/x-new", init="runs/x", config=config)

Prediction, scoring and predictions.jsonl's records are minibert.inference's, the code minibert.pipeline
runs: a model's figures during training, at its end and in Python are the same numbers. So this module
builds on minibert.inference, which builds on minibert.finetuning (tasks, labels, model classes).

What write_results adds to the run's folder, beside the best model that training saved there:
- eval_results.json, the validation metrics at the best step; for classifiers, ece, brier and nll
  before and after temperature scaling (calibrate: Guo et al. 2017), the temperature also in config.json;
  with tune_thresholds, each label's F1-best threshold (keep_tuned_thresholds), in config.json too;
- predictions.jsonl for the test split, and test_results.json when it has labels;
- train_results.json, reliability.png (classifiers) and training_curves.png.
label_file writes predictions.jsonl (with explain, each prediction's word attributions and
explanations.html) and test_results.json when the file it labels has labels.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from minibert import inference
from minibert.atomic_write import atomic_write_text, write_json
from minibert.calibration import CALIBRATED_TASKS, calibration_report, fit_temperature, plot_calibration, temperature_for_config
from minibert.calibration import CONFIG_KEY as TEMPERATURE_KEY
from minibert.config import BertConfig
from minibert.curves import plot_curves
from minibert.data.labels import LabelVocab
from minibert.data.readers import load_examples
from minibert.explanation_page import write_page
from minibert.finetuning import TaskData, TaskFeatures, check_tokenizer_fits, count_weights, validation_loss
from minibert.lora import LoraModel
from minibert.tagging import SCHEMES
from minibert.thresholds import tune_thresholds
from minibert.training import Trainer, TrainState

logger = logging.getLogger("minibert")

# ----------------------------------------------------------------------------- predicting a split


def trained_task(task: TaskData, vocab: LabelVocab | None, model, constrained: bool = True) -> inference.ModelTask:
    """What the model being trained predicts, as minibert.inference describes a fine-tuned model."""
    return inference.ModelTask.of(model, task.task_type, vocab.labels if vocab is not None else None,
                                  constrained=constrained)


def split_outputs(task_type: str, examples, features, windows) -> tuple[list, list]:
    """The outputs of a split's features (`windows`) merged into one output and one reference per example."""
    words = inference.word_counts(task_type, examples)
    return (inference.document_outputs(task_type, features, windows, words),
            inference.document_labels(task_type, features, words))


def predict_split(model, task_type: str, examples, features, *, batch_size: int, pad_token_id: int, device,
                  precision: str) -> tuple[list, list]:
    """One output and one reference per example of a split, however many windows it was read in."""
    windows = inference.predict_logits(model, features, batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                                       precision=precision)
    return split_outputs(task_type, examples, features, windows)


def validate(model, task: TaskData, vocab: LabelVocab | None, features: TaskFeatures, *, batch_size: int,
             pad_token_id: int, device, precision: str, constrained: bool = True) -> dict:
    """The validation split's metrics, its loss (the number the training loss is compared with) and the
    per-class scores: what each evaluation during training logs, and keeps the best model by."""
    model_task = trained_task(task, vocab, model, constrained)
    windows = inference.predict_logits(model, features.validation, batch_size=batch_size, pad_token_id=pad_token_id,
                                       device=device, precision=precision)
    outputs, references = split_outputs(task.task_type, task.validation, features.validation, windows)
    loss = validation_loss(windows, features.validation, task.task_type, model.config.problem_type)
    return {**inference.score(model_task, outputs, references, task.metric_names), "loss": loss,
            "per_class": inference.per_class(model_task, outputs, references)}


def write_records(out_dir: Path, records: list[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)  # UTF-8: texts stay readable
    atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))


# ----------------------------------------------------------------------------- the best model's results


def calibrate(model, task: TaskData, vocab: LabelVocab | None, outputs, references, eval_results: dict | None,
              out_dir: Path, tokenizer, fit: bool) -> dict:
    """Temperature scaling: T fitted on the best model's validation logits (minimum NLL), saved in config.json as
    calibration_temperature, so that every prediction after it applies it. eval_results.json gains ece, brier and
    nll at T, the same at T = 1 beside them (ece_uncalibrated, ...) and T itself. fit=False (--no-calibrate):
    the three at T = 1 only, and no temperature saved."""
    logits, labels = np.stack(outputs), np.stack(references)  # labels: (N,) class ids, or (N, L) multi-hot
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


def keep_tuned_thresholds(model, task: TaskData, vocab: LabelVocab, outputs, references, eval_results: dict,
                          out_dir: Path, tokenizer, constrained: bool = True) -> dict:
    """--tune-thresholds: each label's F1-best threshold on the validation set, saved in config.json (as
    label_thresholds) and in eval_results.json, with the validation scores at them (tuned on that data, so
    an optimistic estimate: the test set tells the truth). The thresholds apply to the probabilities
    as predicted, calibrated when the model has a temperature."""
    probs = inference.probabilities(trained_task(task, vocab, model, constrained), np.stack(outputs))
    thresholds, untuned = tune_thresholds(probs, np.stack(references), vocab.labels)
    if untuned:
        logger.warning("minibert: the validation set has no example of %s: %s keep the threshold 0.5",
                       ", ".join(untuned), "it" if len(untuned) == 1 else "they")
    model.config.extra[inference.THRESHOLDS_KEY] = thresholds
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    model_task = trained_task(task, vocab, model, constrained)
    tuned = inference.score(model_task, outputs, references, task.metric_names)
    logger.info("minibert: label thresholds %s; validation at them: %s",
                ", ".join(f"{label} {t:.3f}" for label, t in thresholds.items()),
                ", ".join(f"{k} {v:.4f}" for k, v in tuned.items()))
    eval_results = {**(eval_results or {}), inference.THRESHOLDS_KEY: thresholds, "at_tuned_thresholds": {
        **tuned, "per_class": inference.per_class(model_task, outputs, references)}}
    write_json(out_dir / "eval_results.json", eval_results)
    return eval_results


def write_results(trainer: Trainer, state: TrainState, task: TaskData, features: TaskFeatures,
                  vocab: LabelVocab | None, tokenizer, train_stats: dict, *, main_metric: str, batch_size: int,
                  constrained: bool = True, calibrated: bool = True, tune_thresholds: bool = False) -> dict:
    """The best model on the test data (predictions.jsonl; test_results.json when it has labels), the
    run's figures, the training curves; then the resumable state, no longer needed, is removed. calibrated:
    fit a temperature (False: --no-calibrate); tune_thresholds: --tune-thresholds; constrained: decode tags
    as valid sequences of their scheme. Returns {"eval", "test", "output_dir", "train", "main_metric"}."""
    out_dir, model, dist = trainer.output_dir, trainer.model, trainer.dist
    results = {"eval": None, "test": None, "output_dir": str(out_dir), "train": train_stats, "main_metric": main_metric}
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
        predict = functools.partial(predict_split, best, task.task_type, batch_size=batch_size,
                                    pad_token_id=tokenizer.token_to_id("[PAD]"), device=trainer.device,
                                    precision=trainer.settings.precision)
        validation = None  # the validation split's (outputs, references), predicted once when needed
        if task.task_type in CALIBRATED_TASKS:  # first T, then any thresholds: they apply to calibrated probabilities
            validation = predict(task.validation, features.validation)
            results["eval"] = calibrate(best, task, vocab, *validation, results["eval"], out_dir, tokenizer, fit=calibrated)
        if tune_thresholds:
            results["eval"] = keep_tuned_thresholds(best, task, vocab, *validation, results["eval"], out_dir, tokenizer,
                                                    constrained)
        model_task = trained_task(task, vocab, best, constrained)
        temperature = model_task.temperature if calibrated else None  # None: the results say T = 1 was not fitted
        if features.test:
            outputs, references = predict(task.test, features.test)
            answers = inference.results(model_task, task.test, outputs)
            write_records(out_dir, inference.prediction_records(model_task, task.test, answers))
            if features.test[0].label is not None:
                results["test"] = inference.score(model_task, outputs, references, task.metric_names)
                if task.task_type in CALIBRATED_TASKS:
                    results["test"].update(calibration_report(task.task_type, np.stack(outputs), np.stack(references),
                                                              temperature))
                logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
                results["test"]["per_class"] = inference.per_class(model_task, outputs, references)
                write_json(out_dir / "test_results.json", results["test"])
        if task.task_type in CALIBRATED_TASKS:
            # On the test set when it has labels: T was fitted on the validation set, where "after" would flatter.
            split, (logits, labels) = ("test", (outputs, references)) if results["test"] is not None else ("validation", validation)
            plot_calibration(out_dir / "reliability.png", f"{task.name}, {split} set ({len(labels)} examples)",
                             task.task_type, np.stack(logits), np.stack(labels), temperature)
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", eval_metrics=(main_metric,))
        trainer.remove_checkpoints()
        logger.info("minibert: best %s %.4f (step %s); model in %s", main_metric,
                    float("nan") if state.best_metric is None else state.best_metric, state.best_step, out_dir)
    dist.barrier()
    return results


# ----------------------------------------------------------------------------- labelling new data


def label_file(pipe: inference.Pipeline, test_file: str, out_dir: str | Path, *, init: str, config: BertConfig,
               columns: dict | None = None, tag_scheme: str = "bio", progress: bool = True, explain: bool = False,
               explain_target: str | None = None, explain_steps: int = 50) -> dict:
    """A fine-tuned model's pipeline labels test_file into out_dir/predictions.jsonl, with its own task type
    and labels; test_results.json when the file has labels. init is the model as given (for messages),
    config its config.json (with any --config overrides); columns the file's column names (text_column,
    text_pair_column, label_column); tag_scheme how a span-annotated file's gold spans become tags, where
    the model keeps no scheme of its own. explain: each prediction's word attributions (integrated
    gradients, minibert.attributions), and explanations.html to read them. Returns {"eval", "test", "output_dir"}."""
    columns = columns or {}
    check_tokenizer_fits(pipe.tokenizer, config, init, text_pairs=bool(columns.get("text_pair_column")))
    # Gold spans of a labelled test file are tagged as the model was trained (a CoNLL-trained model: --tag-scheme).
    scheme = config.extra.get(inference.TAG_SCHEME_KEY) if config.extra.get(inference.TAG_SCHEME_KEY) in SCHEMES else tag_scheme
    task_type = pipe.task.task_type
    examples = load_examples(test_file, task_type=task_type, flag="--test-file", require_labels=False,
                             tokenizer=pipe.tokenizer, tag_scheme=scheme, **columns)
    labelled = examples[0].label is not None
    features = pipe.encode(examples, labelled=labelled, source="the test data")
    outputs = pipe.outputs(examples, features, progress=progress and len(examples) >= inference.PROGRESS_FROM)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = inference.results(pipe.task, examples, outputs)
    records = inference.prediction_records(pipe.task, examples, answers)
    if explain:
        records = explain_predictions(pipe, examples, features, answers, records, out_dir, init=init, target=explain_target,
                                      steps=explain_steps)
    write_records(out_dir, records)
    logger.info("minibert: %s predictions of %s in %s", len(examples), init, out_dir / "predictions.jsonl")
    results = {"eval": None, "test": None, "output_dir": str(out_dir)}
    if labelled:
        references = inference.document_labels(task_type, features, inference.word_counts(task_type, examples))
        results["test"] = inference.score(pipe.task, outputs, references)
        if task_type in CALIBRATED_TASKS:  # with the uncalibrated figures beside when the model has a temperature
            temperature = pipe.task.temperature if TEMPERATURE_KEY in config.extra else None
            results["test"].update(calibration_report(task_type, np.stack(outputs), np.stack(references), temperature))
        logger.info("minibert: test %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()))
        results["test"]["per_class"] = inference.per_class(pipe.task, outputs, references)
        write_json(out_dir / "test_results.json", results["test"])
    return results


def explain_predictions(pipe: inference.Pipeline, examples: Sequence, features: Sequence, answers: list[dict],
                        records: list[dict], out_dir: Path, *, init: str, target: str | None, steps: int) -> list[dict]:
    """The records with each prediction's word attributions, and out_dir/explanations.html to read them."""
    task_type = pipe.task.task_type
    if pipe.precision.name == "int8":
        raise ValueError("--explain takes gradients through the torch model, and --precision int8 runs ONNX Runtime: "
                         "use --precision fp32 or bf16 with --explain")
    if target is not None and task_type not in CALIBRATED_TASKS:
        raise ValueError(f"--explain-target names a label to explain, and a {task_type} model explains "
                         f"{'its value' if task_type == 'regression' else 'each entity'}: drop --explain-target")
    records, page = pipe.explained_records(examples, features, answers, records, target=target, steps=steps)
    write_page(out_dir / "explanations.html", page, title=f"minibert: what {init}'s predictions rest on")
    logger.info("minibert: %d explanations in %s", len(page), out_dir / "explanations.html")
    return records
