"""CPU speed: minibert against transformers' BertModel (eager and sdpa), side by side in one run, in fp32 and
in bf16 autocast.

    python benchmarks/bench_cpu.py                      # bert-base and MiniLM sizes, fp32 and bf16: ~10 minutes on 2 cores
    python benchmarks/bench_cpu.py --quick              # MiniLM, batch 32 of real lengths, 3 repeats: about a minute

Three batches: (a) fully padded, 8 sequences of 128 tokens; (b) and (c) variable length, 8 and 32
sequences (32 is train_finetune.py's batch size) whose lengths are drawn (fixed seed) from the real
tokenized lengths of the movie-review sentences, padded to the longest. Unpadding saves the padded share
of the dense work, so the variable-length gain grows with the padding: the table prints that share.
For each: forward (no grad) and forward+backward, the median of --repeats timed runs after warm-up,
the frameworks interleaved so that machine noise hits them alike. bf16 is torch.autocast(bfloat16)
around the forward pass for every framework alike (what transformers' Trainer does with bf16=True).
It runs by default only where the CPU multiplies bf16 natively (AMX or AVX512-BF16): elsewhere torch
emulates it, 5-12x slower than fp32, and --precisions fp32 bf16 asks for it anyway.
Prints a table of seconds and minibert/transformers ratios (< 1 means minibert is faster) and writes
benchmarks/results/cpu.json (--quick: runs/cpu-quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch
import transformers

from _common import add_run_flags, measured_on, output_path, write_result
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


def run_once(model, ids, mask, backward: bool, precision: str) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    start = time.perf_counter()
    if backward:
        model.train()
        with autocast:
            out = model(input_ids=ids, attention_mask=mask)
        (out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad(), autocast:
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", default=["padded 8x128", "variable 8", "variable 32"],
                        choices=["padded 8x128", "variable 8", "variable 32"])
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="default: fp32, and bf16 where the CPU has native bf16")
    parser.add_argument("--repeats", type=int, default=5)
    add_run_flags(parser, "cpu", quick="MiniLM, the batch of 32 real lengths, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats = ["minilm"], ["variable 32"], 3
    native = cpu_has_native_bf16()
    precisions = args.precisions or (["fp32", "bf16"] if native else ["fp32"])
    if "bf16" not in precisions and not native:
        print("bf16 left out: this CPU has neither AMX nor AVX512-BF16, so torch emulates bf16, 5-12x slower than fp32 "
              "(--precisions fp32 bf16 runs it anyway)")
    out = output_path(args, "cpu")
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    lengths = movie_review_lengths()
    all_batches = {"padded 8x128": [128] * 8,
                   "variable 8": sorted(rng.choice(lengths, 8).tolist(), reverse=True),
                   "variable 32": sorted(rng.choice(lengths, 32).tolist(), reverse=True)}
    batches = {name: all_batches[name] for name in args.batches}
    rows = []
    for size in args.sizes:
        models = build_models(size)
        for batch_name, batch_lengths in batches.items():
            ids, mask = make_batch(batch_lengths)
            for backward in (False, True):
                times = {(name, p): [] for p in precisions for name in models}
                for (name, precision) in times:  # warm-up
                    run_once(models[name], ids, mask, backward, precision)
                for _ in range(args.repeats):
                    for (name, precision) in times:
                        times[name, precision].append(run_once(models[name], ids, mask, backward, precision))
                padding = 1 - sum(batch_lengths) / (len(batch_lengths) * max(batch_lengths))
                for precision in precisions:
                    med = {name: statistics.median(times[name, precision]) for name in models}
                    row = {"size": size, "batch": batch_name, "lengths": batch_lengths, "padding_share": padding,
                           "pass": "forward+backward" if backward else "forward", "precision": precision, "seconds": med,
                           "ratio_vs_eager": med["minibert"] / med["transformers-eager"],
                           "ratio_vs_sdpa": med["minibert"] / med["transformers-sdpa"]}
                    if precision == "bf16":
                        fp32 = {name: statistics.median(times[name, "fp32"]) for name in models} if "fp32" in precisions else None
                        row["bf16_speedup_over_fp32"] = {n: fp32[n] / med[n] for n in models} if fp32 else None
                    rows.append(row)
                    print(f"{size:9s} {batch_name:12s} pad {padding:4.0%} {row['pass']:16s} {precision} minibert "
                          f"{med['minibert']:.3f}s  hf-eager {med['transformers-eager']:.3f}s  hf-sdpa "
                          f"{med['transformers-sdpa']:.3f}s  ratio vs sdpa {row['ratio_vs_sdpa']:.2f}  vs eager "
                          f"{row['ratio_vs_eager']:.2f}", flush=True)
    for row in rows:  # the target: MiniLM forward+backward on 32 real lengths, bf16, >= 1.6x transformers
        if (row["size"], row["batch"], row["pass"], row["precision"]) == ("minilm", "variable 32", "forward+backward", "bf16"):
            print(f"target: MiniLM forward+backward, 32 real lengths, bf16: minibert {1 / row['ratio_vs_sdpa']:.2f}x "
                  "transformers-sdpa (target >= 1.6x)")
    result = {**measured_on(args.threads), "cpu_native_bf16": native, "transformers": transformers.__version__,
              "repeats": args.repeats, "rows": rows}
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
