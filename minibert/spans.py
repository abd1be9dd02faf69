"""Span-annotated NER data: raw text with entities as character offsets, as annotation tools export it.

Three formats are read, one JSON object per text (JSON Lines, or a .json array):

    minibert        {"text": "Barack Obama visited 北京.", "spans": [{"start": 0, "end": 12, "label": "PER"}, ...]}
    doccano         {"text": ..., "label": [[0, 12, "PER"], ...]}  ("labels" in older exports), or, from a
                    project with relations, {"text": ..., "entities": [{"start_offset": 0, "end_offset": 12,
                    "label": "PER"}, ...]}
    Label Studio    its JSON export, a list of tasks: {"data": {"text": ...}, "annotations": [{"result":
                    [{"type": "labels", "value": {"start": 0, "end": 12, "text": "Barack Obama",
                    "labels": ["PER"]}}, ...]}]}; the first annotation that was not cancelled is used

`start` and `end` count characters (code points, Python's str indexing), `end` exclusive. Label Studio's
browser counts UTF-16 code units, which differ after a character outside the Basic Multilingual Plane
(an emoji); its spans carry their text, and an offset that only fits in UTF-16 units is converted.

Training needs a tag per word: the tokenizer splits the text into words (its pre-tokenizer: spaces,
punctuation, each CJK character on its own, with character offsets into the original text), and the
words a span covers are tagged in --tag-scheme bio (B-PER I-PER) or bioes (B-PER E-PER, S-PER). A span
must begin and end where words do: one that does not is an error naming its line and text, never
shifted to fit. Overlapping spans are an error naming both (a tag per word holds one entity).
Predictions come back the other way, word tags -> spans (entity_spans), written in the format they came
in (span_record), so a file goes in and out in the same format; for Label Studio as "predictions",
which it imports as pre-annotations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from minibert.tagging import SCHEMES, split_tag

FORMATS = ("minibert", "doccano", "label-studio")


class SpanError(ValueError):
    """Span annotations that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Span:
    start: int  # first character
    end: int  # one past the last character
    label: str


def record_format(record: dict) -> str | None:
    """Which of FORMATS a JSON object is written in; None when it holds no raw text (e.g. "tokens" lists)."""
    if isinstance(record.get("data"), dict) and ("annotations" in record or "predictions" in record):
        return "label-studio"
    if not isinstance(record.get("text"), str):
        return None
    if "spans" in record:
        return "minibert"
    if "entities" in record or isinstance(record.get("label"), list) or isinstance(record.get("labels"), list):
        return "doccano"
    return "minibert"  # text alone: unlabelled


def has_span_annotations(record: dict) -> bool:
    """Whether a JSON object surely is span-annotated NER data (for telling the task type of a file): a
    Label Studio task, "spans", doccano's "entities", or doccano [start, end, label] triples."""
    fmt = record_format(record)
    if fmt == "label-studio" or (fmt == "minibert" and "spans" in record):
        return True
    triples = record.get("label", record.get("labels"))
    return fmt == "doccano" and ("entities" in record or (
        bool(triples) and all(isinstance(t, list) and len(t) == 3 and isinstance(t[0], int) for t in triples)))


def _utf16_to_index(text: str, units: int) -> int | None:
    """The code point index at a UTF-16 offset (what a browser counts), None inside a surrogate pair."""
    position = 0
    for index, char in enumerate(text):
        if position == units:
            return index
        position += 2 if ord(char) > 0xFFFF else 1
        if position > units:
            return None
    return len(text) if position == units else None


def _label_studio_spans(record: dict, text: str, where: str) -> list[Span] | None:
    annotations = [a for a in record.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return None
    spans = []
    for result in annotations[0].get("result") or []:
        if not isinstance(result, dict) or result.get("type") != "labels":
            continue  # another control's result (a choice, a text area): not an entity
        value = result.get("value") or {}
        start, end, labels = value.get("start"), value.get("end"), value.get("labels")
        if not isinstance(labels, list) or len(labels) != 1:
            raise SpanError(f"{where}: a Label Studio region has labels {labels!r}; give each region one label")
        quoted = value.get("text")
        if isinstance(quoted, str) and isinstance(start, int) and isinstance(end, int) and text[start:end] != quoted:
            start16, end16 = _utf16_to_index(text, start), _utf16_to_index(text, end)
            if start16 is not None and end16 is not None and text[start16:end16] == quoted:
                start, end = start16, end16  # browser offsets after an emoji
            else:
                raise SpanError(f"{where}: the region {start}..{end} says its text is {quoted!r} but the task's text "
                                f"there is {text[start:end]!r}: the offsets do not belong to this text")
        spans.append((start, end, labels[0]))
    return [_span(s, e, label, text, where) for s, e, label in spans]


def _span(start, end, label, text: str, where: str) -> Span:
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        raise SpanError(f"{where}: span offsets must be integers, found start={start!r}, end={end!r}")
    if not isinstance(label, str) or not label.strip():
        raise SpanError(f"{where}: the span {start}..{end} has label {label!r}; give each span a non-empty label")
    if not 0 <= start < end <= len(text):
        raise SpanError(f"{where}: the span {start}..{end} ({label}) lies outside the text, which has {len(text)} "
                        "characters; offsets count characters from 0, end exclusive")
    if label.strip() == "O":
        raise SpanError(f"{where}: the span {start}..{end} has label 'O', the tag of words outside every entity; "
                        "leave such text without a span")
    return Span(start, end, label.strip())


def read_record(record: dict, fmt: str, where: str) -> tuple[str, list[Span] | None]:
    """(text, spans) of one JSON object in format `fmt`, spans sorted by start; spans None when the
    object has no annotation (a text to label)."""
    if fmt == "label-studio":
        text = record["data"].get("text")
        if not isinstance(text, str):
            raise SpanError(f"{where}: a Label Studio task needs its text in data.text, found {text!r}")
        spans = _label_studio_spans(record, text, where)
    else:
        text = record["text"]
        if fmt == "minibert":
            raw = record.get("spans")
            if raw is not None and not (isinstance(raw, list) and all(isinstance(s, dict) for s in raw)):
                raise SpanError(f"{where}: \"spans\" must be a list of {{\"start\", \"end\", \"label\"}} objects, found {raw!r}")
            spans = None if raw is None else [_span(s.get("start"), s.get("end"), s.get("label"), text, where) for s in raw]
            for s, span in zip(raw or [], spans or []):
                if isinstance(s.get("text"), str) and s["text"] != text[span.start : span.end]:
                    raise SpanError(f"{where}: the span {span.start}..{span.end} says its text is {s['text']!r} but the "
                                    f"text there is {text[span.start:span.end]!r}: correct the offsets")
        elif "entities" in record:
            raw = record["entities"]
            if not (isinstance(raw, list) and all(isinstance(s, dict) for s in raw)):
                raise SpanError(f"{where}: doccano \"entities\" must be a list of objects, found {raw!r}")
            spans = [_span(s.get("start_offset"), s.get("end_offset"), s.get("label"), text, where) for s in raw]
        else:
            raw = record.get("label", record.get("labels"))
            if not all(isinstance(s, list) and len(s) == 3 for s in raw):
                raise SpanError(f"{where}: doccano labels must be [start, end, label] triples, found {raw!r}")
            spans = [_span(s, e, label, text, where) for s, e, label in raw]
    if spans is None:
        return text, None
    spans = sorted(spans, key=lambda s: (s.start, s.end))
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise SpanError(f"{where}: the spans {a.start}..{a.end} {text[a.start:a.end]!r} ({a.label}) and {b.start}..{b.end} "
                            f"{text[b.start:b.end]!r} ({b.label}) overlap; a tag per word holds one entity: keep one of them")
    return text, spans


def word_offsets(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    """For each text, the (start, end) character offsets of the words the tokenizer's pre-tokenizer
    makes (the units that get a tag), from the offsets of their word pieces."""
    tok = tokenizer
    if tok.truncation is not None or tok.padding is not None:  # a copy without them: the caller's keeps its settings
        tok = Tokenizer.from_str(tokenizer.to_str())
        tok.no_truncation()
        tok.no_padding()
    result = []
    for encoding in tok.encode_batch(list(texts), add_special_tokens=False):
        words: dict[int, list[int]] = {}
        for word, (start, end) in zip(encoding.word_ids, encoding.offsets):
            if word is not None:
                bounds = words.setdefault(word, [start, end])
                bounds[0], bounds[1] = min(bounds[0], start), max(bounds[1], end)
        result.append([(words[w][0], words[w][1]) for w in sorted(words)])
    return result


def _misalignment(span: Span, offsets: Sequence[tuple[int, int]], text: str) -> str | None:
    """Why a span cannot be tagged on these words, or None when it starts and ends on word boundaries."""
    for start, end in offsets:
        if start < span.start < end:
            return f"starts inside the word {text[start:end]!r} (characters {start}..{end})"
        if start < span.end < end:
            return f"ends inside the word {text[start:end]!r} (characters {start}..{end})"
    if not any(span.start <= start and end <= span.end for start, end in offsets):
        return "covers no word (only spaces, or characters the tokenizer drops)"
    return None


def spans_to_tags(text: str, spans: Sequence[Span], offsets: Sequence[tuple[int, int]], scheme: str) -> tuple[list[str], list[tuple[Span, str]]]:
    """The tag of every word (offsets: word_offsets), and the spans that are not on word boundaries
    with the reason (those are left untagged here; the caller reports them)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    tags = ["O"] * len(offsets)
    misaligned = []
    for span in spans:
        reason = _misalignment(span, offsets, text)
        if reason:
            misaligned.append((span, reason))
            continue
        inside = [i for i, (start, end) in enumerate(offsets) if span.start <= start and end <= span.end]
        for i in inside:
            tags[i] = f"I-{span.label}"
        tags[inside[0]] = f"B-{span.label}"
        if scheme == "bioes":
            tags[inside[-1]] = f"E-{span.label}"
            if len(inside) == 1:
                tags[inside[0]] = f"S-{span.label}"
    return tags, misaligned


@dataclass
class TaggedText:
    """One span-annotated text made ready for a tagger: its words (as character offsets) and their tags."""

    text: str
    offsets: list[tuple[int, int]]  # (start, end) of each word in text
    tags: list[str] | None  # one per word; None for a text without annotations (to label)
    fmt: str  # one of FORMATS: the format its predictions are written in
    record: dict  # the JSON object as read, kept for writing the predictions back

    @property
    def words(self) -> list[str]:
        return [self.text[start:end] for start, end in self.offsets]


def tag_records(records: Sequence[tuple[str, dict]], tokenizer: Tokenizer, scheme: str, source: str) -> list[TaggedText]:
    """TaggedTexts of ("line N", JSON object) pairs read from `source` (a path, named in errors). All the
    spans that are not on word boundaries are counted, and the first is named, in one SpanError."""
    parsed = []
    for where, record in records:
        fmt = record_format(record)
        if fmt is None:
            raise SpanError(f"{source} {where}: expected a text with spans ({{\"text\": ..., \"spans\": [{{\"start\", "
                            f"\"end\", \"label\"}}]}}, doccano's or Label Studio's export), found the keys {sorted(record)}")
        parsed.append((where, fmt, record, *read_record(record, fmt, f"{source} {where}")))
    all_offsets = word_offsets(tokenizer, [text for _, _, _, text, _ in parsed])
    tagged, misaligned, total = [], [], 0
    for (where, fmt, record, text, spans), offsets in zip(parsed, all_offsets):
        tags = None
        if spans is not None:
            tags, bad = spans_to_tags(text, spans, offsets, scheme)
            misaligned += [(where, span, reason, text) for span, reason in bad]
            total += len(spans)
        tagged.append(TaggedText(text, offsets, tags, fmt, record))
    if misaligned:
        where, span, reason, text = misaligned[0]
        raise SpanError(
            f"{source} {where}: the span {span.start}..{span.end} {text[span.start:span.end]!r} ({span.label}) {reason}; "
            f"a span must begin and end where the tokenizer's words do, so correct its offsets "
            f"({len(misaligned)} of the {total} spans in the file are off word boundaries)"
        )
    return tagged


_BILOU = {"L": "E", "U": "S"}  # BILOU is BIOES with other letters: L(ast) = E(nd), U(nit) = S(ingle)


def entity_spans(tags: Sequence[str | None], offsets: Sequence[tuple[int, int]]) -> list[tuple[Span, int, int]]:
    """Entities in a word tag sequence, as (Span with character offsets, first word, last word).

    Reads BIO, BIOES, IOB1 and plain tags (PER, LOC) as seqeval does: an entity begins at B- or S-, or
    at an I-/E-/plain tag of another type than the word before; it ends before O, after E- or S-, or
    where the next one begins. BILOU's L- reads as E-, U- as S-. None (a word cut off by --max-length)
    counts as O.
    """
    entities = []
    current = None  # [type, first word, last word]
    for i, tag in enumerate(tags):
        if tag is None or tag == "O":
            if current:
                entities.append(current)
            current = None
            continue
        prefix, entity = split_tag(tag)
        if entity is None:  # a plain tag
            prefix, entity = "I", tag
        prefix = _BILOU.get(prefix, prefix)
        if current and (prefix in ("B", "S") or current[0] != entity):
            entities.append(current)
            current = None
        if current is None:
            current = [entity, i, i]
        current[2] = i
        if prefix in ("E", "S"):
            entities.append(current)
            current = None
    if current:
        entities.append(current)
    return [(Span(offsets[first][0], offsets[last][1], entity), first, last) for entity, first, last in entities]


def span_record(record: dict, fmt: str, text: str, spans: Iterable[tuple[Span, float]]) -> dict:
    """The input object with predicted (span, score) pairs written in its own format, for predictions.jsonl:
    minibert's "spans" (with each span's text and score) or doccano's triples or entities, under the key
    the input used, its own annotations moved to "gold"; or a Label Studio task with "predictions" (its
    annotations kept where they are)."""
    spans = list(spans)
    if fmt == "label-studio":
        result = [{"from_name": "label", "to_name": "text", "type": "labels", "score": round(score, 6),
                   "value": {"start": s.start, "end": s.end, "text": text[s.start : s.end], "labels": [s.label]}}
                  for s, score in spans]
        for annotation in record.get("annotations") or []:  # name the controls as the project does
            for r in annotation.get("result") or []:
                if r.get("type") == "labels":
                    for item in result:
                        item["from_name"], item["to_name"] = r.get("from_name", "label"), r.get("to_name", "text")
                    break
        return {**record, "predictions": [{"model_version": "minibert", "result": result}]}
    if fmt == "doccano":
        key = "entities" if "entities" in record else "labels" if "labels" in record and "label" not in record else "label"
        if key == "entities":
            predicted = [{"id": i, "start_offset": s.start, "end_offset": s.end, "label": s.label} for i, (s, _) in enumerate(spans)]
        else:
            predicted = [[s.start, s.end, s.label] for s, _ in spans]
    else:
        key = "spans"
        predicted = [{"start": s.start, "end": s.end, "label": s.label, "text": text[s.start : s.end], "score": round(score, 6)}
                     for s, score in spans]
    gold = {"gold": record[key]} if key in record else {}  # the annotations the predictions replace
    return {**record, key: predicted, **gold}
