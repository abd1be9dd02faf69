"""Do the word attributions point at the words people call polar? Integrated gradients on MiniLM fine-tuned on
the built-in movie-review polarity task, checked against VADER's sentiment lexicon (words rated by people,
known independently of any model).

    python benchmarks/attributions.py --model runs/minilm-polarity            # 200 clear test cases
    python benchmarks/attributions.py --model runs/minilm-polarity --quick    # 30 of them (runs/attributions-quick.json)

A clear case is a test sentence the model labels right with a probability of 0.9 or more (at the model's
calibration temperature) that holds at least one lexicon word of the predicted polarity (mean human valence
of 1.5 or more in that direction). Its strongest polar word is the one with the largest such valence. For
each clear case: the attributions of the predicted label's probability (minibert.attributions, 50 steps
raised until complete, [PAD] baseline); a hit when the word with the largest attribution is the strongest
polar word, and a looser hit when it is any polar word of that direction. Writes the counts to
benchmarks/results/attributions.json and the explained cases to explanations.html beside it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import add_run_flags, measured_on, output_path, write_result
from minibert import assets
from minibert.attributions import explain_sequence
from minibert.calibration import probabilities, temperature_from_config
from minibert.data.tasks import movie_reviews
from minibert.explanation_page import write_page
from minibert.model import BertForSequenceClassification
from minibert.tokenizer import load_tokenizer

POLAR = 1.5  # the lexicon's valence runs from -4 to 4; 1.5 and beyond is "clearly" polar
CONFIDENT = 0.9


def lexicon() -> dict[str, float]:
    valence = {}
    for line in assets.sentiment_lexicon_file().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            valence[parts[0].lower()] = float(parts[1])
    return valence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model fine-tuned on the built-in task (make finetune's run)")
    add_run_flags(parser, "attributions", quick="30 clear cases instead of 200")
    args = parser.parse_args()
    out = output_path(args, "attributions")
    limit = 30 if args.quick else 200
    torch.set_num_threads(args.threads)
    model = BertForSequenceClassification.from_pretrained(args.model, verbose=False).eval()
    tokenizer = load_tokenizer(args.model)
    tokenizer.enable_truncation(128)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    temperature = temperature_from_config(model.config.extra, labels)
    sign = {"positive": 1.0, "negative": -1.0}
    valence = lexicon()
    _, _, test = movie_reviews("classification")
    cases, records, started = [], [], time.perf_counter()
    for ex in test:
        if len(cases) >= limit:
            break
        encoding = tokenizer.encode(ex.text)
        with torch.no_grad():
            logits = model(torch.tensor([encoding.ids])).logits.float().numpy()
        probs = probabilities("classification", logits, temperature)[0]
        label = labels[int(probs.argmax())]
        if label != ex.label or probs.max() < CONFIDENT:
            continue
        spans: dict[int, tuple[int, int]] = {}  # each word's characters, from its pieces
        for (a, b), w in zip(encoding.offsets, encoding.word_ids):
            if w is not None:
                spans[w] = (spans[w][0], b) if w in spans else (a, b)
        words = [ex.text[a:b] for a, b in spans.values()]
        polar = {w.lower(): valence[w.lower()] * sign[label] for w in words if valence.get(w.lower(), 0) * sign[label] >= POLAR}
        if not polar:
            continue
        result = {"label": label, "score": float(probs.max()), "probabilities": dict(zip(labels, probs.tolist()))}
        record = explain_sequence(model, encoding, (ex.text,), "classification", labels, result,
                                  baseline_token_id=tokenizer.token_to_id("[PAD]"), temperature=temperature)
        top = max(record["attributions"], key=lambda w: w["attribution"])["word"].lower()
        strongest = max(polar, key=polar.get)
        cases.append({"text": ex.text, "label": label, "strongest_polar_word": strongest, "top_word": top,
                      "hit": top == strongest, "any_polar_hit": top in polar,
                      "complete": record["completeness"]["within_tolerance"], "steps": record["completeness"]["steps"]})
        records.append({"text": ex.text, **result, **record, "gold": ex.label})
    hits = sum(c["hit"] for c in cases)
    loose = sum(c["any_polar_hit"] for c in cases)
    result = {**measured_on(args.threads),
              "what": "clear test cases whose largest attribution is their strongest polar word (VADER lexicon)",
              "model": args.model, "temperature": temperature, "clear_cases": len(cases), "hits": hits,
              "any_polar_word_hits": loose, "complete": sum(c["complete"] for c in cases),
              "seconds": round(time.perf_counter() - started, 1), "cases": cases}
    write_result(out, result)
    page = write_page(out.with_suffix(".html"), records)
    print(f"{hits} of {len(cases)} clear cases: the largest attribution is the strongest polar word "
          f"({loose} any polar word of the label's direction; {np.mean([c['complete'] for c in cases]):.0%} complete)")
    print(f"wrote {out} and {page}")


if __name__ == "__main__":
    main()
