"""Transfer learning on real data: does pretraining on raw text help a small BERT on the movie-review task?

    python benchmarks/transfer.py                        # ~20 minutes on 2 CPU cores
    python benchmarks/transfer.py --pretrain-steps 50 --finetune-epochs 1   # a quick run of the whole pipeline
    python benchmarks/transfer.py --preset mini --pretrain-steps 2800 --pretrain-args=   # the first recipe tried

1. Pretrain a BERT-Tiny (2 layers, hidden 128) from scratch on the built-in corpus (news + Shakespeare)
   with train_pretrain.py: 12,000 steps of 32 x 64 tokens, full sentences without NSP, about 15 minutes
   on a 2-core CPU. (The tiny model is the one that leaves the MLM plateau within that budget: a
   BERT-Mini gets 2,800 steps and is still on it when they end.)
2. Fine-tune it on the movie-review polarity task with train_finetune.py.
3. Fine-tune the same architecture, with the same tokenizer, from random weights, with the same budget.
Reports the held-out MLM accuracy reached and both fine-tuned validation and test accuracies, and writes
benchmarks/results/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import train_finetune
import train_pretrain
from minibert.model import BertForPreTraining
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
    parser.add_argument("--finetune-epochs", type=int, default=3)
    # The top of the range Google tuned its small BERTs over (3e-5 to 3e-4, google-research/bert's README): a
    # pretrained tiny model barely moves at 1e-4 in 3 epochs (the README's transfer table has 1e-4, 3e-4, 1e-3).
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--pretrain-args", default="--no-nsp", help="more train_pretrain.py flags, e.g. --pretrain-args='--no-nsp --mask-prob 0.3' (with the =)")
    parser.add_argument("--runs", default="runs/transfer")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfer.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    runs = Path(args.runs)

    start = time.perf_counter()
    pretrain_metrics = train_pretrain.main([
        "--preset", args.preset, "--max-steps", str(args.pretrain_steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--lr", str(args.pretrain_lr), "--dropout", str(args.pretrain_dropout), "--eval-steps", str(max(1, args.pretrain_steps // 5)),
        "--save-steps", "0", "--output-dir", str(runs / "pretrained"), "--no-progress", *args.pretrain_args.split()])
    pretrain_seconds = time.perf_counter() - start

    # The baseline: the same architecture and tokenizer, never trained.
    pretrained = BertForPreTraining.from_pretrained(str(runs / "pretrained"), verbose=False)
    torch.manual_seed(0)
    BertForPreTraining(pretrained.config).save_pretrained(runs / "random", tokenizer=load_tokenizer(str(runs / "pretrained")))

    finetuned = {}
    for name in ("pretrained", "random"):
        start = time.perf_counter()
        results = train_finetune.main([
            "--init", str(runs / name), "--output-dir", str(runs / f"finetune-{name}"), "--epochs",
            str(args.finetune_epochs), "--lr", str(args.finetune_lr), "--dropout", "0.1", "--no-progress"])
        finetuned[name] = {"validation_accuracy": results["eval"]["accuracy"], "test_accuracy": results["test"]["accuracy"],
                           "seconds": time.perf_counter() - start}
        print(f"fine-tuned from {name}: {finetuned[name]}", flush=True)

    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args),
              "pretraining": {"seconds": pretrain_seconds, **pretrain_metrics}, "finetuning": finetuned,
              "test_accuracy_gain": finetuned["pretrained"]["test_accuracy"] - finetuned["random"]["test_accuracy"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
