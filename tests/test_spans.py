"""Span-annotated NER input: the three formats, word boundaries from the tokenizer's offsets, tags in BIO and
BIOES, the errors, and an exact round trip spans -> tags -> spans on Chinese, mixed and digit-heavy text."""

import pytest

from minibert.spans import (
    Span,
    SpanError,
    TaggedText,
    entity_spans,
    read_record,
    record_format,
    span_record,
    spans_to_tags,
    tag_records,
    word_offsets,
)


@pytest.fixture(scope="module")
def tokenizer():
    from minibert.assets import minilm_dir
    from minibert.tokenizer import load_tokenizer

    return load_tokenizer(minilm_dir())


def spans_of(text, *pieces):
    """Spans located by their text: ("北京天安门", "LOC") -> Span(2, 7, "LOC")."""
    result, at = [], 0
    for piece, label in pieces:
        start = text.index(piece, at)
        result.append(Span(start, start + len(piece), label))
        at = start + len(piece)
    return result


ROUND_TRIP = [
    ("我爱北京天安门。", [("北京天安门", "LOC")]),
    ("他在Apple公司工作，iPhone卖得好。", [("Apple公司", "ORG"), ("iPhone", "PRODUCT")]),
    ("1994年出生于上海，2008年5月12日搬到New York City。", [("1994年", "DATE"), ("上海", "LOC"), ("2008年5月12日", "DATE"),
                                                    ("New York City", "LOC")]),
    ("Barack Obama's visit to the U.S. (café)", [("Barack Obama", "PER"), ("U.S.", "LOC"), ("café", "LOC")]),
    ("😀 Obama Obama", [("Obama", "PER"), ("Obama", "PER")]),  # two adjacent entities of one type
]


@pytest.mark.parametrize("scheme", ["bio", "bioes"])
@pytest.mark.parametrize("text, pieces", ROUND_TRIP)
def test_spans_to_tags_to_spans_round_trip_exactly(tokenizer, text, pieces, scheme):
    spans = spans_of(text, *pieces)
    offsets = word_offsets(tokenizer, [text])[0]
    tags, misaligned = spans_to_tags(text, spans, offsets, scheme)
    assert misaligned == []
    back = [span for span, _, _ in entity_spans(tags, offsets)]
    assert back == spans
    assert [text[s.start : s.end] for s in back] == [piece for piece, _ in pieces]


def test_tags_by_hand(tokenizer):
    text = "我爱北京天安门。"
    offsets = word_offsets(tokenizer, [text])[0]
    assert offsets == [(i, i + 1) for i in range(8)]  # every CJK character is a word, with its own offsets
    spans = spans_of(text, ("我", "PER"), ("北京天安门", "LOC"))
    assert spans_to_tags(text, spans, offsets, "bio")[0] == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "I-LOC", "I-LOC", "O"]
    assert spans_to_tags(text, spans, offsets, "bioes")[0] == ["S-PER", "O", "B-LOC", "I-LOC", "I-LOC", "I-LOC", "E-LOC", "O"]
    text = "1994年"
    assert [text[s:e] for s, e in word_offsets(tokenizer, [text])[0]] == ["1994", "年"]


def test_entity_spans_reads_iob1_plain_and_broken_sequences_as_seqeval_does():
    from seqeval.metrics.sequence_labeling import get_entities

    offsets = [(i, i + 1) for i in range(7)]
    for tags in (["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "O"],  # IOB1
                 ["O", "I-PER", "I-LOC", "B-PER", "E-PER", "S-LOC", "E-LOC"],  # broken BIOES
                 ["B-PER", "E-PER", "I-PER", "O", "S-LOC", "B-LOC", "O"]):
        ours = [(s.label, first, last) for s, first, last in entity_spans(tags, offsets)]
        assert ours == get_entities(tags), tags
    plain = ["PER", "PER", "O", "LOC", "PER", None, "PER"]
    assert [(s.label, f, l) for s, f, l in entity_spans(plain, offsets)] == [("PER", 0, 1), ("LOC", 3, 3), ("PER", 4, 4),
                                                                             ("PER", 6, 6)]


def test_the_three_formats_read_the_same_spans():
    text = "Barack Obama visited Paris."
    expected = (text, [Span(0, 12, "PER"), Span(21, 26, "LOC")])
    minibert = {"text": text, "spans": [{"start": 21, "end": 26, "label": "LOC"}, {"start": 0, "end": 12, "label": "PER",
                                                                                     "text": "Barack Obama"}]}
    doccano = {"id": 7, "text": text, "label": [[0, 12, "PER"], [21, 26, "LOC"]], "meta": {}}
    doccano_old = {"doc_id": 33, "text": text, "labels": [[0, 12, "PER"], [21, 26, "LOC"]], "username": "admin"}
    doccano_entities = {"text": text, "entities": [{"id": 0, "start_offset": 0, "end_offset": 12, "label": "PER"},
                                                   {"id": 1, "start_offset": 21, "end_offset": 26, "label": "LOC"}],
                        "relations": []}
    label_studio = {  # Label Studio's JSON export of its NER template (Labels name="label", Text name="text")
        "id": 1, "data": {"text": text}, "project": 3,
        "annotations": [
            {"id": 9, "was_cancelled": True, "result": []},
            {"id": 10, "completed_by": 1, "was_cancelled": False, "result": [
                {"value": {"start": 0, "end": 12, "text": "Barack Obama", "labels": ["PER"]}, "id": "a1",
                 "from_name": "label", "to_name": "text", "type": "labels", "origin": "manual"},
                {"value": {"start": 21, "end": 26, "text": "Paris", "labels": ["LOC"]}, "id": "a2",
                 "from_name": "label", "to_name": "text", "type": "labels", "origin": "manual"},
                {"value": {"choices": ["news"]}, "from_name": "topic", "to_name": "text", "type": "choices"}]}],
        "predictions": []}
    for record, fmt in ((minibert, "minibert"), (doccano, "doccano"), (doccano_old, "doccano"),
                        (doccano_entities, "doccano"), (label_studio, "label-studio")):
        assert record_format(record) == fmt
        assert read_record(record, fmt, "x line 1") == expected, record
    assert read_record({"text": text}, "minibert", "x") == (text, None)  # unlabelled
    assert read_record({"data": {"text": text}, "annotations": []}, "label-studio", "x") == (text, None)
    assert record_format({"tokens": ["a"], "tags": ["O"]}) is None


def test_label_studio_browser_offsets_after_an_emoji_are_converted():
    text = "😀 Obama"  # the emoji is 2 UTF-16 units: a browser puts Obama at 3..8, Python at 2..7
    record = {"data": {"text": text}, "annotations": [{"result": [
        {"type": "labels", "value": {"start": 3, "end": 8, "text": "Obama", "labels": ["PER"]}}]}]}
    assert read_record(record, "label-studio", "x") == (text, [Span(2, 7, "PER")])
    record["annotations"][0]["result"][0]["value"]["text"] = "Osama"
    with pytest.raises(SpanError, match="says its text is 'Osama'"):
        read_record(record, "label-studio", "x")


@pytest.mark.parametrize("record, message", [
    ({"text": "Barack Obama", "spans": [{"start": 0, "end": 12, "label": "PER"}, {"start": 7, "end": 12, "label": "LOC"}]},
     r"x line 3: the spans 0..12 'Barack Obama' \(PER\) and 7..12 'Obama' \(LOC\) overlap"),
    ({"text": "Obama", "spans": [{"start": 0, "end": 9, "label": "PER"}]}, r"lies outside the text, which has 5 characters"),
    ({"text": "Obama", "spans": [{"start": 3, "end": 2, "label": "PER"}]}, r"lies outside the text"),
    ({"text": "Obama", "spans": [{"start": "0", "end": 5, "label": "PER"}]}, r"offsets must be integers"),
    ({"text": "Obama", "spans": [{"start": 0, "end": 5}]}, r"has label None"),
    ({"text": "Obama", "spans": [{"start": 0, "end": 5, "label": "O"}]}, r"label 'O'"),
    ({"text": "Obama", "spans": [{"start": 0, "end": 4, "label": "PER", "text": "Obama"}]}, r"says its text is 'Obama'"),
    ({"text": "Obama", "label": [[0, 5]]}, r"\[start, end, label\] triples"),
    ({"text": "Obama", "spans": {"start": 0}}, r"must be a list"),
])
def test_bad_spans_are_one_line_errors(record, message):
    with pytest.raises(SpanError, match=message) as e:
        read_record(record, record_format(record), "x line 3")
    assert "\n" not in str(e.value)


def test_spans_off_word_boundaries_are_named_with_line_and_text(tokenizer):
    records = [("line 1", {"text": "Barack Obama", "spans": [{"start": 0, "end": 12, "label": "PER"}]}),
               ("line 2", {"text": "Obamas visit", "spans": [{"start": 0, "end": 5, "label": "PER"}]}),
               ("line 3", {"text": "the visit", "spans": [{"start": 5, "end": 9, "label": "X"}]})]
    with pytest.raises(SpanError, match=r"data.jsonl line 2: the span 0..5 'Obama' \(PER\) ends inside the word 'Obamas' "
                                        r"\(characters 0..6\).*\(2 of the 3 spans in the file are off word boundaries\)"):
        tag_records(records, tokenizer, "bio", "data.jsonl")
    with pytest.raises(SpanError, match=r"starts inside the word 'visit'"):
        tag_records(records[2:], tokenizer, "bio", "data.jsonl")
    with pytest.raises(SpanError, match=r"covers no word"):
        tag_records([("line 1", {"text": "a   b", "spans": [{"start": 2, "end": 3, "label": "X"}]})], tokenizer, "bio", "d")
    with pytest.raises(SpanError, match=r"d line 1: expected a text with spans .*found the keys \['words'\]"):
        tag_records([("line 1", {"words": []})], tokenizer, "bio", "d")
    (tagged,) = tag_records(records[:1], tokenizer, "bioes", "d")
    assert tagged.words == ["Barack", "Obama"] and tagged.tags == ["B-PER", "E-PER"]


def test_predictions_are_written_in_the_format_they_came_in():
    text = "Barack Obama visited Paris."
    predicted = [(Span(0, 12, "PER"), 0.91), (Span(21, 26, "LOC"), 0.5)]
    out = span_record({"text": text, "spans": [], "id": 4}, "minibert", text, predicted)
    assert out == {"text": text, "id": 4, "gold": [], "spans": [
        {"start": 0, "end": 12, "label": "PER", "text": "Barack Obama", "score": 0.91},
        {"start": 21, "end": 26, "label": "LOC", "text": "Paris", "score": 0.5}]}
    assert read_record(out, "minibert", "x")[1] == [s for s, _ in predicted]  # readable back in
    out = span_record({"text": text, "label": [[0, 6, "PER"]]}, "doccano", text, predicted)
    assert out["label"] == [[0, 12, "PER"], [21, 26, "LOC"]] and out["gold"] == [[0, 6, "PER"]]
    assert "gold" not in span_record({"text": text}, "minibert", text, predicted)
    out = span_record({"text": text, "entities": []}, "doccano", text, predicted)
    assert read_record(out, "doccano", "x")[1] == [s for s, _ in predicted]
    task = {"id": 1, "data": {"text": text}, "annotations": [{"result": [
        {"type": "labels", "from_name": "ner", "to_name": "doc", "value": {"start": 0, "end": 6, "labels": ["PER"]}}]}]}
    out = span_record(task, "label-studio", text, predicted)
    assert out["annotations"] == task["annotations"]
    (prediction,) = out["predictions"]
    assert prediction["result"][1] == {"from_name": "ner", "to_name": "doc", "type": "labels", "score": 0.5,
                                       "value": {"start": 21, "end": 26, "text": "Paris", "labels": ["LOC"]}}
    as_annotation = {"data": {"text": text}, "annotations": [{"result": prediction["result"]}]}
    assert read_record(as_annotation, "label-studio", "x")[1] == [s for s, _ in predicted]


def test_tagged_text_keeps_what_predictions_need(tokenizer):
    (tagged,) = tag_records([("line 1", {"text": "我爱北京", "spans": [{"start": 2, "end": 4, "label": "LOC"}]})],
                            tokenizer, "bio", "d")
    assert isinstance(tagged, TaggedText) and tagged.words == ["我", "爱", "北", "京"]
    assert tagged.tags == ["O", "O", "B-LOC", "I-LOC"] and tagged.fmt == "minibert"
