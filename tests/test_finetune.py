"""train_finetune.py as a user runs it: every data format and task type, labels, freezing, resume, bad input.

All runs use a tiny random BERT with the real uncased vocabulary (conftest.tiny_init_dir) and a few steps.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import conftest
from conftest import write_csv
import train_finetune
from minibert.data.examples import DataError

POSITIVE, NEGATIVE = conftest.POSITIVE[:4], conftest.NEGATIVE[:4]  # four a class: these tests count on 8 texts
# What calibration adds to a classifier's results (tests/test_finetune_trust.py checks their values)
CALIBRATION = {"ece", "brier", "nll", "ece_uncalibrated", "brier_uncalibrated", "nll_uncalibrated"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sentiment_rows(n=24):
    rows = []
    for i in range(n):
        rows.append((POSITIVE[i % 4], "pos") if i % 2 == 0 else (NEGATIVE[i % 4], "neg"))
    return rows


def run(tiny_init_dir, tmp_path, *args, **kwargs):
    argv = ["--init", str(tiny_init_dir), "--output-dir", str(tmp_path / "out"), "--batch-size", "4",
            "--lr", "1e-3", "--no-progress", "--seed", "0", *map(str, args)]
    return train_finetune.main(argv, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def temperature(model_dir, names=None):
    """The calibration temperature a run saved (train_finetune.py fits one by default; its values are checked in
    test_finetune_trust.py): predictions are softmax (or sigmoid) of logits / T."""
    saved = json.loads((model_dir / "config.json").read_text())["calibration_temperature"]
    return torch.tensor([saved[n] for n in names], dtype=torch.float64) if isinstance(saved, dict) else saved


def hf_logits(model_dir, texts, pairs=None, head=transformers.AutoModelForSequenceClassification):
    """transformers' logits for the texts, in float64: the independent forward pass that minibert's
    predictions (fp32) are checked against."""
    model = head.from_pretrained(model_dir).eval().double()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**tok(texts, pairs, return_tensors="pt", padding=True)).logits


def hf_word_log_probs(model_dir, sentences):
    """transformers' per-word tag log-probabilities (first piece of each word), float64, one (W, L) array
    per sentence of words."""
    model = transformers.AutoModelForTokenClassification.from_pretrained(model_dir).eval().double()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for words in sentences:
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            log_probs = model(**enc).logits[0].log_softmax(-1)
        word_ids = enc.word_ids()
        firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
        out.append(log_probs[firsts].numpy())
    return out


def check_predict_only_repeats_the_run(tmp_path, test_file, *flags):
    """--predict-only with the trained model as --init writes the training run's own predictions and test
    scores for its test file (which the caller checked against transformers)."""
    train_finetune.main(["--init", str(tmp_path / "out"), "--predict-only", "--test-file", str(test_file),
                         "--output-dir", str(tmp_path / "predicted"), "--precision", "fp32", *flags])  # as the run evaluated
    assert read_jsonl(tmp_path / "predicted" / "predictions.jsonl") == read_jsonl(tmp_path / "out" / "predictions.jsonl")
    scores, expected = (json.loads((tmp_path / d / "test_results.json").read_text()) for d in ("predicted", "out"))
    assert scores.pop("per_class", None) == expected.pop("per_class", None)
    assert scores == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- formats and task types


def test_csv_classification_end_to_end(tiny_init_dir, tmp_path):
    """predictions.jsonl holds transformers' probabilities for the saved model, and test_results.json
    scikit-learn's scores of those predictions against the gold labels."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_recall_fscore_support

    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(8))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(6))
    results = run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", dev, "--test-file", test,
                  "--epochs", 2, "--precision", "fp32")
    out = tmp_path / "out"
    assert set(results["eval"]) >= {"accuracy", "f1", "mcc", *CALIBRATION, "calibration_temperature"}
    assert set(results["test"]) == {"accuracy", "f1", "mcc", "per_class", *CALIBRATION}
    assert json.loads((out / "test_results.json").read_text()) == results["test"]
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [(p["text"], p["gold"]) for p in predictions] == sentiment_rows(6)
    # The output directory is a model transformers loads, with the label names, giving the same predictions.
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    expected = (hf_logits(out, [p["text"] for p in predictions]) / temperature(out)).softmax(-1)
    got = torch.tensor([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in predictions], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)  # rounded to 6 decimals
    assert [p["label"] for p in predictions] == [["neg", "pos"][i] for i in expected.argmax(-1).tolist()]
    gold, predicted = [p["gold"] for p in predictions], [p["label"] for p in predictions]
    scores = {k: v for k, v in results["test"].items() if k not in CALIBRATION}  # their values: test_finetune_trust.py
    per_class = scores.pop("per_class")
    assert scores == pytest.approx({"accuracy": accuracy_score(gold, predicted), "f1": f1_score(gold, predicted, pos_label="pos"),
                                    "mcc": matthews_corrcoef(gold, predicted)}, abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=["neg", "pos"], zero_division=0)
    for i, label in enumerate(["neg", "pos"]):
        assert per_class[label] == pytest.approx({"precision": precision[i], "recall": recall[i], "f1": f1[i],
                                                  "support": support[i]}, abs=1e-12), label
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]  # 24 examples / batch 4 = 6 steps an epoch
    assert (out / "finetune_config.json").is_file() and not (out / "checkpoint").exists()
    # eval_results.json is the evaluation of the model kept: the better of the two by accuracy
    evals = [r for r in records if r["split"] == "eval"]
    best = max(evals, key=lambda r: r["accuracy"])  # the first of equals: a later one must be better to replace it
    assert results["eval"]["step"] == best["step"] and results["eval"]["accuracy"] == best["accuracy"]
    dev_rows = sentiment_rows(8)
    dev_predicted = hf_logits(out, [t for t, _ in dev_rows]).argmax(-1).tolist()
    assert results["eval"]["accuracy"] == pytest.approx(accuracy_score([lab for _, lab in dev_rows],
                                                                       [["neg", "pos"][i] for i in dev_predicted]))


def test_tsv_pairs_with_integer_labels(tiny_init_dir, tmp_path):
    """Pairs are encoded as BERT pairs ([CLS] a [SEP] b [SEP], token types 0 then 1): the validation accuracy
    is transformers' on the pairs, for the model kept."""
    rows = [(a, b, int(i % 3 == 0)) for i, (a, b) in enumerate(zip(POSITIVE * 3, NEGATIVE * 3))]
    header = ("premise", "hypothesis", "gold")
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    results = run(tiny_init_dir, tmp_path, "--train-file", tmp_path / "train.tsv", "--validation-file",
                  tmp_path / "dev.tsv", "--test-file", tmp_path / "dev.tsv", "--text-column", "premise",
                  "--text-pair-column", "hypothesis", "--label-column", "gold", "--max-steps", 2, "--lr", "1e-2",
                  "--precision", "fp32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["architectures"] == ["BertForSequenceClassification"]
    t = temperature(tmp_path / "out")
    expected = (hf_logits(tmp_path / "out", [a for a, _, _ in rows], [b for _, b, _ in rows]) / t).softmax(-1)
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    got = torch.tensor([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in predictions], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    # a model that read only the first text would be caught: its probabilities are further off than that
    alone = (hf_logits(tmp_path / "out", [a for a, _, _ in rows]) / t).softmax(-1)
    assert (alone - expected).abs().max() > 1e-5
    predicted = expected.argmax(-1).tolist()
    gold = [label for _, _, label in rows]
    assert results["eval"]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold)) / len(rows))


def test_jsonl_regression(tiny_init_dir, tmp_path):
    """Regression predictions are transformers' single output, and pearson/spearman/mse scipy's and numpy's."""
    from scipy.stats import pearsonr, spearmanr

    records = [{"text": t, "score": float(i % 5) / 2} for i, t in enumerate(POSITIVE + NEGATIVE)]
    train = write_jsonl(tmp_path / "train.jsonl", records * 2)
    dev = write_jsonl(tmp_path / "dev.jsonl", records)
    results = run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", dev, "--test-file", dev,
                  "--task-type", "regression", "--label-column", "score", "--max-steps", 3, "--precision", "fp32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [p["gold"] for p in predictions] == [r["score"] for r in records]
    expected = hf_logits(tmp_path / "out", [r["text"] for r in records])[:, 0].numpy()
    got = [p["value"] for p in predictions]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    gold = [r["score"] for r in records]
    assert results["test"]["pearson"] == pytest.approx(pearsonr(got, gold)[0], abs=1e-6)
    assert results["test"]["spearman"] == pytest.approx(spearmanr(got, gold)[0], abs=1e-6)
    assert results["test"]["mse"] == pytest.approx(float(((expected - gold) ** 2).mean()), abs=1e-5)
    check_predict_only_repeats_the_run(tmp_path, dev, "--label-column", "score")


def test_multilabel(tiny_init_dir, tmp_path):
    """Each label's probability is the sigmoid of transformers' logit, a label is predicted at >= 0.5, and
    the scores are scikit-learn's on those decisions."""
    from sklearn.metrics import f1_score

    label_sets = [["acting"], ["acting", "story"], [], ["humor"]] * 2
    records = [{"text": t, "label": labels} for t, labels in zip(POSITIVE + NEGATIVE, label_sets)]
    train = write_jsonl(tmp_path / "train.jsonl", records * 2)
    test = write_jsonl(tmp_path / "test.jsonl", records)
    results = run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--test-file", test,
                  "--task-type", "multilabel", "--max-steps", 2, "--lr", "1e-2", "--precision", "fp32")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert hf.config.problem_type == "multi_label_classification"
    names = ["acting", "humor", "story"]
    assert [hf.config.id2label[i] for i in range(3)] == names
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    expected = (hf_logits(tmp_path / "out", [r["text"] for r in records]) / temperature(tmp_path / "out", names)).sigmoid()
    got = torch.tensor([[p["probabilities"][n] for n in names] for p in predictions], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    decisions = (expected >= 0.5).long().numpy()
    assert [p["labels"] for p in predictions] == [[n for n, d in zip(names, row) if d] for row in decisions]
    gold = [[int(n in labels) for n in names] for labels in label_sets]
    assert results["test"]["f1_micro"] == pytest.approx(f1_score(gold, decisions, average="micro", zero_division=0))
    assert results["test"]["f1_macro"] == pytest.approx(f1_score(gold, decisions, average="macro", zero_division=0))
    assert results["test"]["accuracy"] == pytest.approx(sum(list(d) == g for d, g in zip(decisions, gold)) / len(gold))
    check_predict_only_repeats_the_run(tmp_path, test)


@pytest.mark.parametrize("fmt", ["conll", "jsonl"])
def test_token_classification(tiny_init_dir, tmp_path, fmt):
    """Each word's tag comes from transformers' logits at its first piece: the most probable valid BIO
    sequence (found here by brute force over every sequence), or with --no-constrained-decoding each
    word's most probable tag; the scores are seqeval's on those tags."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    from test_tagging import brute_force_best

    sentences = [(["John", "Smithson", "lives", "in", "Pittsburgh"], ["B-PER", "I-PER", "O", "O", "B-LOC"]),
                 (["Acme", "Corporation", "hired", "Mary"], ["B-ORG", "I-ORG", "O", "B-PER"])] * 4
    if fmt == "conll":
        text = "\n\n".join("\n".join(f"{w} X {t}" for w, t in zip(ws, ts)) for ws, ts in sentences) + "\n"
        (tmp_path / "train.conll").write_text(text)
        train, decoding = tmp_path / "train.conll", []
    else:
        train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ws, "tags": ts} for ws, ts in sentences])
        decoding = ["--no-constrained-decoding"]
    results = run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--test-file", train,
                  "--task-type", "token-classification", "--max-steps", 2, "--precision", "fp32", *decoding)
    hf, info = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    assert labels == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O"]
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [(p["tokens"], p["gold"]) for p in predictions] == [(ws, ts) for ws, ts in sentences]
    expected = []
    for log_probs in hf_word_log_probs(tmp_path / "out", [ws for ws, _ in sentences]):
        ids = log_probs.argmax(-1).tolist() if decoding else brute_force_best(log_probs, labels, "bio")
        expected.append([labels[i] for i in ids])
    assert [p["tags"] for p in predictions] == expected
    gold = [ts for _, ts in sentences]
    for name, reference in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert results["test"][name] == pytest.approx(reference(gold, expected, zero_division=0), abs=1e-12), name
    words = sum(len(ts) for ts in gold)
    assert results["test"]["accuracy"] == pytest.approx(sum(a == b for g, e in zip(gold, expected) for a, b in zip(g, e)) / words)
    check_predict_only_repeats_the_run(tmp_path, train, *decoding)


def test_glue_task_directory(tiny_init_dir, tmp_path):
    glue = tmp_path / "glue_data" / "RTE"
    glue.mkdir(parents=True)
    rows = "".join(f"{i}\t{a}\t{b}\t{'entailment' if i % 2 else 'not_entailment'}\n"
                   for i, (a, b) in enumerate(zip(POSITIVE * 2, NEGATIVE * 2)))
    for name in ("train.tsv", "dev.tsv"):
        (glue / name).write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    results = run(tiny_init_dir, tmp_path, "--task", "rte", "--data-dir", tmp_path / "glue_data", "--max-steps", 2,
                  "--lr", "1e-2", "--precision", "fp32")
    assert set(results["eval"]) == {"accuracy", "loss", "step", "epoch", "per_class", *CALIBRATION,  # loss: the validation loss
                                    "calibration_temperature"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    # RTE is scored by accuracy on dev.tsv's sentence pairs: transformers' predictions against the gold labels
    pairs = list(zip(POSITIVE * 2, NEGATIVE * 2))
    logits = hf_logits(tmp_path / "out", [a for a, _ in pairs], [b for _, b in pairs])
    gold = [int(not i % 2) for i in range(len(pairs))]  # odd rows are entailment (0)
    predicted = logits.argmax(-1).tolist()
    assert results["eval"]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold)) / len(pairs))
    # and the validation loss is the mean cross-entropy of those logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(gold)).item()
    assert results["eval"]["loss"] == pytest.approx(loss, abs=1e-5)


# ----------------------------------------------------------------------------- labels, freezing, resume


def test_init_from_own_classifier_keeps_labels_and_other_labels_need_reinit(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 1)
    first = tmp_path / "out"
    run(first, tmp_path / "second", "--train-file", train, "--validation-file", train, "--max-steps", 1, "--lr", "1e-12")
    kept = load_file(tmp_path / "second" / "out" / "model.safetensors")  # a rate of 1e-12 leaves the head as loaded
    for key, value in load_file(first / "model.safetensors").items():
        torch.testing.assert_close(kept[key], value, rtol=0, atol=1e-9, msg=key)
    other = write_csv(tmp_path / "other.csv", [(t, lab) for t, lab in zip(POSITIVE * 2, ["a", "b", "c", "d"] * 2)])
    with pytest.raises(DataError, match=r"is a classifier for labels \['neg', 'pos'\].*--reinit-head"):
        run(first, tmp_path / "third", "--train-file", other, "--validation-file", other, "--max-steps", 1)
    run(first, tmp_path / "fourth", "--train-file", other, "--validation-file", other, "--max-steps", 1, "--reinit-head")
    assert len(json.loads((tmp_path / "fourth" / "out" / "config.json").read_text())["id2label"]) == 4


def hf_classifier_dir(tiny_init_dir, directory, head=transformers.BertForSequenceClassification, **config):
    """A classifier as transformers saves it, with the tiny model's tokenizer files."""
    import shutil

    torch.manual_seed(0)
    model = head(transformers.BertConfig.from_pretrained(tiny_init_dir, **config)).eval()
    model.save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_init_dir / name, directory / name)
    return model


def test_classifier_with_transformers_default_labels_takes_integer_labels(tiny_init_dir, tmp_path):
    """transformers leaves id2label out of config.json for its default names LABEL_0, LABEL_1: such a head
    is a classifier for the labels 0 and 1, kept for data labelled 0/1, and --predict-only gives the same
    probabilities as transformers."""
    hf = hf_classifier_dir(tiny_init_dir, tmp_path / "hf")
    assert "id2label" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    texts = [text for text, _ in sentiment_rows(6)]
    unlabelled = write_csv(tmp_path / "new.csv", [(t,) for t in texts], header=("text",))
    train_finetune.main(["--init", str(tmp_path / "hf"), "--predict-only", "--test-file", str(unlabelled),
                         "--output-dir", str(tmp_path / "pred"), "--precision", "fp32"])
    predictions = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    tok = transformers.BertTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert [p["label"] for p in predictions] == [str(i) for i in expected.argmax(-1).tolist()]
    got = torch.tensor([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in predictions])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)

    integers = write_csv(tmp_path / "int.csv", [(t, int(lab == "pos")) for t, lab in sentiment_rows(8)])
    run(tmp_path / "hf", tmp_path / "kept", "--train-file", integers, "--validation-file", integers, "--max-steps", 1,
        "--lr", "1e-12")
    kept = load_file(tmp_path / "kept" / "out" / "model.safetensors")["classifier.weight"]
    torch.testing.assert_close(kept, hf.classifier.weight.detach(), atol=1e-9, rtol=0)


def test_reinit_head_trains_a_new_head_even_for_as_many_labels(tiny_init_dir, tmp_path):
    """--reinit-head with other labels of the same number: the old head must not be kept, or its row for
    "pos" would silently mean "bad"."""
    hf = hf_classifier_dir(tiny_init_dir, tmp_path / "hf", id2label={0: "neg", 1: "pos"})
    other = write_csv(tmp_path / "other.csv", [(t, {"pos": "good", "neg": "bad"}[lab]) for t, lab in sentiment_rows(8)])
    run(tmp_path / "hf", tmp_path, "--train-file", other, "--validation-file", other, "--max-steps", 1,
        "--lr", "1e-12", "--reinit-head")
    new = load_file(tmp_path / "out" / "model.safetensors")["classifier.weight"]
    assert not torch.allclose(new, hf.classifier.weight.detach())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == {"0": "bad", "1": "good"}


def test_checkpoint_that_does_not_fit_its_tokenizer_or_pairs_is_a_one_line_error(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    hf_classifier_dir(tiny_init_dir, tmp_path / "small-vocab", transformers.BertModel, vocab_size=1000)  # the tokenizer has 30522 words
    with pytest.raises(ValueError, match="tokenizer of --init .* has 30522 tokens but the model only 1000"):
        run(tmp_path / "small-vocab", tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 1)
    hf_classifier_dir(tiny_init_dir, tmp_path / "one-segment", transformers.BertModel, type_vocab_size=1)
    pairs = write_csv(tmp_path / "pairs.csv", [(t, t, lab) for t, lab in sentiment_rows(8)], header=("a", "b", "label"))
    with pytest.raises(ValueError, match="needs two segment .* type_vocab_size 1"):
        run(tmp_path / "one-segment", tmp_path, "--train-file", pairs, "--validation-file", pairs, "--max-steps", 1,
            "--text-column", "a", "--text-pair-column", "b")
    (tmp_path / "one-segment" / "tokenizer.json").unlink()
    (tmp_path / "one-segment" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"has no \[CLS\], \[SEP\]: it is not a BERT WordPiece vocabulary"):
        run(tmp_path / "one-segment", tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 1)


def test_quoted_empty_text_in_a_one_column_csv_is_an_example(tiny_init_dir, tmp_path):
    """Predictions are joined back to rows by position: a row whose text is "" must not vanish."""
    from minibert.data.readers import load_examples

    path = tmp_path / "new.csv"
    path.write_text('text\ngood film\n""\n\nbad film\n   \n', encoding="utf-8")
    examples = load_examples(path, task_type="classification", flag="--test-file", require_labels=False)
    assert [e.text for e in examples] == ["good film", "", "bad film"]


def test_without_a_validation_file_a_seeded_tenth_of_the_training_data_is_held_out(tiny_init_dir, tmp_path, caplog):
    import logging

    from minibert.finetuning import hold_out

    train = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    with caplog.at_level(logging.INFO, logger="minibert"):
        results = run(tiny_init_dir, tmp_path, "--train-file", train, "--max-steps", 2)
    assert "4 of the 40 training examples (--validation-fraction 0.1, chosen by --seed) are held out" in caplog.text
    examples = list(range(40))
    kept, held = hold_out(examples, 0.1, seed=0)
    # the validation accuracy is the saved model's (transformers') on those 4 rows, the run's --seed being 0
    rows = [sentiment_rows(40)[i] for i in held]
    predicted = [["neg", "pos"][i] for i in hf_logits(tmp_path / "out", [t for t, _ in rows]).argmax(-1).tolist()]
    assert results["eval"]["accuracy"] == pytest.approx(sum(p == g for p, (_, g) in zip(predicted, rows)) / 4)
    assert len(held) == 4 and sorted(kept + held) == examples and hold_out(examples, 0.1, seed=0) == (kept, held)
    assert hold_out(examples, 0.1, seed=1)[1] != held
    with pytest.raises(DataError, match="too few to hold some out"):
        hold_out([1], 0.1, seed=0)


def test_freezing(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 3,
        "--freeze-embeddings", "--freeze-layers", 1)
    before, after = load_file(tiny_init_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for key in after:
        if key.startswith(("bert.embeddings.", "bert.encoder.layer.0.")):
            assert torch.equal(after[key], before[key[len("bert."):]]), key
    assert not torch.equal(after["bert.encoder.layer.1.output.dense.weight"], before["encoder.layer.1.output.dense.weight"])


def test_reinit_layers_starts_the_top_layer_and_pooler_fresh(tiny_init_dir, tmp_path):
    """--reinit-layers 1 on a 2-layer model: layer 1 and the pooler get new N(0, 0.02) weights and zero
    biases; the embeddings and layer 0 stay as loaded (a learning rate of 1e-12 keeps training from moving them)."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 1,
        "--lr", "1e-12", "--reinit-layers", 1)
    before, after = load_file(tiny_init_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for key in after:
        if key.startswith(("bert.embeddings.", "bert.encoder.layer.0.")):
            torch.testing.assert_close(after[key], before[key[len("bert."):]], rtol=0, atol=1e-9)
    for key in ("encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.weight", "pooler.dense.weight"):
        assert (after["bert." + key] - before[key]).abs().max() > 0.01, key
        assert abs(after["bert." + key].std().item() - 0.02) < 0.003, key
    assert after["bert.encoder.layer.1.output.dense.bias"].abs().max() < 1e-6
    with pytest.raises(ValueError, match="--reinit-layers 3: the model has only 2 layers"):
        run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--reinit-layers", 3)


def test_killed_and_resumed_run_equals_uninterrupted(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    args = ["--train-file", train, "--validation-file", train, "--max-steps", 6, "--eval-steps", 2, "--dropout", 0.1]
    run(tiny_init_dir, tmp_path / "a", *args)
    stopped = run(tiny_init_dir, tmp_path / "b", *args, _stop_after_steps=5)  # killed after step 5
    assert stopped == {"stopped_at": 5}
    assert (tmp_path / "b" / "out" / "checkpoint" / "training_state.pt").is_file()  # saved at step 4
    # --output-dir and --resume are enough: the run's settings (data, labels, schedule) come from its checkpoint.
    train_finetune.main(["--output-dir", str(tmp_path / "b" / "out"), "--resume", "--no-progress"])
    a, b = (load_file(tmp_path / d / "out" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(line)["loss"] for line in (tmp_path / d / "out" / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                        if json.loads(line)["split"] == "train"]
    assert losses("a") == losses("b")  # the steps logged after the checkpoint, before the kill, are dropped


def test_the_same_command_continues_a_killed_run_and_a_changed_one_is_refused(tiny_init_dir, tmp_path):
    """Rerunning the command of a killed run continues it; --resume with a flag that changes the training,
    or a new run with other settings in its folder, is a one-line error. Without an evaluation in sight,
    --save-steps still leaves a checkpoint."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    args = ["--train-file", train, "--validation-file", train, "--max-steps", 6, "--save-steps", 2, "--dropout", 0.1]
    run(tiny_init_dir, tmp_path / "a", *args)
    run(tiny_init_dir, tmp_path / "b", *args, _stop_after_steps=5)  # no evaluation before step 6
    out = tmp_path / "b" / "out"
    assert json.loads((out / "checkpoint" / "run_config.json").read_text())["max_steps"] == 6  # saved at step 4
    with pytest.raises(ValueError, match=r"--max-steps 8 \(the run has 6\).*another --output-dir") as err:
        train_finetune.main(["--output-dir", str(out), "--resume", "--max-steps", "8"])
    assert "\n" not in str(err.value)
    with pytest.raises(FileExistsError, match=r"holds an unfinished run, and this one differs \(--lr 0.002 .*add --resume"):
        run(tiny_init_dir, tmp_path / "b", *args, "--lr", "2e-3")  # a new start would throw the checkpoint away
    run(tiny_init_dir, tmp_path / "b", *args)  # the same command again continues the killed run
    a, b = (load_file(tmp_path / d / "out" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="has finished .*--init"):
        train_finetune.main(["--output-dir", str(out), "--resume"])


def test_new_run_in_a_finished_runs_folder_leaves_none_of_its_results(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--test-file", train, "--max-steps", 2)
    assert (tmp_path / "out" / "predictions.jsonl").is_file()
    with pytest.raises(DataError, match="no such file"):  # bad input stops the new run before it touches the old one's files
        run(tiny_init_dir, tmp_path, "--train-file", tmp_path / "missing.csv", "--validation-file", train)
    assert (tmp_path / "out" / "predictions.jsonl").is_file()
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 2)  # no test file
    assert not (tmp_path / "out" / "predictions.jsonl").exists() and not (tmp_path / "out" / "test_results.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file: give a folder"):
        train_finetune.main(["--output-dir", str(tmp_path / "file")])


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--max-steps", "-1"], "--max-steps must be at least 0, got -1"),
    (["--device", "gpu"], "--device gpu is not a device torch knows"),
    (["--attn-impl", "triton", "--device", "cpu"], "--attn-impl triton: .*needs a CUDA GPU"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(tiny_init_dir, tmp_path, flags, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    with pytest.raises(ValueError, match=message) as err:
        run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, *flags)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error():
    from minibert.training import setup_distributed

    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device {device}: torch sees no CUDA GPU here .*--device cpu"):
            setup_distributed(device)


def test_one_label_only_is_an_error(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", [(POSITIVE[i % 4], "pos") for i in range(8)])
    with pytest.raises(DataError, match="one label only \\('pos'\\).*at least two"):
        run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train)


def test_predict_only_gives_the_runs_own_test_predictions(tiny_init_dir, tmp_path):
    """--predict-only with a fine-tuned model as --init labels a file with the model's own task type and
    labels: the same predictions and test metrics as the training run wrote for the same file."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(6))
    trained = run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--test-file", test,
                  "--max-steps", 4)
    unlabelled = write_csv(tmp_path / "new.csv", [(text,) for text, _ in sentiment_rows(6)], header=("text",))
    for file, out in ((test, "labelled"), (unlabelled, "unlabelled")):
        results = train_finetune.main(["--init", str(tmp_path / "out"), "--predict-only", "--test-file", str(file),
                                       "--output-dir", str(tmp_path / out), "--precision", "fp32"])
        predictions = [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
        assert [p["probabilities"] for p in predictions] == [p["probabilities"] for p in expected]
    assert results["test"] is None and not (tmp_path / "unlabelled" / "test_results.json").exists()
    scores = json.loads((tmp_path / "labelled" / "test_results.json").read_text())
    assert scores.pop("per_class") == trained["test"].pop("per_class")
    assert scores == pytest.approx(trained["test"])
    with pytest.raises(DataError, match="has no classifier head .*fine-tune it first"):
        train_finetune.main(["--init", str(tiny_init_dir), "--predict-only", "--test-file", str(test)])


def test_length_grouping_and_its_opt_out(tiny_init_dir, tmp_path):
    """Grouped batches hold examples of similar lengths; --no-group-by-length gives batches as random as a
    plain shuffle. Both see every example once an epoch."""
    import numpy as np

    from minibert.data.batching import train_batches

    lengths = np.random.default_rng(0).integers(5, 100, 800)
    spread = lambda batches: np.mean([np.ptp(lengths[b]) for b in batches])  # noqa: E731
    grouped = train_batches(lengths, 8, seed=0, epoch=0)
    plain = train_batches(lengths, 8, seed=0, epoch=0, chunk_batches=1)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) == list(range(800))
    assert spread(grouped) < 10 < 50 < spread(plain)
    # the flag reaches the batches: the same run with and without it trains on other batches, so other weights
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16))
    for name, flags in (("grouped", []), ("plain", ["--no-group-by-length"])):
        run(tiny_init_dir, tmp_path / name, "--train-file", train, "--validation-file", train, "--max-steps", 2,
            "--dropout", 0, *flags)
    grouped, plain = (load_file(tmp_path / name / "out" / "model.safetensors") for name in ("grouped", "plain"))
    assert not torch.equal(grouped["classifier.weight"], plain["classifier.weight"])


def test_max_train_examples_trains_on_a_seeded_subset(tiny_init_dir, tmp_path):
    """--max-train-examples 6 with batches of 4: one epoch is 2 steps instead of 6."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--epochs", 1,
        "--max-train-examples", 6, "--no-group-by-length")
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["steps"] == 2
    with pytest.raises(ValueError, match="--max-train-examples must be at least 0, got -1"):
        run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-train-examples", -1)


def test_early_stopping(tiny_init_dir, tmp_path):
    """With a learning rate too small to change any prediction, the metric never improves after the first
    evaluation: --early-stopping 2 stops after two more evaluations."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16))
    run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", train, "--max-steps", 10,
        "--eval-steps", 1, "--early-stopping", 2, "--lr", "1e-12")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["step"] == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, message", [
    ("missing_file", "--train-file: no such file"),
    ("missing_column", r"has no column 'review' \(columns: 'text', 'label'\)"),
    ("empty", "has no examples"),
    ("unseen_label", r"has labels the training data does not: 'meh'"),
    ("not_utf8", "not UTF-8"),
    ("too_long", "--max-length 100 exceeds the 64 positions"),
])
def test_bad_input_fails_before_training_with_one_clear_line(tiny_init_dir, tmp_path, case, message):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(4))
    extra = []
    if case == "missing_file":
        train = tmp_path / "nope.csv"
    elif case == "missing_column":
        extra = ["--text-column", "review"]
    elif case == "empty":
        dev = write_csv(tmp_path / "dev.csv", [])
    elif case == "unseen_label":
        dev = write_csv(tmp_path / "dev.csv", sentiment_rows(4) + [("so so", "meh")])
    elif case == "not_utf8":
        dev.write_bytes("text,label\ncaf\xe9 ok,pos\n".encode("latin-1"))
    elif case == "too_long":
        extra = ["--max-length", 100]
    with pytest.raises((DataError, ValueError, FileNotFoundError), match=message) as err:
        run(tiny_init_dir, tmp_path, "--train-file", train, "--validation-file", dev, "--max-steps", 1, *extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_prints_one_line_error(tiny_init_dir, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "train_finetune.py", "--init", str(tiny_init_dir), "--train-file",
                             str(tmp_path / "missing.csv"), "--validation-file", str(tmp_path / "missing.csv")],
                            capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --train-file: no such file")
