"""Word attributions: which words of a text moved a prediction, by integrated gradients on the word embeddings.

Integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks") walks in a
straight line from a baseline input x' to the input x and adds up the gradient of the explained score f
along the way. For token i, with e_i the word embedding it contributes:

    attribution_i = (e_i - e'_i) . integral_0^1 df/de_i (e' + a (e - e')) da

The integral is a sum over `steps` points (Gauss-Legendre, captum's default). Its defining property,
completeness, is what makes the numbers readable: the attributions add up to f(x) - f(x'). The sum is
checked; when it is off by more than COMPLETENESS_TOLERANCE of f(x) - f(x'), the steps are doubled (up to
MAX_DOUBLINGS times) until it is not, and what was reached is reported with every explanation.

    score = class_probability("classification", target=1, temperature=1.4)     # what is explained
    explanation = explain(model, encoding, ("a gripping , tender film",), score, baseline_token_id=pad_id)
    explanation.words   # [{"word": "gripping", "start": 2, "end": 10, "attribution": 0.31}, ...]
    explanation.record("probability of 'positive'")   # what a prediction record gains: words, score, the check

The baseline keeps [CLS] and [SEP] and puts the [PAD] (or [MASK]) embedding at every other token: the
"empty text" BERT can read. Only the word embeddings move; positions and segments stay those of x. Word
pieces are summed into the words the tokenizer split the text into (punctuation is a word of its own),
with character offsets into the text. The integration is captum's LayerIntegratedGradients, which hooks
the word-embedding layer, so the model's own forward pass runs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from tokenizers import Tokenizer
from torch import Tensor

from minibert.spans import entity_spans

logger = logging.getLogger("minibert")

DEFAULT_STEPS = 50  # the paper finds 20 to 300 enough; Gauss-Legendre points need the fewest
COMPLETENESS_TOLERANCE = 0.05  # the paper's check: the attributions sum to within 5% of f(x) - f(x')
COMPLETENESS_FLOOR = 1e-4  # an absolute slack, for scores that barely move between baseline and input
MAX_DOUBLINGS = 3  # steps, 2 steps, 4 steps, 8 steps; then the result is reported as it is
TOKENS_PER_CHUNK = 4096  # interpolation points run as batches of about this many tokens (memory bound)
BASELINE_TOKENS = ("[PAD]", "[MASK]")


# ----------------------------------------------------------------------------- what is explained


def class_probability(task_type: str, target: int, temperature: float | Sequence[float] = 1.0) -> Callable[[Tensor], Tensor]:
    """The score of one output of a sequence classifier, as the predictions report it: logits (B, L) -> (B,).
    classification: softmax(logits / T)[target]; multilabel: sigmoid(logits[target] / T_target);
    regression: the predicted value itself."""
    if task_type == "regression":
        return lambda logits: logits[:, 0]
    t = np.asarray(temperature, dtype=np.float64)
    if task_type == "multilabel":
        t_target = float(t[target]) if t.ndim else float(t)
        return lambda logits: torch.sigmoid(logits[:, target] / t_target)
    if task_type == "classification":
        return lambda logits: torch.softmax(logits / float(t), dim=-1)[:, target]
    raise ValueError(f"class_probability explains sequence classifiers, not {task_type!r}")


def entity_probability(positions: Sequence[int], tag_ids: Sequence[int], temperature: float = 1.0) -> Callable[[Tensor], Tensor]:
    """The score of an entity of a token classifier: the mean probability of its predicted tags at its
    word pieces (how transformers' token-classification pipeline scores an entity): (B, T, L) -> (B,)."""
    positions, tags = torch.as_tensor(list(positions)), torch.as_tensor(list(tag_ids))

    def score(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits[:, positions] / temperature, dim=-1)  # (B, P, L)
        return probs[:, torch.arange(len(positions)), tags].mean(dim=-1)

    return score


# ----------------------------------------------------------------------------- integrated gradients


@dataclass
class Explanation:
    words: list[dict]  # {"word", "start", "end", "attribution"} (+ "segment": 1 for a pair's second text)
    score: float  # f(x), the explained score of the input
    baseline_score: float  # f(x'), the same for the baseline
    attribution_sum: float  # what completeness compares with score - baseline_score
    steps: int  # interpolation points used (after any raising)

    @property
    def completeness_error(self) -> float:
        return self.attribution_sum - (self.score - self.baseline_score)

    @property
    def complete(self) -> bool:
        return _within_tolerance(self.completeness_error, self.score - self.baseline_score)

    def record(self, explains: str) -> dict:
        """What a prediction gains from it: `explains` names the score (e.g. "probability of 'positive'")."""
        return {"explains": explains, "explained_score": round(self.score, 6), "attributions": self.words,
                "completeness": {"attribution_sum": round(self.attribution_sum, 6),
                                 "score_change": round(self.score - self.baseline_score, 6),
                                 "steps": self.steps, "within_tolerance": self.complete}}


def _within_tolerance(error: float, change: float) -> bool:
    return abs(error) <= COMPLETENESS_TOLERANCE * abs(change) + COMPLETENESS_FLOOR


def baseline_ids(input_ids: Tensor, special_tokens_mask: Tensor, baseline_token_id: int) -> Tensor:
    """x': the input with every token but the special ones ([CLS], [SEP]) replaced by the baseline token."""
    return torch.where(special_tokens_mask.bool(), input_ids, torch.full_like(input_ids, baseline_token_id))


def token_attributions(model, input_ids: Tensor, token_type_ids: Tensor, baseline: Tensor, score: Callable[[Tensor], Tensor],
                       steps: int) -> tuple[np.ndarray, float, float, float]:
    """IG of score(model(...).logits) over the word embeddings of one text: input_ids, token_type_ids and
    baseline are (1, T). Returns per-token attributions (T,) and f(x), f(x'), the completeness error."""
    model.eval()
    mask = torch.ones_like(input_ids)

    def forward(ids: Tensor, attention_mask: Tensor, types: Tensor) -> Tensor:
        return score(model(ids, attention_mask, types).logits.float())

    with torch.no_grad():
        f_x, f_baseline = (float(forward(ids, mask, token_type_ids)) for ids in (input_ids, baseline))
    ig = LayerIntegratedGradients(forward, model.bert.embeddings.word)
    attributions, delta = ig.attribute(input_ids, baselines=baseline, additional_forward_args=(mask, token_type_ids),
                                       n_steps=steps, internal_batch_size=max(1, TOKENS_PER_CHUNK // input_ids.shape[1]),
                                       return_convergence_delta=True)
    per_token = attributions.sum(dim=-1)[0].detach().double().cpu().numpy()  # (1, T, C) -> (T,)
    return per_token, f_x, f_baseline, float(delta)


def explain(model, encoding, texts: Sequence[str], score: Callable[[Tensor], Tensor], *, baseline_token_id: int,
            steps: int = DEFAULT_STEPS, device: torch.device | str = "cpu") -> Explanation:
    """Word attributions for one encoded text (a `tokenizers.Encoding` of texts[0], or of the pair texts),
    raising the steps until completeness holds. The model must be a float model in eval mode (gradients)."""
    if steps < 1:
        raise ValueError(f"integrated gradients needs at least 1 step, got {steps}")
    as_tensor = lambda values: torch.tensor([values], dtype=torch.long, device=device)
    input_ids, token_type_ids = as_tensor(encoding.ids), as_tensor(encoding.type_ids)
    baseline = baseline_ids(input_ids, as_tensor(encoding.special_tokens_mask), baseline_token_id)
    for doubling in range(MAX_DOUBLINGS + 1):
        per_token, f_x, f_baseline, delta = token_attributions(model, input_ids, token_type_ids, baseline, score, steps)
        if _within_tolerance(delta, f_x - f_baseline) or doubling == MAX_DOUBLINGS:
            break
        steps *= 2
    explanation = Explanation(words_from_pieces(per_token, encoding, texts), f_x, f_baseline, float(per_token.sum()), steps)
    if not explanation.complete:
        logger.warning("minibert: integrated gradients with %d steps still miss completeness by %.2g (the score moves "
                       "by %.2g): read these attributions with care, or raise the steps", steps,
                       explanation.completeness_error, f_x - f_baseline)
    return explanation


def words_from_pieces(per_token: np.ndarray, encoding, texts: Sequence[str]) -> list[dict]:
    """Sum word pieces into their words, in text order, with character offsets into their text. Special
    tokens belong to no word (their attribution is exactly 0: the baseline keeps them)."""
    words: dict[tuple[int, int], dict] = {}
    for value, segment, word, (start, end) in zip(per_token, encoding.sequence_ids, encoding.word_ids, encoding.offsets):
        if word is None:
            continue
        entry = words.get((segment, word))
        if entry is None:
            entry = words[(segment, word)] = {"start": start, "end": end, "attribution": 0.0, "segment": segment}
        entry["start"], entry["end"] = min(entry["start"], start), max(entry["end"], end)
        entry["attribution"] += float(value)
    result = []
    for entry in words.values():
        record = {"word": texts[entry["segment"]][entry["start"] : entry["end"]], "start": entry["start"], "end": entry["end"],
                  "attribution": round(entry["attribution"], 6)}
        if entry["segment"]:
            record["segment"] = entry["segment"]
        result.append(record)
    return result


# ----------------------------------------------------------------------------- a prediction's explanation


def explained_label(task_type: str, labels: Sequence[str], result: dict, target: str | None = None) -> str:
    """The label whose probability is explained: the named target, else the prediction (classification), or
    the most probable label (multilabel: of those predicted, when any are)."""
    if target is not None:
        if target not in labels:
            raise ValueError(f"explain target {target!r} is not a label of the model: choose one of {', '.join(labels)}")
        return target
    if task_type == "classification":
        return result["label"]
    candidates = result["labels"] or labels
    return max(candidates, key=lambda label: result["probabilities"][label])


def explain_sequence(model, encoding, texts: Sequence[str], task_type: str, labels: Sequence[str] | None, result: dict, *,
                     baseline_token_id: int, temperature: float | Sequence[float] = 1.0, target: str | None = None,
                     steps: int = DEFAULT_STEPS, device: torch.device | str = "cpu") -> dict:
    """What a text's prediction (`result`, a pipeline result) gains: {"explains", "explained_score", "attributions",
    "completeness"}. Classification and multilabel explain the (calibrated) probability of one label; regression,
    which has no probabilities, explains the predicted value itself, and says so."""
    if task_type == "regression":
        if target is not None:
            raise ValueError(f"explain target {target!r}: a regression model has one output, the value, and no labels")
        score, explains = class_probability("regression", 0), "predicted value (regression: no class to explain)"
    else:
        label = explained_label(task_type, labels, result, target)
        score = class_probability(task_type, list(labels).index(label), temperature)
        explains = f"probability of {label!r}"
    explanation = explain(model, encoding, texts, score, baseline_token_id=baseline_token_id, steps=steps, device=device)
    return explanation.record(explains)


def explain_entity(model, encoding, text: str, entity: dict, word_spans: Sequence[tuple[int, int]], tag_ids: Sequence[int], *,
                   baseline_token_id: int, temperature: float = 1.0, steps: int = DEFAULT_STEPS,
                   device: torch.device | str = "cpu") -> dict:
    """What an entity of a token classifier gains: the attributions of the text's words to the entity's score,
    the mean probability of its words' predicted tags (tag_ids) at each word's first piece. entity: {"entity",
    "text", ...}; word_spans: the character spans in `text` of the entity's words, one per tag; `encoding` is
    the tokenizer's encoding of text."""
    if len(word_spans) != len(tag_ids):
        raise ValueError(f"the entity {entity['text']!r} has {len(word_spans)} word(s) and {len(tag_ids)} tag(s): "
                         "give one tag per word")
    starts = {}  # a character offset -> the first piece that starts there
    for position, (word, (start, _)) in enumerate(zip(encoding.word_ids, encoding.offsets)):
        if word is not None:
            starts.setdefault(start, position)
    missing = [text[a:b] for a, b in word_spans if a not in starts]
    if missing:
        raise ValueError(f"the entity {entity['text']!r} has words the encoding does not start a piece at "
                         f"({', '.join(map(repr, missing))}): cut off by max_length, or not this text's encoding")
    score = entity_probability([starts[a] for a, _ in word_spans], tag_ids, temperature)
    explanation = explain(model, encoding, (text,), score, baseline_token_id=baseline_token_id, steps=steps, device=device)
    return explanation.record(f"score of {entity['entity']} {entity['text']!r}")


def explain_entities(model, encoding, text: str, word_spans: Sequence[tuple[int, int]], tags: Sequence[str | None],
                     labels: Sequence[str], *, baseline_token_id: int, steps: int = DEFAULT_STEPS,
                     device: torch.device | str = "cpu") -> list[dict]:
    """Each entity of a tagged text ({"entity", "text", "start", "end"}, character offsets into text), explained
    (explain_entity): word_spans are the character spans of the text's words, tags their predicted tags."""
    explained = []
    for span, first, last in entity_spans(tags, word_spans):
        entity = {"entity": span.label, "text": text[span.start : span.end], "start": span.start, "end": span.end}
        tag_ids = [list(labels).index(tags[w]) for w in range(first, last + 1)]
        explained.append({**entity, **explain_entity(model, encoding, text, entity, word_spans[first : last + 1], tag_ids,
                                                     baseline_token_id=baseline_token_id, steps=steps, device=device)})
    return explained


def explain_records(model, tokenizer, task_type: str, labels: Sequence[str] | None, examples, records: Sequence[dict], *,
                    tags: Sequence[Sequence[str | None]] | None = None, temperature: float | Sequence[float] = 1.0,
                    target: str | None = None, steps: int = DEFAULT_STEPS, max_length: int = 512,
                    device: torch.device | str = "cpu") -> tuple[list[dict], list[dict]]:
    """Predictions with their word attributions, and the records explanations.html shows (explanation_page).

    examples: what was predicted (data.Example: text, text_pair; a tagger's words, or span-annotated text
    with its word offsets); records: each one's prediction (predictions.jsonl's line, or a pipeline result);
    tags: a tagger's predicted tag per word. A text's record gains explain_sequence's fields (the calibrated
    probability of its label, or of `target`; a regression's value); a tagger's gains "explanations":
    {"text", "entities"}, each entity explained (for words, in the text they make joined by spaces). The
    texts are cut at max_length tokens, as the model read them; the model must be in float32."""
    encoder = Tokenizer.from_str(tokenizer.to_str())  # what the model read: cut at max_length, unpadded
    encoder.enable_truncation(max_length)
    encoder.no_padding()
    common = {"baseline_token_id": tokenizer.token_to_id("[PAD]"), "steps": steps, "device": device}
    explained, page = [], []
    for i, (ex, record) in enumerate(zip(examples, records)):
        if task_type == "token-classification":
            if ex.tagged_text is not None:
                text, spans = ex.tagged_text.text, ex.tagged_text.offsets
            else:
                text = " ".join(ex.text)
                starts = np.cumsum([0] + [len(w) + 1 for w in ex.text[:-1]])
                spans = [(int(a), int(a) + len(w)) for a, w in zip(starts, ex.text)]
            entities = explain_entities(model, encoder.encode(text), text, spans, tags[i], labels, **common)
            explained.append({**record, "explanations": {"text": text, "entities": entities}})
            page.append({"text": text, "entities": entities})
            continue
        texts = (ex.text,) if ex.text_pair is None else (ex.text, ex.text_pair)
        record = {**record, **explain_sequence(model, encoder.encode(*texts), texts, task_type, labels, record,
                                               temperature=temperature, target=target, **common)}
        explained.append(record)
        value = record.get("value", record.get("prediction"))  # a regression's: the page's headline
        page.append({**record, "value": value} if task_type == "regression" else record)
    return explained, page
