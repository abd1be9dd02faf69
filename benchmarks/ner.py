"""Entity F1 on NER data built from the shipped Shakespeare plays (benchmarks/shakespeare_ner.py): the same data as
CoNLL and as span JSONL (the two must agree), and decoding by per-word argmax, under the BIO constraints
(the default), and with a CRF (--crf), fine-tuned from the pretrained MiniLM.

    python benchmarks/ner.py            # 6,000 training sentences, 2 epochs, ~30 minutes on 2 CPU cores
    python benchmarks/ner.py --quick    # 1,500 sentences, 2 epochs, a few minutes (writes runs/ner-quick.json)

Runs: (1) train on the CoNLL files; (2) train on the span JSONL, same seed: its test F1 must equal (1), and its
predictions.jsonl (spans with character offsets) scored against the gold spans gives the same F1 again;
(3) the model of (2) labels the test file again with --no-constrained-decoding (argmax); (4) train with --crf,
and (5) its model without the constraints. Writes benchmarks/results/ner.json with entity precision, recall
and F1 (seqeval, exact match), and the share of argmax predictions that are not valid BIO.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shakespeare_ner beside this file
from _common import add_run_flags, measured_on, output_path, write_result  # noqa: E402
import shakespeare_ner  # noqa: E402

import train_finetune  # noqa: E402
from minibert.assets import minilm_dir  # noqa: E402
from minibert.spans import read_record, spans_to_tags, word_offsets  # noqa: E402
from minibert.tagging import allowed_transitions  # noqa: E402
from minibert.tokenizer import load_tokenizer  # noqa: E402


def to_conll(jsonl: Path, conll: Path, tokenizer) -> None:
    """The span file as CoNLL: the tokenizer's words, one per line, with their BIO tags."""
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    texts = [r["text"] for r in records]
    lines = []
    for record, offsets in zip(records, word_offsets(tokenizer, texts)):
        text, spans = read_record(record, "minibert", str(jsonl))
        tags, misaligned = spans_to_tags(text, spans, offsets, "bio")
        assert not misaligned
        lines += [f"{text[s:e]} {tag}" for (s, e), tag in zip(offsets, tags)] + [""]
    conll.write_text("\n".join(lines) + "\n", encoding="utf-8")


def span_f1(predictions: Path, gold: Path) -> float:
    """Exact-match F1 of predicted character spans (predictions.jsonl) against the gold spans."""
    predicted = [{(s["start"], s["end"], s["label"]) for s in json.loads(line)["spans"]}
                 for line in predictions.read_text(encoding="utf-8").splitlines()]
    reference = [{(s["start"], s["end"], s["label"]) for s in json.loads(line)["spans"]}
                 for line in gold.read_text(encoding="utf-8").splitlines()]
    tp = sum(len(p & r) for p, r in zip(predicted, reference, strict=True))
    found, wanted = sum(map(len, predicted)), sum(map(len, reference))
    return 2 * tp / (found + wanted) if found + wanted else 0.0


def invalid_share(predictions: Path) -> float:
    """The share of sentences whose predicted word tags break the BIO rules (from --no-constrained-decoding output)."""
    bad = total = 0
    for line in predictions.read_text(encoding="utf-8").splitlines():
        tags = [t for t in json.loads(line)["tags"] if t is not None]
        labels = sorted(set(tags) | {"O"})
        start, transitions, _ = allowed_transitions(labels, "bio")
        ids = [labels.index(t) for t in tags]
        total += 1
        bad += bool(ids) and not (start[ids[0]] and all(transitions[a, b] for a, b in zip(ids, ids[1:])))
    return bad / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_flags(parser, "ner", quick="1,500 training sentences instead of 6,000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = output_path(args, "ner")
    torch.set_num_threads(args.threads)
    data = Path("runs/ner-data-quick" if args.quick else "runs/ner-data")
    # (600 sentences for one epoch, 19 steps, leave MiniLM predicting O everywhere: F1 0 for every decoder)
    counts = shakespeare_ner.build(data, max_train=1500 if args.quick else 6000, seed=args.seed)
    tokenizer = load_tokenizer(minilm_dir())
    for split in ("train", "validation", "test"):
        to_conll(data / f"{split}.jsonl", data / f"{split}.conll", tokenizer)
    common = ["--seed", str(args.seed), "--no-progress", "--epochs", "2",
              "--task-type", "token-classification"]

    def train(name: str, suffix: str, *extra: str) -> dict:
        started = time.perf_counter()
        results = train_finetune.main(["--train-file", str(data / f"train.{suffix}"),
                                       "--validation-file", str(data / f"validation.{suffix}"),
                                       "--test-file", str(data / f"test.{suffix}"), "--output-dir", f"runs/ner/{name}",
                                       *common, *extra])
        test = json.loads((Path(results["output_dir"]) / "test_results.json").read_text())
        return {**test, "seconds": round(time.perf_counter() - started, 1)}

    def relabel(name: str, model: str, suffix: str, *extra: str) -> dict:
        results = train_finetune.main(["--init", f"runs/ner/{model}", "--predict-only", "--test-file",
                                       str(data / f"test.{suffix}"), "--output-dir", f"runs/ner/{name}",
                                       "--precision", "fp32", *extra])  # as the training runs evaluate
        return json.loads((Path(results["output_dir"]) / "test_results.json").read_text())

    runs = {"conll": train("conll", "conll"), "spans": train("spans", "jsonl")}
    runs["spans"]["span_f1_from_predictions"] = span_f1(Path("runs/ner/spans/predictions.jsonl"), data / "test.jsonl")
    runs["argmax"] = relabel("argmax", "conll", "conll", "--no-constrained-decoding")
    runs["argmax"]["invalid_sentences"] = invalid_share(Path("runs/ner/argmax/predictions.jsonl"))
    runs["crf"] = train("crf", "conll", "--crf")
    runs["crf_argmax"] = relabel("crf-unconstrained", "crf", "conll", "--no-constrained-decoding")
    for name, scores in runs.items():
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items() if k != "per_class"})
    result = {**measured_on(args.threads), "data": "Shakespeare NER (benchmarks/shakespeare_ner.py), PER and LOC, BIO", "sentences": counts,
              "quick": args.quick, "seed": args.seed, "runs": runs,
              "conll_equals_spans": abs(runs["conll"]["f1"] - runs["spans"]["f1"]) < 1e-9
                                    and abs(runs["spans"]["f1"] - runs["spans"]["span_f1_from_predictions"]) < 1e-9}
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
