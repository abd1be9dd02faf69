"""train_finetune.py on the data people have: class weights, per-label thresholds, span-annotated NER in and out,
valid tag sequences and the CRF, run as a user runs them (a tiny random BERT with the real vocabulary)."""

import json

import numpy as np
import pytest
import transformers

from conftest import write_csv
import train_finetune
from minibert.spans import read_record
from minibert.tagging import allowed_transitions


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(init, out, *args):
    argv = ["--init", str(init), "--output-dir", str(out), "--batch-size", "8", "--lr", "1e-3", "--no-progress",
            "--seed", "0", *map(str, args)]
    return train_finetune.main(argv)


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- class weights


def ten_to_one(seed: int, n_minority: int):
    """Ten majority sentences per minority one. "zebra" is in 70% of the minority and 10% of the majority
    sentences, and nothing else tells them apart: with a prior of 1:10, P(minority | zebra) is
    0.07 / (0.07 + 0.1) = 0.41, so the best unweighted classifier never says minority; with balanced
    weights the classes weigh the same and P(minority | zebra) becomes 0.7 / (0.7 + 0.1) = 0.875."""
    rng = np.random.default_rng(seed)
    fillers = ["the film", "a story", "some actors", "this scene", "the plot", "an ending", "the music", "one line"]
    rows = []
    for label, count, p_zebra in (("minority", n_minority, 0.7), ("majority", 10 * n_minority, 0.1)):
        zebras = set(rng.permutation(count)[: round(p_zebra * count)].tolist())
        for i in range(count):
            words = [fillers[j] for j in rng.permutation(len(fillers))[:2]]
            rows.append((" ".join(words[:1] + (["zebra"] if i in zebras else []) + words[1:]), label))
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.mark.slow
def test_balanced_class_weights_raise_the_minority_recall(tiny_init_dir, tmp_path, caplog):
    train = write_csv(tmp_path / "train.csv", ten_to_one(0, 20))
    test = write_csv(tmp_path / "test.csv", ten_to_one(1, 20))
    recall = {}
    for weights in ("none", "balanced"):
        extra = ["--class-weights", "balanced"] if weights == "balanced" else []
        with caplog.at_level("INFO", logger="minibert"):
            results = run(tiny_init_dir, tmp_path / weights, "--train-file", train, "--validation-file", test,
                          "--test-file", test, "--epochs", 6, "--lr", "3e-3", "--best-metric", "f1", *extra)
        scores = json.loads((tmp_path / weights / "test_results.json").read_text())
        assert set(scores["per_class"]) == {"majority", "minority"}
        assert scores["per_class"]["minority"]["support"] == 20 and scores["accuracy"] == results["test"]["accuracy"]
        recall[weights] = scores["per_class"]["minority"]["recall"]
    # balanced weights: 220 / (2 * 200) for the majority, 220 / (2 * 20) for the minority, in the log
    assert "class weights (balanced): majority 0.55, minority 5.5" in caplog.text
    assert recall["none"] <= 0.1 and recall["balanced"] >= 0.5, recall


def test_class_weights_file_and_bad_settings_are_one_line_errors(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ten_to_one(0, 4))
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"majority": 1, "minority": 10}))
    run(tiny_init_dir, tmp_path / "ok", "--train-file", train, "--max-steps", 1, "--class-weights", weights)
    weights.write_text(json.dumps({"majority": 1, "minority": 10, "neutral": 2}))
    cases = [
        (["--class-weights", weights], r"names labels the training data does not have: \['neutral'\]"),
        (["--class-weights", "balanced", "--task-type", "regression"], "a regression task has none"),
        (["--crf"], "--crf tags words in sequence: it needs --task-type token-classification, and this is classification"),
        (["--tune-thresholds"], "--tune-thresholds sets a threshold per label of a multilabel task; a classification task"),
        (["--tag-scheme", "iobes"], "--tag-scheme 'iobes' is unknown; choose one of bio, bioes"),
        (["--best-metric", "f1_micro"], "--best-metric f1_micro: a classification task reports accuracy, f1, mcc; choose one"),
    ]
    for flags, message in cases:
        if "regression" in flags:
            data = write_csv(tmp_path / "scores.csv", [("a b", "0.5"), ("c d", "1.5")] * 4)
        else:
            data = train
        with pytest.raises(ValueError, match=message) as e:
            run(tiny_init_dir, tmp_path / "bad", "--train-file", data, "--max-steps", 1, *flags)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- thresholds


def test_tuned_thresholds_are_saved_and_used_by_every_prediction(tiny_init_dir, tmp_path):
    rng = np.random.default_rng(0)
    records = [{"text": " ".join(rng.choice(["red", "blue", "green", "film", "song"], 3)), "label": []} for _ in range(40)]
    for r in records:
        r["label"] = [c for c in ("red", "blue") if c in r["text"]] + (["rare"] if "green" in r["text"] and "song" in r["text"] else [])
    train = write_jsonl(tmp_path / "train.jsonl", records)
    results = run(tiny_init_dir, tmp_path / "out", "--train-file", train, "--validation-file", train, "--test-file", train,
                  "--task-type", "multilabel", "--epochs", 4, "--lr", "3e-3", "--tune-thresholds")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    thresholds = config["label_thresholds"]
    assert set(thresholds) == {"blue", "rare", "red"} and thresholds == results["eval"]["label_thresholds"]
    assert any(abs(t - 0.5) > 1e-3 for t in thresholds.values())
    assert set(results["eval"]["at_tuned_thresholds"]) >= {"f1_micro", "f1_macro", "per_class"}
    predictions = lines(tmp_path / "out" / "predictions.jsonl")
    checked = 0
    for p in predictions:  # (the probabilities are written rounded to 6 digits: those that close are not checked)
        for label, prob in p["probabilities"].items():
            if abs(prob - thresholds[label]) > 1e-6:
                assert (label in p["labels"]) == (prob >= thresholds[label]), (p, thresholds)
                checked += 1
    assert checked >= 100
    train_finetune.main(["--init", str(tmp_path / "out"), "--predict-only", "--test-file", str(train),
                         "--output-dir", str(tmp_path / "again"), "--precision", "fp32"])
    assert [p["labels"] for p in lines(tmp_path / "again" / "predictions.jsonl")] == [p["labels"] for p in predictions]
    with pytest.raises(ValueError, match="--tune-thresholds picks thresholds on a validation set, and --predict-only has none"):
        train_finetune.main(["--init", str(tmp_path / "out"), "--predict-only", "--test-file", str(train), "--tune-thresholds"])


# ----------------------------------------------------------------------------- span-annotated NER


SENTENCES = [
    ("Barack Obama visited Paris with Michelle Obama.", [("Barack Obama", "PER"), ("Paris", "LOC"), ("Michelle Obama", "PER")]),
    ("我爱北京天安门。", [("北京天安门", "LOC")]),
    ("他在Apple公司工作，1994年出生。", [("Apple公司", "ORG"), ("1994年", "DATE")]),
    ("Acme Corporation hired Mary in London.", [("Acme Corporation", "ORG"), ("Mary", "PER"), ("London", "LOC")]),
]


def span_records():
    records = []
    for text, pieces in SENTENCES:
        spans, at = [], 0
        for piece, label in pieces:
            start = text.index(piece, at)
            spans.append({"start": start, "end": start + len(piece), "label": label})
            at = start + len(piece)
        records.append({"text": text, "spans": spans})
    return records


def test_spans_in_give_the_same_run_as_conll_and_spans_out(tiny_init_dir, tmp_path):
    """The same sentences as span JSONL and as CoNLL (the tokenizer's words with their BIO tags) train
    the same model: identical validation scores; predictions come back as spans in the input's format."""
    from minibert.assets import minilm_dir
    from minibert.spans import spans_to_tags, word_offsets
    from minibert.tokenizer import load_tokenizer

    records = span_records() * 3
    spans_file = write_jsonl(tmp_path / "train.jsonl", records)
    tokenizer = load_tokenizer(minilm_dir())
    conll = []
    for record, offsets in zip(records, word_offsets(tokenizer, [r["text"] for r in records])):
        text, spans = read_record(record, "minibert", "x")
        tags, _ = spans_to_tags(text, spans, offsets, "bio")
        conll.append("\n".join(f"{text[s:e]} {t}" for (s, e), t in zip(offsets, tags)))
    conll_file = tmp_path / "train.conll"
    conll_file.write_text("\n\n".join(conll) + "\n", encoding="utf-8")
    results = {}
    for name, data in (("spans", spans_file), ("conll", conll_file)):
        results[name] = run(tiny_init_dir, tmp_path / name, "--train-file", data, "--validation-file", data,
                            "--test-file", data, "--task-type", "token-classification", "--max-steps", 6)
    assert results["spans"]["eval"] == results["conll"]["eval"]
    predicted = lines(tmp_path / "spans" / "predictions.jsonl")
    assert [p["text"] for p in predicted] == [r["text"] for r in records]
    assert all(set(s) == {"start", "end", "label", "text", "score"} for p in predicted for s in p["spans"])
    assert [p["gold"] for p in predicted] == [r["spans"] for r in records]
    # Unlabelled text, and doccano's format, go in and come out as spans with the model's labels
    doccano = write_jsonl(tmp_path / "doccano.jsonl", [{"id": i, "text": r["text"], "label": []} for i, r in enumerate(records)])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": r["text"]} for r in records])
    for file in (doccano, plain):
        out = tmp_path / f"predict-{file.stem}"
        train_finetune.main(["--init", str(tmp_path / "spans"), "--predict-only", "--test-file", str(file),
                             "--output-dir", str(out), "--precision", "fp32"])
        again = lines(out / "predictions.jsonl")
        fmt = "doccano" if file is doccano else "minibert"
        assert [read_record(a, fmt, "x")[1] for a in again] == [read_record(p, "minibert", "x")[1] for p in predicted]


def test_a_misaligned_span_is_named_before_training(tiny_init_dir, tmp_path):
    records = span_records()
    records[0]["spans"][1] = {"start": 21, "end": 24, "label": "LOC"}  # "Par" of Paris
    data = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(ValueError, match=r"train.jsonl line 1: the span 21..24 'Par' \(LOC\) ends inside the word 'Paris'"):
        run(tiny_init_dir, tmp_path / "out", "--train-file", data, "--max-steps", 1)


# ----------------------------------------------------------------------------- valid tags and the CRF


def valid_bio(tags):
    labels = sorted(set(tags) | {"O"})
    start, transitions, _ = allowed_transitions(labels, "bio")
    ids = [labels.index(t) for t in tags]
    return not ids or (start[ids[0]] and all(transitions[a, b] for a, b in zip(ids, ids[1:])))


@pytest.mark.parametrize("crf", [False, True])
def test_decoded_tags_are_valid_bio_and_the_crf_is_saved(tiny_init_dir, tmp_path, crf):
    sentences = [(["John", "Smithson", "lives", "in", "New", "York", "City"], ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC"]),
                 (["Acme", "Corporation", "hired", "Mary", "Ann", "Lee"], ["B-ORG", "I-ORG", "O", "B-PER", "I-PER", "I-PER"])] * 4
    data = write_jsonl(tmp_path / "train.jsonl", [{"tokens": w, "tags": t} for w, t in sentences])
    run(tiny_init_dir, tmp_path / "out", "--train-file", data, "--validation-file", data, "--test-file", data,
        "--max-steps", 1, *(["--crf"] if crf else []))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tag_scheme"] == "bio"
    assert all(valid_bio(p["tags"]) for p in lines(tmp_path / "out" / "predictions.jsonl"))
    assert (tmp_path / "out" / "crf.safetensors").is_file() == crf
    # transformers loads the rest of a CRF model and ignores crf.safetensors
    hf, info = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again = tmp_path / "again"
    train_finetune.main(["--init", str(tmp_path / "out"), "--predict-only", "--test-file", str(data), "--output-dir", str(again),
                         "--precision", "fp32"])
    assert lines(again / "predictions.jsonl") == lines(tmp_path / "out" / "predictions.jsonl")
