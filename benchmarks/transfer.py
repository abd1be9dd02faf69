"""Transfer learning on real data: does pretraining on raw text help a small BERT on the movie-review task?

    python benchmarks/transfer.py                        # ~35 minutes on 2 CPU cores
    python benchmarks/transfer.py --pretrain-steps 50 --finetune-epochs 1 --seeds 42 --out runs/transfer-quick.json   # a quick run of the whole pipeline
    python benchmarks/transfer.py --corpus task --out runs/transfer-task.json   # pretrain on the task's own training sentences instead
    python benchmarks/transfer.py --corpus builtin+task --out runs/transfer-mixed.json  # ... or on both, in one corpus
    python benchmarks/transfer.py --preset mini --pretrain-steps 2800 --pretrain-args= --out runs/transfer-mini.json   # the first recipe tried

1. Pretrain a BERT-Tiny (2 layers, hidden 128) from scratch on the built-in corpus (news + Shakespeare)
   with train_pretrain.py: 12,000 steps of 32 x 64 tokens, full sentences without NSP, about 15 minutes
   on a 2-core CPU. (The tiny model is the one that leaves the MLM plateau within that budget: a
   BERT-Mini gets 2,800 steps and is still on it when they end.)
2. Fine-tune it on the movie-review polarity task with train_finetune.py: 10 epochs, once per seed
   (--seeds), on all training sentences and on random subsets of --label-budgets of them.
3. Fine-tune the same architecture, with the same tokenizer, from random weights, with the same budget.
Reports the held-out MLM accuracy reached and both models' validation and test accuracies (each run and
the mean over seeds), and writes benchmarks/results/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import train_finetune
import train_pretrain
from minibert.data.tasks import movie_reviews
from minibert.model import BertForPreTraining
from minibert.pretraining_data.corpus import builtin_corpus_documents
from minibert.tokenizer import load_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser()
    # ~0.075 s a tiny step on 2 cores: ~15 minutes. Under a fixed time budget, many small steps beat few large
    # ones, and the movie-review sentences are short (27 tokens on average), so 64-token examples suffice.
    parser.add_argument("--pretrain-steps", type=int, default=12000)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)  # tiny BERTs take a high rate with warmup
    # No dropout while pretraining on a short budget (Geiping & Goldstein 2022, "Cramming"): it only slows
    # learning when the model sees each example about once. Fine-tuning puts BERT's 0.1 back.
    parser.add_argument("--pretrain-dropout", type=float, default=0.0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    # 10, not BERT's 3: at 3 epochs a pretrained tiny model has not yet caught up with one from random weights
    # (the README's transfer table has both); both models always get the same number.
    parser.add_argument("--finetune-epochs", type=int, default=10)
    # The top of the range Google tuned its small BERTs over (3e-5 to 3e-4, google-research/bert's README): a
    # pretrained tiny model barely moves at 1e-4 in 3 epochs (the README's transfer table has 1e-4, 3e-4, 1e-3).
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--seeds", default="42,1,2", help="fine-tuning seeds; accuracies differ by 1-2 points between seeds")
    parser.add_argument("--label-budgets", default="1000", help="also fine-tune on random subsets of this many labelled examples, e.g. 500,1000,2000")
    parser.add_argument("--corpus", choices=("builtin", "task", "builtin+task"), default="builtin",
                        help="builtin: news + Shakespeare; task: the movie-review training sentences, labels unused "
                             "(task-adaptive pretraining, Gururangan et al. 2020); builtin+task: both in one corpus")
    parser.add_argument("--pretrain-args", default="--no-nsp", help="more train_pretrain.py flags, e.g. --pretrain-args='--no-nsp --mask-prob 0.3' (with the =)")
    parser.add_argument("--runs", default="runs/transfer")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfer.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    runs = Path(args.runs)

    corpus = []
    if args.corpus != "builtin":
        runs.mkdir(parents=True, exist_ok=True)
        train_sentences, _, _ = movie_reviews("classification")
        # One sentence a document: the snippets are unrelated to each other.
        texts = {"task-corpus.txt": "".join(example.text + "\n\n" for example in train_sentences)}
        if args.corpus == "builtin+task":
            texts["builtin-corpus.txt"] = "".join("\n".join(doc) + "\n\n" for doc in builtin_corpus_documents())
        for name, text in texts.items():
            path = runs / name
            if not path.exists() or path.read_text(encoding="utf-8") != text:  # rewritten, it would be a new corpus
                path.write_text(text, encoding="utf-8")
        corpus = ["--data", *(str(runs / name) for name in sorted(texts))]

    start = time.perf_counter()
    pretrain_metrics = train_pretrain.main([*corpus,
        "--preset", args.preset, "--max-steps", str(args.pretrain_steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--lr", str(args.pretrain_lr), "--dropout", str(args.pretrain_dropout), "--eval-steps", str(max(1, args.pretrain_steps // 5)),
        "--save-steps", "0", "--output-dir", str(runs / "pretrained"), "--no-progress", *args.pretrain_args.split()])
    pretrain_seconds = time.perf_counter() - start

    # The baseline: the same architecture and tokenizer, never trained.
    pretrained = BertForPreTraining.from_pretrained(str(runs / "pretrained"), verbose=False)
    torch.manual_seed(0)
    BertForPreTraining(pretrained.config).save_pretrained(runs / "random", tokenizer=load_tokenizer(str(runs / "pretrained")))

    finetuned = {}  # name -> {label budget -> [one record per seed]}
    budgets = [0, *(int(n) for n in args.label_budgets.split(",") if n)]  # 0: every training example
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in ("pretrained", "random"):
        finetuned[name] = {}
        for budget in budgets:
            runs_here = finetuned[name][str(budget or "all")] = []
            for seed in seeds:
                start = time.perf_counter()
                out = runs / f"finetune-{name}" / f"labels-{budget or 'all'}-seed-{seed}"
                results = train_finetune.main([
                    "--init", str(runs / name), "--output-dir", str(out), "--epochs", str(args.finetune_epochs),
                    "--lr", str(args.finetune_lr), "--dropout", "0.1", "--seed", str(seed),
                    "--max-train-examples", str(budget), "--no-progress"])
                runs_here.append({"seed": seed, "validation_accuracy": results["eval"]["accuracy"],
                                  "test_accuracy": results["test"]["accuracy"], "seconds": time.perf_counter() - start})
                print(f"fine-tuned from {name}, {budget or 'all'} labels: {runs_here[-1]}", flush=True)

    mean = lambda records, key: sum(r[key] for r in records) / len(records)  # noqa: E731
    summary = {budget: {f"{name}_{key}": mean(finetuned[name][budget], key) for name in finetuned
                        for key in ("validation_accuracy", "test_accuracy")} for budget in finetuned["pretrained"]}
    for row in summary.values():
        row["test_accuracy_gain"] = row["pretrained_test_accuracy"] - row["random_test_accuracy"]
        row["validation_accuracy_gain"] = row["pretrained_validation_accuracy"] - row["random_validation_accuracy"]
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args),
              "pretraining": {"seconds": pretrain_seconds, **pretrain_metrics}, "finetuning": finetuned,
              "mean_over_seeds": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"MLM accuracy {pretrain_metrics['mlm_accuracy']:.1%}; fine-tuned test (validation) accuracy, mean of {len(seeds)} seeds:")
    for budget, row in summary.items():
        print(f"  {budget:>5} labels: pretrained {row['pretrained_test_accuracy']:.1%} ({row['pretrained_validation_accuracy']:.1%}), "
              f"random {row['random_test_accuracy']:.1%} ({row['random_validation_accuracy']:.1%}), gain {row['test_accuracy_gain']:+.1%}")


if __name__ == "__main__":
    main()
