"""CPU speed: minibert against transformers' BertModel (eager and sdpa), side by side in one run.

    python benchmarks/bench_cpu.py                      # bert-base and MiniLM sizes, ~5 minutes on 2 cores
    python benchmarks/bench_cpu.py --sizes minilm --repeats 3 --out runs/cpu-quick.json   # a quick look

Three batches: (a) fully padded, 8 sequences of 128 tokens; (b) and (c) variable length, 8 and 32
sequences (32 is train_finetune.py's batch size) whose lengths are drawn (fixed seed) from the real
tokenized lengths of the movie-review sentences, padded to the longest. Unpadding saves the padded share
of the dense work, so the variable-length gain grows with the padding: the table prints that share.
For each: forward (no grad) and forward+backward, the median of --repeats timed runs after warm-up,
the frameworks interleaved so that machine noise hits them alike. Prints a table of seconds and
minibert/transformers ratios (< 1 means minibert is faster) and writes benchmarks/results/cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import minibert
from minibert.assets import minilm_dir, movie_reviews_file

SIZES = {
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
}


def movie_review_lengths() -> np.ndarray:
    tok = minibert.load_tokenizer(str(minilm_dir()))
    texts = [line.split("\t", 2)[2] for line in movie_reviews_file().read_text(encoding="utf-8").splitlines() if line]
    return np.array([min(128, len(e.ids)) for e in tok.encode_batch(texts)])


def make_batch(lengths, vocab_size=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(1000, vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids[mask == 0] = 0
    return ids, mask


def build_models(size: str):
    sizes = SIZES[size]
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", "sdpa"):
        hf_cfg = transformers.BertConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         attn_implementation=impl)
        models[f"transformers-{impl}"] = transformers.BertModel(hf_cfg)
        assert models[f"transformers-{impl}"].config._attn_implementation == impl
    mb = minibert.BertModel(minibert.BertConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                attn_impl="sdpa", unpad=True))
    models["minibert"] = mb
    return models


def run_once(model, ids, mask, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        model.train()
        out = model(input_ids=ids, attention_mask=mask)
        (out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    lengths = movie_review_lengths()
    batches = {"padded 8x128": [128] * 8,
               "variable 8": sorted(rng.choice(lengths, 8).tolist(), reverse=True),
               "variable 32": sorted(rng.choice(lengths, 32).tolist(), reverse=True)}
    rows = []
    for size in args.sizes:
        models = build_models(size)
        for batch_name, batch_lengths in batches.items():
            ids, mask = make_batch(batch_lengths)
            for backward in (False, True):
                times = {name: [] for name in models}
                for name, model in models.items():  # warm-up
                    run_once(model, ids, mask, backward)
                for _ in range(args.repeats):
                    for name, model in models.items():
                        times[name].append(run_once(model, ids, mask, backward))
                med = {name: statistics.median(ts) for name, ts in times.items()}
                padding = 1 - sum(batch_lengths) / (len(batch_lengths) * max(batch_lengths))
                row = {"size": size, "batch": batch_name, "lengths": batch_lengths, "padding_share": padding,
                       "pass": "forward+backward" if backward else "forward", "seconds": med,
                       "ratio_vs_eager": med["minibert"] / med["transformers-eager"],
                       "ratio_vs_sdpa": med["minibert"] / med["transformers-sdpa"]}
                rows.append(row)
                print(f"{size:9s} {batch_name:12s} pad {padding:4.0%} {row['pass']:16s} minibert {med['minibert']:.3f}s  "
                      f"hf-eager {med['transformers-eager']:.3f}s  hf-sdpa {med['transformers-sdpa']:.3f}s  "
                      f"ratio vs sdpa {row['ratio_vs_sdpa']:.2f}  vs eager {row['ratio_vs_eager']:.2f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {args.threads} threads", "torch": torch.__version__,
              "transformers": transformers.__version__, "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
