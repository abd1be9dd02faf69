"""minibert.pipeline: results against transformers' pipelines, entity spans against hand-written ones, bad input.

Models are tiny random BERTs (conftest), or a stand-in whose tag for each word piece is fixed by a table,
so that the entity spans a text must give can be written down by hand.
"""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import minibert
import minibert.precision
from minibert.config import IGNORE_INDEX
from minibert.data.encoding import encode_examples
from minibert.data.examples import Example
from minibert.data.labels import LabelVocab
from minibert.data.tasks import movie_reviews
from minibert import inference as I
from minibert.model import ClassifierOutput
from minibert.spans import entity_spans, word_offsets

# ----------------------------------------------------------------------------- entity grouping, by hand


@pytest.mark.parametrize("tags, expected", [
    # IOB2 (BIO): every entity starts with B-; the last word of the text ends one.
    (["B-PER", "I-PER", "O", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 4, 5)]),
    (["B-PER", "B-PER", "I-PER", "O", "B-ORG", "I-ORG"], [("PER", 0, 1), ("PER", 1, 3), ("ORG", 4, 6)]),
    # IOB1: I- starts an entity after O or another type; B- only between two entities of one type.
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)]),
    (["I-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),
    # BIOES: S- is a one-word entity, E- ends one.
    (["B-PER", "E-PER", "O", "S-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["S-PER", "S-PER", "B-ORG", "I-ORG", "E-ORG"], [("PER", 0, 1), ("PER", 1, 2), ("ORG", 2, 5)]),
    # BILOU: the same with U- (unit) and L- (last).
    (["B-PER", "L-PER", "O", "U-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["U-PER", "B-ORG", "I-ORG", "L-ORG", "U-ORG"], [("PER", 0, 1), ("ORG", 1, 4), ("ORG", 4, 5)]),
    # Plain tags: a run of one tag is one entity.
    (["PER", "PER", "O", "LOC", "LOC"], [("PER", 0, 2), ("LOC", 3, 5)]),
    (["PER", "LOC", "O", "O", "MISC"], [("PER", 0, 1), ("LOC", 1, 2), ("MISC", 4, 5)]),
    # A word without a tag (cut off by max_length) ends the entity before it.
    (["B-PER", "I-PER", None, None], [("PER", 0, 2)]),
    (["O", "O", "O"], []),
])
def test_entities_from_word_tags_in_every_scheme(tags, expected):
    found = entity_spans(tags, [(i, i + 1) for i in range(len(tags))])
    assert [(span.label, first, last + 1) for span, first, last in found] == expected


def test_character_offsets_of_a_text_cover_each_entity_exactly(tiny_init_dir):
    text = "Jim Henson was in Paris."
    tokenizer = minibert.load_tokenizer(tiny_init_dir)
    [offsets] = word_offsets(tokenizer, [text])
    assert offsets == [(0, 3), (4, 10), (11, 14), (15, 17), (18, 23), (23, 24)]
    words = [text[a:b] for a, b in offsets]
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    logits = np.log(np.full((6, 4), 0.1, dtype=np.float32))
    for word, tag, p in [(0, 1, 0.9), (1, 2, 0.7), (2, 0, 0.8), (3, 0, 0.6), (4, 3, 0.5), (5, 3, 0.4)]:
        logits[word] = np.log(np.full(4, (1 - p) / 3))
        logits[word, tag] = np.log(p)
    task = I.ModelTask("token-classification", tuple(labels))
    result = I.token_result(task, logits, words, offsets, text)
    assert result["tags"] == ["B-PER", "I-PER", "O", "O", "B-LOC", "B-LOC"]
    assert result["entities"] == [
        {"entity": "PER", "text": "Jim Henson", "start": 0, "end": 10, "score": pytest.approx(0.8, abs=1e-6)},
        {"entity": "LOC", "text": "Paris", "start": 18, "end": 23, "score": pytest.approx(0.5, abs=1e-6)},
        {"entity": "LOC", "text": ".", "start": 23, "end": 24, "score": pytest.approx(0.4, abs=1e-6)},
    ]
    by_word = I.token_result(task, logits, words)["entities"]
    assert [(e["text"], e["start"], e["end"]) for e in by_word] == [("Jim Henson", 0, 2), ("Paris", 4, 5), (".", 5, 6)]


# ----------------------------------------------------------------------------- against transformers' pipelines

TEXTS = ["A gripping, beautifully acted film.", "dull", "The plot drags; the actors look bored, and so was I by the end.",
         "Jim Henson was in Paris with Xavierovich.", "ok"]


def tiny_classifier_dir(tmp_path, tiny_init_dir, **config):
    """A classifier as transformers writes one, with the real uncased tokenizer: a user's own directory."""
    import shutil

    from conftest import tiny_hf_config

    torch.manual_seed(1)
    kind = config.pop("kind", "sequence")
    hf_config = tiny_hf_config(vocab_size=30522, **config)
    cls = transformers.BertForTokenClassification if kind == "token" else transformers.BertForSequenceClassification
    model = cls(hf_config)
    with torch.no_grad():  # a head with some reach, so that the probabilities are far from uniform
        model.classifier.weight.normal_(0, 0.5)
    directory = tmp_path / f"hf-{kind}-{hf_config.num_labels}"
    model.save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_init_dir / name, directory / name)
    return directory


def hf_pipeline(task, directory, **kwargs):
    return transformers.pipeline(task, model=str(directory), device="cpu", **kwargs)


def hf_scores(classify, text) -> dict[str, float]:
    [results] = classify([text])  # one input in a list: a list of {label, score} per input
    return {r["label"]: r["score"] for r in results}


def test_classification_equals_transformers_pipeline_on_a_transformers_directory(tmp_path, tiny_init_dir):
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3,
                                    id2label={0: "negative", 1: "neutral", 2: "positive"})
    ours = minibert.pipeline(directory, precision="fp32")
    theirs = hf_pipeline("text-classification", directory, top_k=None)
    results = ours(TEXTS, batch_size=2)
    assert len(results) == len(TEXTS)
    for text, result in zip(TEXTS, results):
        expected = hf_scores(theirs, text)
        assert result["probabilities"] == pytest.approx(expected, abs=1e-5)
        assert result["label"] == max(expected, key=expected.get)
        assert result["score"] == pytest.approx(max(expected.values()), abs=1e-5)
    assert ours(TEXTS[0]) == results[0]  # one text gives one result, the same as in a list
    pair = ours(("A gripping film.", "It is good."))
    expected = hf_scores(theirs, {"text": "A gripping film.", "text_pair": "It is good."})
    assert pair["probabilities"] == pytest.approx(expected, abs=1e-5)
    assert ours([("A gripping film.", "It is good.")]) == [pair]


def test_multilabel_and_regression_equal_transformers(tmp_path, tiny_init_dir):
    multilabel = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3, problem_type="multi_label_classification",
                                     id2label={0: "action", 1: "comedy", 2: "drama"})
    theirs = hf_pipeline("text-classification", multilabel, top_k=None)
    for threshold in (0.5, 0.3):
        ours = minibert.pipeline(multilabel, precision="fp32", threshold=threshold)
        for text, result in zip(TEXTS, ours(TEXTS)):
            expected = hf_scores(theirs, text)
            assert result["probabilities"] == pytest.approx(expected, abs=1e-5)
            assert result["labels"] == [label for label in ("action", "comedy", "drama") if expected[label] >= threshold]
    regression = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=1, problem_type="regression")
    theirs = hf_pipeline("text-classification", regression, function_to_apply="none", top_k=None)
    for text, result in zip(TEXTS, minibert.pipeline(regression, precision="fp32")(TEXTS)):
        assert result == {"value": pytest.approx(hf_scores(theirs, text)["LABEL_0"], abs=1e-5)}


def test_token_classification_equals_transformers_first_word_piece_aggregation(tmp_path, tiny_init_dir):
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, kind="token", num_labels=5,
                                    id2label={0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"})
    ours = minibert.pipeline(directory, precision="fp32")
    theirs = hf_pipeline("token-classification", directory, aggregation_strategy="first")
    found = 0
    for text in TEXTS:
        expected = [(e["entity_group"], e["start"], e["end"], pytest.approx(float(e["score"]), abs=1e-5)) for e in theirs(text)]
        entities = ours(text)
        assert [(e["entity"], e["start"], e["end"], e["score"]) for e in entities] == expected
        assert all(e["text"] == text[e["start"]:e["end"]] for e in entities)
        found += len(entities)
    assert found > 3  # the random model does tag entities, so spans were compared


# ----------------------------------------------------------------------------- hand-written spans


class TagsByToken(nn.Module):
    """A stand-in token classifier: the tag of each word piece is looked up by its token id. A blind one
    needs context: on the first and last piece of its input it sees nothing and says O."""

    def __init__(self, tags_of: dict[int, int], num_tokens: int, num_labels: int, blind_at_edges: bool = False):
        super().__init__()
        self.blind_at_edges = blind_at_edges
        table = torch.zeros(num_tokens, num_labels)
        table[:, 0] = 5.0  # everything "O" ...
        for token, tag in tags_of.items():  # ... except these pieces
            table[token] = 0.0
            table[token, tag] = 5.0
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        logits = self.table[input_ids].clone()  # (B, T, L)
        if self.blind_at_edges:
            lengths = attention_mask.sum(1) if attention_mask is not None else torch.full((len(input_ids),), input_ids.shape[1])
            for row, n in enumerate(lengths.tolist()):
                logits[row, [1, n - 2]] = self.table[0]  # the pieces after [CLS] and before [SEP]: O
        return ClassifierOutput(None, logits)


def fixed_tagger(tmp_path, tiny_init_dir, blind_at_edges=False, **settings):
    """A token classifier whose tags are fixed: jim B-PER, henson I-PER, xavier B-PER, new B-LOC, york I-LOC."""
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, kind="token", num_labels=5, id2label=dict(enumerate(labels)))
    pipe = minibert.pipeline(directory, precision="fp32", **settings)
    vocab = pipe.tokenizer.get_vocab()
    tags = {"jim": 1, "henson": 2, "xavier": 1, "new": 3, "york": 4}
    pipe.model = TagsByToken({vocab[w]: t for w, t in tags.items()}, len(vocab), len(labels), blind_at_edges)
    return pipe


@pytest.fixture
def ner(tmp_path, tiny_init_dir):
    return fixed_tagger(tmp_path, tiny_init_dir)


SURE = math.exp(5) / (math.exp(5) + 4)  # the probability TagsByToken gives each piece's tag


def test_entity_spans_by_hand(ner):
    text = "Jim Henson met Xavierovich in New York"  # the last entity ends the text
    assert ner(text) == [
        {"entity": "PER", "text": "Jim Henson", "start": 0, "end": 10, "score": pytest.approx(SURE, abs=1e-6)},
        # the word's first piece (xavier) tags it; its other piece (##ovich) is still part of its span
        {"entity": "PER", "text": "Xavierovich", "start": 15, "end": 26, "score": pytest.approx(SURE, abs=1e-6)},
        {"entity": "LOC", "text": "New York", "start": 30, "end": 38, "score": pytest.approx(SURE, abs=1e-6)},
    ]
    words = text.split()
    result = ner(words, is_split_into_words=True)
    assert result["tags"] == ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"]
    assert [(e["entity"], e["start"], e["end"], e["text"]) for e in result["entities"]] == [
        ("PER", 0, 2, "Jim Henson"), ("PER", 3, 4, "Xavierovich"), ("LOC", 5, 7, "New York")]
    assert ner([words, words[:2]], is_split_into_words=True)[1]["entities"][0]["text"] == "Jim Henson"


def test_an_entity_cut_across_windows_takes_each_word_from_the_window_where_it_has_context(tmp_path, tiny_init_dir):
    text = "He met Jim Henson today"  # he met jim henson today: 5 pieces
    # Windows of 6 tokens (4 pieces of text) sharing 2: [he met jim henson] [jim henson today]. A blind tagger
    # gets "jim" right only in the first window (in the second it is the first piece) and "henson" only in
    # the second (in the first it is the last piece): the entity is right only if each word is read where
    # it sits farthest from a cut edge.
    windows = fixed_tagger(tmp_path, tiny_init_dir, blind_at_edges=True, max_length=6, sliding_window=True, stride=2)
    assert windows(text) == [{"entity": "PER", "text": "Jim Henson", "start": 7, "end": 17, "score": pytest.approx(SURE, abs=1e-6)}]
    # Without windows, the text is cut after "henson", which the blind tagger then cannot see.
    cut = fixed_tagger(tmp_path, tiny_init_dir, blind_at_edges=True, max_length=6)
    assert [(e["text"], e["start"], e["end"]) for e in cut(text)] == [("Jim", 7, 10)]
    assert cut([text.split()], is_split_into_words=True)[0]["tags"] == ["O", "O", "B-PER", "O", None]


def test_windows_give_every_word_the_tags_one_long_window_gives(tmp_path, tiny_init_dir):
    text = "Jim Henson met Xavierovich in New York and Jim Henson met Xavierovich in New York"  # ends in an entity
    whole = fixed_tagger(tmp_path, tiny_init_dir, max_length=64)(text)
    for max_length, stride in ((8, 2), (7, 0), (9, 4)):  # windows that start inside "xavier ##ovich", or not
        assert fixed_tagger(tmp_path, tiny_init_dir, max_length=max_length, sliding_window=True, stride=stride)(text) == whole
    assert [e["text"] for e in whole] == ["Jim Henson", "Xavierovich", "New York"] * 2


def test_windows_label_each_word_once_on_its_first_piece(tiny_init_dir):
    """A window that starts inside a word (after "xavier", on "##ovich") holds none of its first piece."""
    tokenizer = minibert.load_tokenizer(tiny_init_dir)
    vocab = LabelVocab(["B-PER", "O"])
    examples = [Example(["Jim", "Xavierovich", "met", "Henson"], label=["B-PER", "B-PER", "O", "B-PER"]),
                Example(["Paris"], label=["O"])]
    features = encode_examples(tokenizer, examples, max_length=4, task_type="token-classification", label_vocab=vocab,
                                 stride=0)  # two pieces a window: [jim xavier] [##ovich met] [henson]
    assert [f.document for f in features] == [0, 0, 0, 1]
    assert [f.word_ids.tolist() for f in features] == [[-1, 0, 1, -1], [-1, -1, 2, -1], [-1, 3, -1], [-1, 0, -1]]
    ignore = IGNORE_INDEX
    assert [f.label.tolist() for f in features] == [[ignore, 0, 0, ignore], [ignore, ignore, 1, ignore],
                                                    [ignore, 0, ignore], [ignore, 1, ignore]]
    windows = encode_examples(tokenizer, [Example(" ".join(TEXTS), label="b"), Example("ok", label="a")],
                                max_length=8, task_type="classification", label_vocab=LabelVocab(["a", "b"]), stride=2)
    assert [(f.document, f.label) for f in windows] == [(0, 1)] * (len(windows) - 1) + [(1, 0)] and len(windows) > 4


def test_a_long_text_is_the_average_of_its_windows_logits(tmp_path, tiny_init_dir):
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3)
    text = " ".join(TEXTS * 3)
    pipe = minibert.pipeline(directory, precision="fp32", max_length=16, sliding_window=True, stride=4)
    model = minibert.BertForSequenceClassification.from_pretrained(str(directory), verbose=False).eval()
    tokenizer = minibert.load_tokenizer(directory)
    pieces = tokenizer.encode(text, add_special_tokens=False).ids  # by hand: 14 pieces a window, starting every 10
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    starts = range(0, len(pieces) - 4, 10)
    with torch.no_grad():
        logits = [model(torch.tensor([[cls, *pieces[s : s + 14], sep]])).logits[0] for s in starts]
    expected = torch.stack(logits).mean(0).softmax(-1)
    assert list(pipe(text)["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
    assert pipe([text, "short"])[0] == pipe(text)  # a short text beside it changes nothing
    assert len(starts) > 3


# ----------------------------------------------------------------------------- precision and bad input


@pytest.mark.parametrize("amx, avx512_bf16, chosen, reason", [
    (True, False, "bf16", "AMX"), (False, True, "fp32", "AVX512-BF16 but no AMX"),
    (False, False, "fp32", "neither AMX nor AVX512-BF16")])
def test_auto_precision_is_bf16_where_the_cpu_multiplies_it_faster_and_says_why(
        tmp_path, tiny_init_dir, monkeypatch, caplog, amx, avx512_bf16, chosen, reason):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    # AVX512-BF16 is native (no emulation warning) but no faster than fp32, so auto leaves it for fp32
    assert minibert.precision.cpu_has_native_bf16() == (amx or avx512_bf16)
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2)
    with caplog.at_level(logging.INFO, logger="minibert"):
        pipe = minibert.pipeline(directory, device="cpu")
    assert pipe.precision.name == chosen
    [line] = [r.getMessage() for r in caplog.records if "predicts in" in r.getMessage()]
    assert f"predicts in {chosen}" in line and reason in line
    # training keeps fp32 on the CPU under auto whatever the CPU has (until bf16 training is shown to keep accuracy)
    assert minibert.precision.resolve_precision("auto", torch.device("cpu"), cpu_auto_bf16=False).name == "fp32"


def test_bf16_predictions_are_those_of_bf16_autocast(tmp_path, tiny_init_dir):
    """Keeping the Linear weights in bf16 saves autocast's cast on every call; it must not change a number."""
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3)
    pipe = minibert.pipeline(directory, precision="bf16")
    reference = minibert.BertForSequenceClassification.from_pretrained(str(directory), verbose=False).eval()
    encoding = pipe.encoder.encode_batch(TEXTS[:1])[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(torch.tensor([encoding.ids])).logits.float().softmax(-1)[0]
    assert list(pipe(TEXTS[0])["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize("inputs, message", [
    ("", "input 1 is an empty string"),
    (["fine", "   "], "input 2 is an empty string"),
    (["fine", 3], "input 2 is a int, not a string"),
    ([("a", "b", "c")], "a text pair is a (text, text_pair) tuple of two strings"),
])
def test_bad_texts_are_one_line_errors(tmp_path, tiny_init_dir, inputs, message):
    pipe = minibert.pipeline(tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2), precision="fp32")
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        pipe(inputs)
    assert "\n" not in str(error.value)


def test_models_that_cannot_answer_are_refused_with_the_fix(tmp_path, tiny_init_dir):
    with pytest.raises(ValueError, match="has no classifier head .* fine-tune it first"):
        minibert.pipeline(tiny_init_dir)
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        minibert.precision.resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="precision 'fp8' is unknown"):
        minibert.pipeline(tiny_init_dir, precision="fp8")
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2)
    (directory / "finetune_config.json").write_text(json.dumps({"resolved": {"text_pairs": False}}))
    with pytest.raises(ValueError, match="fine-tuned on single texts: pass one string"):
        minibert.pipeline(directory)([("premise", "hypothesis")])
    (directory / "finetune_config.json").write_text(json.dumps({"resolved": {"text_pairs": True}}))
    with pytest.raises(ValueError, match="fine-tuned on text pairs: pass"):
        minibert.pipeline(directory)("premise")
    (directory / "finetune_config.json").unlink()
    with pytest.raises(ValueError, match="stride 14 must be at least 0 and less than 14"):
        minibert.pipeline(directory, max_length=16, sliding_window=True, stride=14)
    with pytest.raises(ValueError, match="pass sliding_window=True with it"):
        minibert.pipeline(directory, stride=4)
    ner = minibert.pipeline(tiny_classifier_dir(tmp_path, tiny_init_dir, kind="token", num_labels=3))
    with pytest.raises(ValueError, match="a token classifier tags single texts"):
        ner(("premise", "hypothesis"))
    with pytest.raises(ValueError, match="word 2 is an empty string"):
        ner(["Paris", ""], is_split_into_words=True)


# ----------------------------------------------------------------------------- a model train_finetune.py fine-tuned


@pytest.fixture(scope="module")
def movie_review_model(tmp_path_factory, tiny_init_dir):
    """The tiny BERT fine-tuned for 150 steps on the built-in movie-review task (about 70% test accuracy):
    a real test set, and a model whose decisions mean something."""
    import train_finetune

    out = tmp_path_factory.mktemp("movie-reviews")
    train_finetune.main(["--init", str(tiny_init_dir), "--output-dir", str(out), "--max-steps", "150", "--eval-steps", "150",
                         "--lr", "2e-3", "--max-length", "64", "--no-progress", "--seed", "0"])
    test = movie_reviews("classification")[2]
    return out, [ex.text for ex in test], [ex.label for ex in test]


@pytest.mark.slow
def test_pipeline_gives_predictions_jsonl_and_transformers_pipeline_numbers(movie_review_model):
    out, texts, _ = movie_review_model
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    ours = minibert.pipeline(out, precision="fp32")(texts)
    assert [r["text"] for r in written] == texts
    assert [r["label"] for r in ours] == [r["label"] for r in written]
    for result, record in zip(ours, written):
        assert result["probabilities"] == pytest.approx(record["probabilities"], abs=1e-5)
    # transformers keeps calibration_temperature in the config and ignores it: softmax(its logits / T) by hand
    temperature = json.loads((out / "config.json").read_text()).get("calibration_temperature", 1.0)
    theirs = hf_pipeline("text-classification", out, function_to_apply="none", top_k=None)
    for text, result in zip(texts[:50], ours):
        logits = np.array([hf_scores(theirs, text)[label] for label in result["probabilities"]]) / temperature
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert list(result["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.slow
def test_bf16_and_int8_agree_with_fp32_on_the_movie_review_test_set(movie_review_model, tmp_path, monkeypatch):
    out, texts, gold = movie_review_model
    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path))  # the int8 export goes here
    labels = {p: [r["label"] for r in minibert.pipeline(out, precision=p)(texts)] for p in ("fp32", "bf16", "int8")}
    accuracy = np.mean([p == g for p, g in zip(labels["fp32"], gold)])
    assert accuracy > 0.62 and 0.25 < np.mean([p == "positive" for p in labels["fp32"]]) < 0.75  # a model that decides
    for precision in ("bf16", "int8"):
        assert np.mean([a == b for a, b in zip(labels[precision], labels["fp32"])]) >= 0.98, precision
    assert list((tmp_path / "int8").glob("*/model.int8.onnx"))  # quantized once, kept for the next pipeline


# ----------------------------------------------------------------------------- long documents


FILLER = ("the train left the station at noon and the town was quiet while people walked along the river "
          "past old houses with red roofs and a market where someone sold bread").split()
VERDICTS = {"positive": ["excellent", "wonderful", "superb", "great"], "negative": ["terrible", "awful", "dreadful", "boring"]}


def long_documents(n: int, seed: int) -> list[tuple[str, str]]:
    """Documents of 60-80 filler words whose label only their last sentence tells: 'the verdict : excellent .'"""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        filler = " ".join(rng.choice(FILLER, int(rng.integers(60, 80))))
        rows.append((f"{filler} . the verdict : {rng.choice(VERDICTS[label])} .", label))
    return rows


@pytest.mark.slow
def test_sliding_window_reads_the_last_sentence_that_truncation_cuts_off(tiny_init_dir, tmp_path):
    import csv

    import train_finetune

    for name, rows in (("train", long_documents(240, 0)), ("test", long_documents(100, 1))):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    accuracy = {}
    for mode, flags in (("cut", []), ("windows", ["--sliding-window", "--stride", "8"])):
        results = train_finetune.main([
            "--init", str(tiny_init_dir), "--output-dir", str(tmp_path / mode), "--train-file", str(tmp_path / "train.csv"),
            "--validation-file", str(tmp_path / "test.csv"), "--test-file", str(tmp_path / "test.csv"),
            "--max-length", "32", "--epochs", "6", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--seed", "0",
            *flags])
        accuracy[mode] = results["test"]["accuracy"]
        predictions = (tmp_path / mode / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 100  # one prediction a document, however many windows it has
    assert accuracy["cut"] <= 0.62  # the first 30 pieces are filler: chance
    assert accuracy["windows"] >= 0.9
    pipe = minibert.pipeline(tmp_path / "windows", max_length=32, sliding_window=True, stride=8, precision="fp32")
    written = [json.loads(line) for line in (tmp_path / "windows" / "predictions.jsonl").read_text().splitlines()]
    rows = long_documents(100, 1)
    for result, record in zip(pipe([text for text, _ in rows]), written):  # the pipeline reads windows as training did
        assert result["probabilities"] == pytest.approx(record["probabilities"], abs=1e-5)


def test_token_classification_in_windows_tags_every_word_of_a_long_sentence(tiny_init_dir, tmp_path):
    import train_finetune

    words = "John Smithson met Mary Jones of Acme Corporation in Pittsburgh and Boston last year".split()
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC", "O", "B-LOC", "O", "O"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"tokens": words, "tags": tags}) + "\n")
    common = ["--init", str(tiny_init_dir), "--train-file", str(tmp_path / "train.jsonl"), "--validation-file",
              str(tmp_path / "train.jsonl"), "--test-file", str(tmp_path / "train.jsonl"), "--task-type",
              "token-classification", "--max-length", "10", "--max-steps", "2", "--no-progress"]
    for mode, flags in (("cut", []), ("windows", ["--sliding-window", "--stride", "3"])):
        train_finetune.main([*common, "--output-dir", str(tmp_path / mode), *flags])
    [cut] = [json.loads(line) for line in (tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()]
    [windows] = [json.loads(line) for line in (tmp_path / "windows" / "predictions.jsonl").read_text().splitlines()]
    assert cut["tags"][7:] == [None] * 7 and None not in cut["tags"][:7]  # the 8 pieces that fit hold 7 words
    assert len(windows["tags"]) == len(words) and None not in windows["tags"]
    assert windows["gold"] == tags and "entities" in windows


# ----------------------------------------------------------------------------- what config.json adds: T, thresholds, CRF


def with_config(directory, **keys):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **keys}))
    return directory


def hf_logits(directory, text) -> dict[str, float]:
    return hf_scores(hf_pipeline("text-classification", directory, function_to_apply="none", top_k=None), text)


def test_the_temperature_divides_the_logits_before_softmax(tmp_path, tiny_init_dir):
    labels = ["negative", "neutral", "positive"]
    directory = with_config(tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3, id2label=dict(enumerate(labels))),
                            calibration_temperature=2.5)
    for text, result in zip(TEXTS, minibert.pipeline(directory, precision="fp32")(TEXTS)):
        logits = np.array([hf_logits(directory, text)[label] for label in labels])
        expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum()
        assert list(result["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
        assert result["label"] == labels[int(logits.argmax())]  # the temperature never changes the label


def test_multilabel_thresholds_apply_to_the_calibrated_probabilities(tmp_path, tiny_init_dir):
    labels = ["action", "comedy", "drama"]
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=3, problem_type="multi_label_classification",
                                    id2label=dict(enumerate(labels)))
    logits = np.array([[hf_logits(directory, text)[label] for label in labels] for text in TEXTS])
    temperature = np.array([3.0, 0.5, 1.5])
    calibrated = 1 / (1 + np.exp(-logits / temperature))
    ordered = np.sort(calibrated, axis=0)
    thresholds = (ordered[2] + ordered[3]) / 2  # each label given to two of the five texts, far from a tie
    with_config(directory, calibration_temperature=dict(zip(labels, temperature.tolist())),
                label_thresholds=dict(zip(labels, thresholds.tolist())))
    results = minibert.pipeline(directory, precision="fp32")(TEXTS)
    expected = [[label for label, p, t in zip(labels, row, thresholds) if p >= t] for row in calibrated]
    assert [r["labels"] for r in results] == expected
    assert np.array([list(r["probabilities"].values()) for r in results]) == pytest.approx(calibrated, abs=1e-5)
    uncalibrated = [[label for label, p, t in zip(labels, row, thresholds) if p >= t] for row in 1 / (1 + np.exp(-logits))]
    assert uncalibrated != expected  # the order matters on these texts: thresholds on sigmoid(z) would differ
    override = minibert.pipeline(directory, precision="fp32", threshold=0.5)(TEXTS)
    assert [r["labels"] for r in override] == [[label for label, p in zip(labels, row) if p >= 0.5] for row in calibrated]


def test_a_crf_model_tags_the_best_valid_sequence_found_by_brute_force(tmp_path, tiny_init_dir):
    """Tags of a CRF model: the valid BIO sequence with the highest CRF score (emissions: transformers'
    logits at each word's first piece), checked against every possible sequence."""
    import itertools

    from safetensors.torch import save_file

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    directory = with_config(tiny_classifier_dir(tmp_path, tiny_init_dir, kind="token", num_labels=5,
                                                id2label=dict(enumerate(labels))), tag_scheme="bio")
    g = torch.Generator().manual_seed(0)
    crf = {"transitions": 2 * torch.randn(5, 5, generator=g), "start_transitions": torch.randn(5, generator=g),
           "end_transitions": torch.randn(5, generator=g)}
    save_file(crf, str(directory / "crf.safetensors"))
    ours = minibert.pipeline(directory, precision="fp32")
    hf = transformers.BertForTokenClassification.from_pretrained(directory).eval()
    differs = 0
    for words in (["Jim", "Henson", "was", "in", "Paris"], ["Xavierovich", "met", "New", "York"], ["ok", "dull", "film"]):
        encoding = ours.encoder.encode(words, is_pretokenized=True)
        with torch.no_grad():
            logits = hf(torch.tensor([encoding.ids])).logits[0].numpy()
        first = [encoding.word_ids.index(w) for w in range(len(words))]
        emissions = logits[first]

        def crf_score(ids):
            valid = labels[ids[0]][0] != "I" and all(
                labels[b][0] != "I" or labels[a][2:] == labels[b][2:] for a, b in zip(ids, ids[1:]))
            if not valid:
                return -np.inf
            score = crf["start_transitions"][ids[0]] + crf["end_transitions"][ids[-1]] + emissions[np.arange(len(ids)), ids].sum()
            return float(score + sum(crf["transitions"][a, b] for a, b in zip(ids, ids[1:])))

        best = max(itertools.product(range(5), repeat=len(words)), key=crf_score)
        assert ours(words, is_split_into_words=True)["tags"] == [labels[i] for i in best]
        differs += list(best) != emissions.argmax(-1).tolist()
    assert differs  # the CRF's transitions changed some sentence's tags: they were applied


@pytest.mark.parametrize("flags, message", [
    (["--stride", "8"], "--stride 8 is the overlap of sliding windows: add --sliding-window"),
    (["--precision", "int8"], "--precision int8 is for prediction (--predict-only); train in fp32 or bf16"),
    (["--sliding-window", "--stride", "30", "--max-length", "32"], "stride 30 must be at least 0 and less than 30"),
])
def test_window_and_precision_flags_are_checked_before_training(tiny_init_dir, tmp_path, flags, message):
    import train_finetune

    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(8)))
    with pytest.raises(ValueError, match=re.escape(message)):
        train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(data), "--output-dir", str(tmp_path / "out"),
                             "--no-progress", *flags])
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- explain=True: word attributions


def captum_word_attributions(directory, text, label_index, temperature, steps=50):
    """Integrated gradients computed apart from minibert: captum on transformers' own model and tokenizer,
    the [PAD] baseline at every non-special token, word pieces summed by the tokenizer's word ids."""
    from captum.attr import LayerIntegratedGradients

    model = transformers.BertForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    enc = tokenizer(text, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    baseline = torch.where(enc["special_tokens_mask"].bool(), enc["input_ids"], tokenizer.pad_token_id)

    def probability(ids):
        return torch.softmax(model(input_ids=ids).logits / temperature, dim=-1)[:, label_index]

    ig = LayerIntegratedGradients(probability, model.bert.embeddings.word_embeddings)
    per_token = ig.attribute(enc["input_ids"], baselines=baseline, n_steps=steps).sum(-1)[0].double()
    words: dict[int, list] = {}
    for value, word, (start, end) in zip(per_token.tolist(), enc.word_ids(), enc["offset_mapping"][0].tolist()):
        if word is not None:
            entry = words.setdefault(word, [start, end, 0.0])
            entry[1], entry[2] = end, entry[2] + value
    with torch.no_grad():
        change = float(probability(enc["input_ids"]) - probability(baseline))
    return [(text[a:b], a, b, v) for a, b, v in words.values()], change


def test_explain_gives_each_word_the_integrated_gradients_captum_gives_transformers(tmp_path, tiny_init_dir):
    labels = ["negative", "positive"]
    directory = with_config(tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2, id2label=dict(enumerate(labels))),
                            calibration_temperature=1.7)
    text = "A gripping, beautifully acted film."
    clf = minibert.pipeline(directory, precision="fp32")
    plain = clf(text)
    result = clf(text, explain=True)
    assert {k: result[k] for k in plain} == plain  # the prediction itself is unchanged
    label = labels.index(result["label"])
    assert result["explains"] == f"probability of {result['label']!r}"
    assert result["explained_score"] == pytest.approx(result["probabilities"][result["label"]], abs=1e-5)  # calibrated
    expected, change = captum_word_attributions(directory, text, label, temperature=1.7)
    got = [(w["word"], w["start"], w["end"], w["attribution"]) for w in result["attributions"]]
    assert [g[:3] for g in got] == [e[:3] for e in expected] and all(text[a:b] == w for w, a, b, _ in got)
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], abs=1e-5)
    assert result["completeness"]["score_change"] == pytest.approx(change, abs=1e-5)
    assert result["completeness"]["within_tolerance"]
    # a named label is explained instead of the predicted one, in a list call
    other = labels[1 - label]
    [named] = clf([text], explain=True, explain_target=other)
    expected_other, _ = captum_word_attributions(directory, text, 1 - label, temperature=1.7)
    assert named["explains"] == f"probability of {other!r}"
    assert [w["attribution"] for w in named["attributions"]] == pytest.approx([e[3] for e in expected_other], abs=1e-5)


def test_a_bf16_pipeline_explains_its_own_weights_in_fp32_and_keeps_predicting_in_bf16(tmp_path, tiny_init_dir):
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2)
    rounded = minibert.pipeline(directory, precision="fp32")
    for module in rounded.model.modules():  # the weights the bf16 pipeline predicts with, as fp32 numbers
        if isinstance(module, nn.Linear):
            module.weight.data = module.weight.data.bfloat16().float()
            module.bias.data = module.bias.data.bfloat16().float()
    expected = rounded(TEXTS, explain=True)
    pipe = minibert.pipeline(directory, precision="bf16")
    before = pipe(TEXTS)
    bf16 = pipe(TEXTS, explain=True)
    for a, b in zip(expected, bf16):
        assert [w["attribution"] for w in b["attributions"]] == pytest.approx([w["attribution"] for w in a["attributions"]],
                                                                              abs=1e-7)
    assert pipe(TEXTS) == before and next(pipe.model.parameters()).dtype == torch.float32  # LayerNorm: still fp32
    assert any(m.weight.dtype == torch.bfloat16 for m in pipe.model.modules() if isinstance(m, nn.Linear))


def test_explain_for_regression_and_the_bad_targets(tmp_path, tiny_init_dir):
    regression = minibert.pipeline(tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=1, problem_type="regression"),
                                   precision="fp32")
    result = regression("A gripping film.", explain=True)
    assert result["explains"].startswith("predicted value") and result["explained_score"] == pytest.approx(result["value"], abs=1e-5)
    assert sum(w["attribution"] for w in result["attributions"]) == pytest.approx(result["completeness"]["score_change"], rel=0.05)
    with pytest.raises(ValueError, match="explain_target names a label.*leave explain_target out"):
        regression("A gripping film.", explain=True, explain_target="positive")
    clf = minibert.pipeline(tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2), precision="fp32")
    with pytest.raises(ValueError, match="is not a label of"):
        clf("A gripping film.", explain=True, explain_target="nope")
    with pytest.raises(ValueError, match="pass explain=True with it"):
        clf("A gripping film.", explain_target="LABEL_0")


def test_a_tagger_explains_each_entity_as_captum_explains_its_score_on_transformers(tmp_path, tiny_init_dir):
    from captum.attr import LayerIntegratedGradients

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, kind="token", num_labels=5, id2label=dict(enumerate(labels)))
    ner = minibert.pipeline(directory, precision="fp32")
    text = "Jim Henson met Xavierovich in New York"
    plain = ner(text)
    explained = ner(text, explain=True)
    assert plain and [{k: e[k] for k in p} for e, p in zip(explained, plain)] == plain  # the entities, unchanged
    words = ner(text.split(), is_split_into_words=True)
    model = transformers.BertForTokenClassification.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    enc = tokenizer(text, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    baseline = torch.where(enc["special_tokens_mask"].bool(), enc["input_ids"], tokenizer.pad_token_id)
    first_piece = {}  # word index -> its first token
    for position, word in enumerate(enc.word_ids()):
        if word is not None:
            first_piece.setdefault(word, position)
    for entity, by_words in zip(explained, words["entities"]):
        assert entity["explains"] == f"score of {entity['entity']} {entity['text']!r}"
        span = range(by_words["start"], by_words["end"])  # the entity's words
        positions = torch.tensor([first_piece[w] for w in span])
        tags = torch.tensor([labels.index(words["tags"][w]) for w in span])

        def score(ids):
            probs = torch.softmax(model(input_ids=ids).logits[:, positions], dim=-1)
            return probs[:, torch.arange(len(span)), tags].mean(-1)

        per_token = LayerIntegratedGradients(score, model.bert.embeddings.word_embeddings).attribute(
            enc["input_ids"], baselines=baseline, n_steps=entity["completeness"]["steps"]).sum(-1)[0]
        per_word = [0.0] * len(text.split())
        for value, word in zip(per_token.tolist(), enc.word_ids()):
            if word is not None:
                per_word[word] += value
        assert [w["word"] for w in entity["attributions"]] == text.split()
        assert all(text[w["start"]:w["end"]] == w["word"] for w in entity["attributions"])
        assert [w["attribution"] for w in entity["attributions"]] == pytest.approx(per_word, abs=1e-5)
        assert entity["explained_score"] == pytest.approx(entity["score"], abs=1e-5)  # the entity's own score


def test_explain_refuses_what_it_cannot_explain_faithfully(tmp_path, tiny_init_dir):
    directory = tiny_classifier_dir(tmp_path, tiny_init_dir, num_labels=2)
    windows = minibert.pipeline(directory, precision="fp32", max_length=16, sliding_window=True, stride=4)
    long_text = "a gripping film " * 20
    windows("short text", explain=True)  # one window: fine
    with pytest.raises(ValueError, match=r"input 2 is longer than max_length=16 tokens and was read in windows"):
        windows(["short text", long_text], explain=True)
