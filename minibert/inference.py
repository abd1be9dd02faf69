"""Using a fine-tuned model: `minibert.pipeline`, and the prediction code train_finetune.py shares with it.

    clf = minibert.pipeline("runs/x")               # a fine-tuned BERT directory or hub id, minibert's or transformers'
    clf("A gripping, beautifully acted film.")      # {"label": "positive", "score": 0.97, "probabilities": {...}}
    clf(["text one", "text two"], batch_size=64)    # a list of results, in input order
    clf([("premise", "hypothesis")])                # text pairs
    ner = minibert.pipeline("runs/ner")
    ner("Jim Henson was in Paris.")  # [{"entity": "PER", "text": "Jim Henson", "start": 0, "end": 10, "score": 0.99}, ...]
    ner(["Jim", "Henson", "was", "in", "Paris", "."], is_split_into_words=True)   # {"tags": [...], "entities": [...]}

What the checkpoint was fine-tuned for (its architecture, problem_type and num_labels in config.json)
decides what a call gives:
    classification        {"label", "score": its probability, "probabilities": {label: probability}}
    multilabel            {"labels": every label whose probability reaches its threshold, "probabilities": {...}}
    regression            {"value": the predicted number}
    token classification  the entities of a text: [{"entity", "text", "start", "end", "score"}], where
                          text[start:end] is the entity and score the mean probability of its words' tags;
                          for a list of words, {"tags": one per word, "entities": ...} with words[start:end].

Everything else a fine-tuned directory holds is honoured, in this order: the calibration temperature
(config.json's calibration_temperature: probabilities are softmax or sigmoid of logits / T), then the
decision on those probabilities (label_thresholds for multilabel, else 0.5; for tags, the tag scheme's
valid sequences, tag_scheme, and a CRF's transitions, crf.safetensors).

Long texts: with sliding_window=True a text longer than max_length is read whole, in overlapping
windows; its result averages the windows' logits, and a word takes its tag from the window in which it
sits farthest from a cut edge. Precision: "auto" runs bf16 where the CPU (or GPU) multiplies bf16
faster than fp32 (AMX), fp32 elsewhere (minibert.precision decides and says why); "int8" runs ONNX Runtime's dynamic
int8 quantization of the exported model, for CPUs without native bf16.

The steps, each also what train_finetune.py runs for its evaluation, predictions.jsonl and
--predict-only, so that there is one implementation of prediction:
    checkpoint_task(directory, config)    what a checkpoint predicts: task type, labels, single texts or pairs
    ModelTask.of(model, ...)              ... and how its outputs become answers (temperature, thresholds, scheme, CRF)
    predict_logits(model, features)       raw outputs per feature, in batches grouped by length (the model
                                          drops what padding is left)
    document_outputs / document_labels    one output (and one reference) per text: its windows merged
    results / score / per_class           outputs -> the results above / metrics against the references
    prediction_records                    predictions.jsonl's lines
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from minibert import calibration
from minibert.attributions import DEFAULT_STEPS, explain_records
from minibert.config import IGNORE_INDEX, BertConfig
from minibert.crf import CRF_FILE, BertCRFForTokenClassification
from minibert.data.batching import collate, eval_batches, in_original_order
from minibert.data.encoding import Features, check_stride, encode_examples, truncating_tokenizer
from minibert.data.examples import DataError, Example
from minibert.data.labels import LabelVocab
from minibert.finetuning import checkpoint_labels, classifier_kind, model_class
from minibert.hub import resolve_model_dir
from minibert.int8 import int8_model
from minibert.metrics import compute_metrics, per_class_scores
from minibert.precision import Precision, autocast, resolve_precision
from minibert.progress import Progress
from minibert.spans import Span, TaggedText, entity_spans, span_record, word_offsets
from minibert.tagging import SCHEMES, CRFWeights, decode_tags, log_softmax
from minibert.thresholds import threshold_vector
from minibert.tokenizer import load_tokenizer

logger = logging.getLogger("minibert")

TAG_SCHEME_KEY = "tag_scheme"  # config.json: the scheme decoding keeps to: bio, bioes, or null (IOB1 or plain tags)
THRESHOLDS_KEY = "label_thresholds"  # config.json, multilabel: {label: threshold} from --tune-thresholds

# ----------------------------------------------------------------------------- what a model predicts


@dataclass(frozen=True)
class ModelTask:
    """What a fine-tuned model predicts, and how its logits become answers."""

    task_type: str  # one of data.TASK_TYPES
    labels: tuple[str, ...] | None  # label names by id; None for regression
    text_pairs: bool | None = None  # fine-tuned on text pairs (True) or single texts (False); None: unknown
    temperature: float | tuple[float, ...] = 1.0  # calibration: logits / T before softmax or sigmoid (1: none)
    thresholds: tuple[float, ...] | None = None  # multilabel: each label's decision threshold, in label order
    tag_scheme: str | None = None  # token classification: "bio"/"bioes" when tags must be valid sequences of it
    crf: CRFWeights | None = None  # token classification with a CRF: its transition scores

    @classmethod
    def of(cls, model, task_type: str, labels: Sequence[str] | None, *, text_pairs: bool | None = None,
           constrained: bool = True, threshold: float | None = None) -> ModelTask:
        """The task of `model` (a minibert classifier) from its config: calibration_temperature,
        label_thresholds (unless one `threshold` is given for every label), tag_scheme (unless not
        constrained) and its CRF."""
        extra, labels = model.config.extra, tuple(labels) if labels is not None else None
        temperature = 1.0
        if task_type in calibration.CALIBRATED_TASKS:
            saved = calibration.temperature_from_config(extra, labels)
            temperature = tuple(saved) if isinstance(saved, list) else saved
        thresholds = None
        if task_type == "multilabel":
            saved = threshold_vector(extra.get(THRESHOLDS_KEY), labels)
            thresholds = tuple(float(t) for t in (np.full(len(labels), threshold) if threshold is not None else saved))
        scheme = extra.get(TAG_SCHEME_KEY) if task_type == "token-classification" and constrained else None
        crf = model.crf_weights() if isinstance(model, BertCRFForTokenClassification) else None
        return cls(task_type, labels, text_pairs, temperature, thresholds, scheme if scheme in SCHEMES else None, crf)


def checkpoint_task(directory: Path, config: BertConfig, name: str) -> tuple[str, list[str] | None, bool | None]:
    """What the fine-tuned model in `directory` predicts: (task type, label names, text pairs or not),
    from its config.json (HF's rules: problem_type when set, else one output is regression and several
    are classes) and, for a model minibert fine-tuned, the run record beside it (finetune_config.json)."""
    kind = classifier_kind(config, directory)
    if kind is None:
        raise DataError(f"{name} has no classifier head (it is a pretrained encoder, not a fine-tuned model): "
                          "fine-tune it first with train_finetune.py, then use the directory that run wrote")
    if kind == "token":
        task_type = "token-classification"
    else:
        guess = "regression" if config.num_labels == 1 else "classification"
        task_type = {"regression": "regression", "multi_label_classification": "multilabel",
                     "single_label_classification": "classification"}.get(config.problem_type, guess)
    labels = None if task_type == "regression" else checkpoint_labels(config)
    return task_type, labels, run_record(directory).get("text_pairs")


def run_record(directory: Path) -> dict:
    """The settings a minibert fine-tuning run resolved (finetune_config.json beside the model); {} for others."""
    record = directory / "finetune_config.json"
    if not record.is_file():
        return {}
    return json.loads(record.read_text(encoding="utf-8")).get("resolved", {})


def load_classifier(directory: Path, task_type: str, **config_overrides):
    """The fine-tuned model in `directory`, with its CRF when it has one (crf.safetensors)."""
    crf = task_type == "token-classification" and (directory / CRF_FILE).is_file()
    return model_class(task_type, crf=crf).from_pretrained(str(directory), verbose=False, **config_overrides)


# ----------------------------------------------------------------------------- raw outputs


@torch.no_grad()
def predict_logits(model, features: Sequence[Features], *, batch_size: int, pad_token_id: int,
                   device: torch.device, precision: str = "fp32", progress: bool = False) -> list[np.ndarray]:
    """The model's float32 outputs per feature, in feature order: (L,) logits, or (T, L) per token.

    Batches hold features of similar length (longest first), so that little is padded; the model then
    drops what padding is left (config.unpad) before its dense layers."""
    if isinstance(model, torch.nn.Module) and model.training:  # eval() walks every module: ~1.5 ms a call, as long
        # as a batch-1 forward's attention; int8's ONNX Runtime classifier has no training mode
        model.eval()
    batches = eval_batches([len(f) for f in features], batch_size)
    outputs = []
    with Progress(len(batches), desc="predicting", enabled=progress) as bar:
        for batch in batches:
            inputs = collate([features[i] for i in batch], pad_token_id)
            inputs.pop("labels", None)
            with autocast(precision, device):
                logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            logits = logits.float().cpu().numpy()
            outputs.append([logits[row, : len(features[i])] if logits.ndim == 3 else logits[row]
                            for row, i in enumerate(batch)])
            bar.update()
    return in_original_order(batches, outputs)


def _documents(features: Sequence[Features]) -> list[np.ndarray]:
    """The feature indices of each document: consecutive features of one example (its windows)."""
    ends = np.flatnonzero(np.diff([f.document for f in features])) + 1
    return np.split(np.arange(len(features)), ends)


def document_outputs(task_type: str, features: Sequence[Features], outputs: Sequence[np.ndarray],
                     num_words: Sequence[int] | None = None) -> list[np.ndarray]:
    """One output per document (example) from those of its features, which are several when it was read
    in sliding windows. Sequence tasks average the windows' logits. Token classification gives the
    (num_words, L) logits of each word's tag, read at its first piece in the window where that piece sits
    farthest from a cut edge (the text's own start and end are no cut), so that every word is read with
    as much context on both sides as the windows offer; NaN rows for words no feature holds (cut off
    by max_length without sliding windows). num_words: each document's word count (token classification)."""
    results = []
    for document, rows in enumerate(_documents(features)):
        if task_type != "token-classification":
            results.append(np.mean([outputs[i] for i in rows], axis=0) if len(rows) > 1 else outputs[rows[0]])
            continue
        logits = np.full((num_words[document], outputs[rows[0]].shape[-1]), np.nan, dtype=np.float32)
        best = np.full(num_words[document], -1.0)  # each word's distance from a cut edge in the window read so far
        for k, i in enumerate(rows):
            positions = np.flatnonzero(features[i].word_ids >= 0)
            words = features[i].word_ids[positions]
            left = positions - 1.0 if k > 0 else np.full(len(positions), np.inf)  # text starts at position 1
            right = len(features[i]) - 2.0 - positions if k < len(rows) - 1 else np.full(len(positions), np.inf)
            distance = np.minimum(left, right)
            better = distance > best[words]
            logits[words[better]] = outputs[i][positions[better]]
            best[words[better]] = distance[better]
        results.append(logits)
    return results


def document_labels(task_type: str, features: Sequence[Features], num_words: Sequence[int] | None = None) -> list:
    """The reference of each document, as encoded in its features: its label (every window has it), or
    for token classification the (num_words,) tag ids of its words, data.IGNORE_INDEX where none is known."""
    references = []
    for document, rows in enumerate(_documents(features)):
        if task_type != "token-classification":
            references.append(features[rows[0]].label)
            continue
        tags = np.full(num_words[document], IGNORE_INDEX, dtype=np.int64)
        for i in rows:
            first = features[i].word_ids >= 0
            tags[features[i].word_ids[first]] = features[i].label[first]
        references.append(tags)
    return references


def predict_documents(model, features: Sequence[Features], examples: Sequence[Example], task_type: str, *,
                      batch_size: int, pad_token_id: int, device: torch.device, precision: str = "fp32",
                      progress: bool = False) -> list[np.ndarray]:
    """predict_logits, then document_outputs: one output per example, however many windows it was read in."""
    outputs = predict_logits(model, features, batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                             precision=precision, progress=progress)
    return document_outputs(task_type, features, outputs, word_counts(task_type, examples))


def word_counts(task_type: str, examples: Sequence[Example]) -> list[int] | None:
    return [len(ex.text) for ex in examples] if task_type == "token-classification" else None


# ----------------------------------------------------------------------------- outputs -> answers


def probabilities(task: ModelTask, logits: np.ndarray) -> np.ndarray:
    """Softmax over the labels (classification, tags), or a sigmoid per label (multilabel), of the
    logits divided by the calibration temperature (classification and multilabel: calibration.py)."""
    if task.task_type in calibration.CALIBRATED_TASKS:
        return calibration.probabilities(task.task_type, logits, task.temperature)
    return np.exp(log_softmax(logits))


def _rounded(values) -> list[float]:
    return np.round(np.asarray(values, dtype=np.float64), 6).tolist()  # 6 decimals: readable, and far below any error budget


def sequence_result(task: ModelTask, logits: np.ndarray) -> dict:
    """One text's result from its (L,) logits: label and probabilities, labels over their thresholds, or a value."""
    if task.task_type == "regression":
        return {"value": float(logits[0])}  # unrounded: a near-constant prediction keeps its correlations
    probs = probabilities(task, logits)
    named = dict(zip(task.labels, _rounded(probs)))
    if task.task_type == "multilabel":
        given = [label for label, p, t in zip(task.labels, probs, task.thresholds) if p >= t]
        return {"labels": given, "probabilities": named}
    best = int(probs.argmax())
    return {"label": task.labels[best], "score": named[task.labels[best]], "probabilities": named}


def word_tag_ids(task: ModelTask, logits: np.ndarray) -> list[int]:
    """The tag ids of the words with logits ((W', L), W' tagged words): the tag scheme's most probable
    valid sequence, with a CRF's transitions when the model has one (tagging.decode_tags)."""
    scores = logits if task.crf is not None else log_softmax(logits)  # a CRF scores logits, not log-probs
    return decode_tags(scores, task.labels, task.tag_scheme, task.crf)


def token_result(task: ModelTask, logits: np.ndarray, words: Sequence[str],
                 offsets: Sequence[tuple[int, int]] | None = None, text: str | None = None) -> dict:
    """One sentence's word tags and entities from its (W, L) word logits (NaN rows: a word without a
    tag, cut off by max_length). Entities span words (words[start:end]), or with the words' character
    offsets in `text`, characters (text[start:end]); an entity's score is the mean probability of its
    words' tags."""
    tagged = np.flatnonzero(~np.isnan(logits).any(axis=-1))
    ids = word_tag_ids(task, logits[tagged])
    chosen = probabilities(task, logits[tagged])[np.arange(len(ids)), ids]
    tags: list[str | None] = [None] * len(words)
    scores = np.full(len(words), np.nan)
    for word, tag, p in zip(tagged, ids, chosen):
        tags[word], scores[word] = task.labels[tag], p
    if offsets is None:  # words: an entity is a run of them
        found = [(span.start, span.end, span.label, first, last) for span, first, last in
                 entity_spans(tags, [(i, i + 1) for i in range(len(words))])]
        spans = [{"entity": label, "text": " ".join(words[start:end]), "start": start, "end": end,
                  "score": _rounded(scores[first : last + 1].mean())} for start, end, label, first, last in found]
    else:
        spans = [{"entity": span.label, "text": text[span.start : span.end], "start": span.start, "end": span.end,
                  "score": _rounded(scores[first : last + 1].mean())} for span, first, last in entity_spans(tags, offsets)]
    return {"tags": tags, "entities": spans}


def results(task: ModelTask, examples: Sequence[Example], outputs: Sequence[np.ndarray]) -> list[dict]:
    """Each example's result (see the module docstring) from its document output; token classification's
    entities over the example's words, or over its characters for span-annotated text."""
    if task.task_type != "token-classification":
        return [sequence_result(task, out) for out in outputs]
    answers = []
    for ex, out in zip(examples, outputs):
        tagged = ex.tagged_text
        answers.append(token_result(task, out, ex.text, *((tagged.offsets, tagged.text) if tagged else ())))
    return answers


def _metric_inputs(task: ModelTask, outputs: Sequence[np.ndarray], references: Sequence) -> tuple:
    """(predictions, references) as minibert.metrics takes them, one per document."""
    if task.task_type == "classification":
        return np.stack(outputs), np.array(references)
    if task.task_type == "regression":
        return np.stack(outputs)[:, 0], np.array(references)
    if task.task_type == "multilabel":
        decisions = probabilities(task, np.stack(outputs)) >= np.array(task.thresholds)
        return decisions.astype(np.int64), np.stack(references)
    predictions, tags = [], []
    for logits, reference in zip(outputs, references):
        tagged = ~np.isnan(logits).any(axis=-1) & (reference != IGNORE_INDEX)  # the words with a prediction
        predictions.append(np.array(word_tag_ids(task, logits[tagged]), dtype=np.int64))
        tags.append(reference[tagged])
    return predictions, tags


def score(task: ModelTask, outputs: Sequence[np.ndarray], references: Sequence,
          metric_names: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics of document outputs against their references (document_labels): one prediction per
    text, however many windows it was read in. Token classification scores the words that have a
    prediction (all of them with sliding windows; without, those cut off by max_length are left out)."""
    id2label = dict(enumerate(task.labels)) if task.labels is not None else None
    predictions, refs = _metric_inputs(task, outputs, references)
    return compute_metrics(task.task_type, predictions, refs, id2label=id2label, metric_names=metric_names)


def per_class(task: ModelTask, outputs: Sequence[np.ndarray], references: Sequence) -> dict | None:
    """Precision, recall, F1 and support of each class, label or entity type; None for regression."""
    if task.task_type == "regression":
        return None
    predictions, refs = _metric_inputs(task, outputs, references)
    return per_class_scores(task.task_type, predictions, refs, id2label=dict(enumerate(task.labels)))


def prediction_records(task: ModelTask, examples: Sequence[Example], answers: Sequence[dict]) -> list[dict]:
    """predictions.jsonl's lines: each input with its result and its gold label when it has one;
    span-annotated text comes back in its own format, the predicted entities as its spans."""
    records = []
    for ex, answer in zip(examples, answers):
        if ex.tagged_text is not None:
            found = [(Span(e["start"], e["end"], e["entity"]), e["score"]) for e in answer["entities"]]
            records.append(span_record(ex.tagged_text.record, ex.tagged_text.fmt, ex.tagged_text.text, found))
            continue
        if task.task_type == "token-classification":
            record = {"tokens": ex.text, **answer}
        else:
            record = {"text": ex.text, **({} if ex.text_pair is None else {"text_pair": ex.text_pair}), **answer}
        if ex.label is not None:
            record["gold"] = ex.label
        records.append(record)
    return records


# ----------------------------------------------------------------------------- the pipeline

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PROGRESS_FROM = 1000  # inputs: a progress bar for calls this large (progress=None); small calls stay quiet


class Pipeline:
    """A fine-tuned model with its tokenizer, ready to label texts; made by `pipeline()`.

    A call reads its inputs into Examples (`examples`), runs them through the model (`outputs`: one per
    input, its windows merged) and turns those into results (`results`); a new kind of output (word
    attributions, say) is one more step after `outputs`, with the same examples."""

    def __init__(self, model, tokenizer, task: ModelTask, *, name: str, max_length: int, stride: int | None,
                 device: torch.device, precision: Precision, batch_size: int, progress: bool | None):
        self.model, self.task, self.name = model, task, name
        self.max_length, self.stride, self.device, self.precision = max_length, stride, device, precision
        self.batch_size, self.progress = batch_size, progress
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # splits texts into words: the whole text, unpadded
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.encoder = truncating_tokenizer(tokenizer, max_length, stride or 0)  # prepared once: every call reuses it
        self.pad_token_id = tokenizer.token_to_id("[PAD]")
        self._float_model = None  # the fp32 model attributions take gradients through (explanations)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.task.task_type}, precision={self.precision.name})"

    def __call__(self, inputs, *, batch_size: int | None = None, progress: bool | None = None,
                 is_split_into_words: bool = False, explain: bool = False, explain_target: str | None = None,
                 explain_steps: int = DEFAULT_STEPS):
        """Results for a text, a (text, text_pair) tuple, or a list of them (a list of results, in
        order). A token classifier also takes words: a list of words with is_split_into_words=True
        (a list of such lists for several sentences).

        explain: each result also says which words moved it (minibert.attributions: integrated gradients
        on the word embeddings, in fp32): "attributions", [{"word", "start", "end", "attribution"}] with
        character offsets into the input (for a list of words, into the words joined by spaces), what
        they explain ("explains", "explained_score": the calibrated probability of the predicted label,
        or of explain_target; a regression's value) and the "completeness" check. A token classifier
        explains each entity. explain_steps: integration points to start from (raised until complete)."""
        single = _is_single(inputs, is_split_into_words)
        examples = self.examples([inputs] if single else list(inputs), is_split_into_words)
        if not examples:
            return []
        if explain:
            self._check_explainable(explain_target)
        elif explain_target is not None:
            raise ValueError("explain_target names the label whose probability is explained: pass explain=True with it")
        show = progress if progress is not None else self.progress
        features = self.encode(examples)
        outputs = self.outputs(examples, features, batch_size=batch_size,
                               progress=len(examples) >= PROGRESS_FROM if show is None else show)
        answers = results(self.task, examples, outputs)
        if explain:
            answers = self.explanations(examples, features, answers, target=explain_target, steps=explain_steps)
        if self.task.task_type == "token-classification" and not is_split_into_words:
            answers = [answer["entities"] for answer in answers]  # a text's entities, in its characters
        return answers[0] if single else answers

    def examples(self, items: Sequence, is_split_into_words: bool = False) -> list[Example]:
        """The inputs of a call as Examples, each checked; a token classifier's texts split into the
        words it tags, with their character offsets (as span-annotated text is)."""
        examples = [self._example(item, i, is_split_into_words) for i, item in enumerate(items)]
        if self.task.task_type == "token-classification" and not is_split_into_words and examples:
            offsets = word_offsets(self.tokenizer, [ex.text for ex in examples])
            # as span-annotated text without spans: {"text": ...} in minibert's span format
            examples = [Example([ex.text[a:b] for a, b in spans], tagged_text=TaggedText(ex.text, spans, None, "minibert",
                                                                                           {"text": ex.text}))
                        for ex, spans in zip(examples, offsets)]
        return examples

    def encode(self, examples: Sequence[Example], *, labelled: bool = False, source: str = "the input") -> list[Features]:
        """Examples as the model reads them (in windows with sliding_window); with labelled, their labels
        too (scoring a labelled file: the model's own labels name the ids). source names them in errors."""
        self._check_pairs(examples[0].text_pair is not None, "the input")
        vocab = LabelVocab(self.task.labels) if labelled and self.task.labels is not None else None
        if not labelled:
            examples = [dataclasses.replace(ex, label=None) for ex in examples]
        return encode_examples(self.encoder, examples, max_length=self.max_length, task_type=self.task.task_type,
                               label_vocab=vocab, source=source, stride=self.stride)

    def outputs(self, examples: Sequence[Example], features: Sequence[Features] | None = None, *,
                batch_size: int | None = None, progress: bool = False) -> list[np.ndarray]:
        """The model's outputs for Examples (encoded, unless their `features` are given), one per example:
        its windows merged (document_outputs)."""
        features = self.encode(examples) if features is None else features
        return predict_documents(self.model, features, examples, self.task.task_type,
                                 batch_size=batch_size or self.batch_size, pad_token_id=self.pad_token_id,
                                 device=self.device, precision=self.precision.name, progress=progress)

    def explanations(self, examples: Sequence[Example], features: Sequence[Features], answers: Sequence[dict], *,
                     target: str | None = None, steps: int = DEFAULT_STEPS) -> list[dict]:
        """The answers (results()) with their word attributions, as __call__ gives them."""
        explained, _ = self.explained_records(examples, features, answers, answers, target=target, steps=steps)
        if self.task.task_type != "token-classification":
            return explained
        # Each entity as results() gave it (with its score), plus its explanation; the same entity_spans made both.
        return [{"tags": answer["tags"],
                 "entities": [{**entity, **{k: v for k, v in why.items() if k not in entity}}
                              for entity, why in zip(answer["entities"], record["explanations"]["entities"])]}
                for answer, record in zip(answers, explained)]

    def explained_records(self, examples: Sequence[Example], features: Sequence[Features], answers: Sequence[dict],
                          records: Sequence[dict], *, target: str | None = None,
                          steps: int = DEFAULT_STEPS) -> tuple[list[dict], list[dict]]:
        """attributions.explain_records for this pipeline's predictions (answers: results(); records: what gains
        the attributions, the answers themselves or predictions.jsonl's lines), and the records the page shows.
        Integrated gradients needs fp32 gradients: a bf16/fp16 pipeline explains an fp32 copy of its model,
        made once, which holds the weights it predicts with (rounded to bf16 when it was loaded), so it
        explains the model that answered; the fp32 model's own attributions differ from those by that rounding."""
        self._check_explainable(target)
        long = sorted({f.document for f in features if f.document is not None and
                       sum(g.document == f.document for g in features) > 1})
        if long:
            raise ValueError(f"input {long[0] + 1} is longer than max_length={self.max_length} tokens and was read in "
                             "windows, and attributions explain one reading of a text: explain without sliding windows "
                             "(which reads the first max_length tokens), or raise max_length")
        if self._float_model is None:
            self._float_model = (self.model if self.precision.name == "fp32"
                                 else copy.deepcopy(self.model).float()).eval()
        tags = [answer["tags"] for answer in answers] if self.task.task_type == "token-classification" else None
        return explain_records(self._float_model, self.tokenizer, self.task.task_type, self.task.labels, examples,
                               records, tags=tags, temperature=self.task.temperature, target=target,
                               steps=steps, max_length=self.max_length, device=self.device)

    def _check_explainable(self, target: str | None) -> None:
        if self.precision.name == "int8":
            raise ValueError("explain=True takes gradients through the torch model, and precision int8 runs ONNX Runtime: "
                             "use precision='fp32' (or 'bf16') to explain")
        if target is not None and self.task.task_type not in ("classification", "multilabel"):
            what = "its value" if self.task.task_type == "regression" else "each entity"
            raise ValueError(f"explain_target names a label to explain, and a {self.task.task_type} model explains "
                             f"{what}: leave explain_target out")
        if target is not None and target not in self.task.labels:
            raise ValueError(f"explain_target {target!r} is not a label of {self.name}: choose one of "
                             f"{', '.join(self.task.labels)}")

    def _check_pairs(self, pairs: bool, where: str) -> None:
        if pairs and self.task.task_type == "token-classification":
            raise ValueError(f"{where} is a text pair, and a token classifier tags single texts: pass one string")
        if pairs and self.task.text_pairs is False:
            raise ValueError(f"{where} is a text pair, but {self.name} was fine-tuned on single texts: pass one string "
                             "(join the two texts if both matter)")
        if not pairs and self.task.text_pairs:
            raise ValueError(f"{where} is a single text, but {self.name} was fine-tuned on text pairs: pass "
                             "(text, text_pair) tuples")

    def _example(self, item, index: int, is_split_into_words: bool) -> Example:
        where = f"input {index + 1}"
        if is_split_into_words:
            if self.task.task_type != "token-classification":
                raise ValueError(f"is_split_into_words is for token classifiers, and {self.name} is a "
                                 f"{self.task.task_type} model: pass each text as one string")
            if not isinstance(item, (list, tuple)) or not item:
                raise ValueError(f"{where} is not a non-empty list of words: with is_split_into_words=True pass "
                                 "each sentence as a list of strings")
            for position, word in enumerate(item):
                _check_text(word, f"{where}, word {position + 1}")
            return Example(list(item))
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"{where} is a tuple of {len(item)}: a text pair is a (text, text_pair) tuple of two "
                                 "strings")
            self._check_pairs(True, where)
            _check_text(item[0], f"{where}, text")
            _check_text(item[1], f"{where}, text_pair")
            return Example(item[0], item[1])
        _check_text(item, where)
        self._check_pairs(False, where)
        return Example(item)


def _is_single(inputs, is_split_into_words: bool) -> bool:
    if is_split_into_words:  # one sentence is a list of strings; several are a list of lists
        return isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(word, str) for word in inputs)
    return isinstance(inputs, (str, tuple))


def _check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where} is a {type(text).__name__}, not a string: pass texts as str "
                         "(a pair as a (text, text_pair) tuple)")
    if not text.strip():
        raise ValueError(f"{where} is an empty string: the model has nothing to read; leave it out, or give it some text")


def pipeline(model: str | os.PathLike, *, precision: str = "auto", device: str | None = None, batch_size: int = 32,
             max_length: int | None = None, sliding_window: bool = False, stride: int | None = None,
             threshold: float | None = None, progress: bool | None = None, attn_impl: str | None = None,
             config_overrides: dict | None = None) -> Pipeline:
    """A fine-tuned BERT, ready to label texts: a directory minibert or transformers wrote, or a hub id.

    precision: "auto" (bf16 where the device multiplies it faster than fp32, else fp32), "fp32", "bf16", "int8"
        (CPU, through ONNX Runtime; for CPUs without native bf16), or "fp16" (CUDA); the choice and its
        reason are logged.
    device: "cpu", "cuda", ...; default the GPU if there is one.
    batch_size: texts per forward pass; inputs are sorted by length into batches, results keep input order.
    max_length: tokens per input with [CLS]/[SEP]; longer ones are cut (default: what the model was
        fine-tuned with, else 128 or the model's positions if it has fewer).
    sliding_window: read longer inputs whole, in overlapping windows of max_length tokens: a text's
        result averages its windows' logits; a word's tag comes from the window where it sits farthest
        from a cut edge. stride: the tokens neighbouring windows share (default max_length // 4).
    threshold: multilabel: the probability from which every label is given (default: the model's tuned
        label_thresholds, else 0.5).
    progress: a progress bar; None shows one for calls of PROGRESS_FROM inputs or more.
    attn_impl: an attention backend other than the checkpoint's ("eager", "sdpa", "triton").
    config_overrides: other BertConfig fields to set on the loaded model ({"unpad": False}, say).
    """
    name = str(model)
    device, chosen = _device_and_precision(device, precision, batch_size, sliding_window, stride)
    directory = resolve_model_dir(model)
    config = BertConfig.from_json_file(directory / "config.json")
    task_type, labels, text_pairs = checkpoint_task(directory, config, name)
    tokenizer = load_tokenizer(directory)
    if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise ValueError(f"the tokenizer of {name} has more tokens than the model has word embeddings: the tokenizer "
                         "files belong to another model; put the checkpoint's own tokenizer next to its weights")
    overrides = {**(config_overrides or {}), **({"attn_impl": attn_impl} if attn_impl else {})}
    net = load_classifier(directory, task_type, **overrides)
    return ready_pipeline(net, tokenizer, task_type, labels, name=name, text_pairs=text_pairs,
                          max_length=max_length or run_record(directory).get("max_length"), precision=precision,
                          device=str(device), batch_size=batch_size, sliding_window=sliding_window, stride=stride,
                          threshold=threshold, progress=progress)


def ready_pipeline(net, tokenizer, task_type: str, labels: Sequence[str] | None, *, name: str,
                   text_pairs: bool | None = None, max_length: int | None = None, precision: str = "auto",
                   device: str | None = None, batch_size: int = 32, sliding_window: bool = False,
                   stride: int | None = None, threshold: float | None = None, progress: bool | None = None) -> Pipeline:
    """A Pipeline around a classifier already loaded (a LoRA model, say: train_finetune.py --lora-adapter);
    the settings are pipeline()'s, max_length None is 128 or the model's positions if it has fewer."""
    device, chosen = _device_and_precision(device, precision, batch_size, sliding_window, stride)
    positions = net.config.max_position_embeddings
    max_length = max_length or min(128, positions)
    if max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the {positions} positions of {name}: use max_length={positions} "
                         "or less")
    if sliding_window:
        stride = max_length // 4 if stride is None else stride
        check_stride(stride, max_length, tokenizer.num_special_tokens_to_add(bool(text_pairs)), bool(text_pairs))
    task = ModelTask.of(net, task_type, labels, text_pairs=text_pairs, threshold=threshold)
    logger.info("minibert: %s predicts in %s (%s)", name, chosen.name, chosen.reason)
    net = int8_model(net) if chosen.name == "int8" else prepare_for_precision(net.to(device).eval(), chosen.name)
    return Pipeline(net, tokenizer, task, name=name, max_length=max_length, stride=stride, device=device,
                    precision=chosen, batch_size=batch_size, progress=progress)


def _device_and_precision(device: str | None, precision: str, batch_size: int, sliding_window: bool,
                          stride: int | None) -> tuple[torch.device, Precision]:
    """The settings that need no model, checked before one is loaded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU: use device='cpu'")
    if stride is not None and not sliding_window:
        raise ValueError(f"stride={stride} is the overlap of sliding windows: pass sliding_window=True with it")
    return device, resolve_precision(precision, device, choices=PRECISIONS)


def prepare_for_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model, readied for inference at `precision`: bf16/fp16 keep the Linear weights in that format
    (autocast would cast them again on every call; the numbers are the same)."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)
    return model
