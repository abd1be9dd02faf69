"""Pretraining speed on the built-in corpus: tokens/s of train_pretrain.py in its default precision (auto)
against fp32, for BERT-Tiny and BERT-Mini.

    python benchmarks/bench_pretrain.py                  # tiny and mini, 300 steps, 3 runs each: ~25 minutes on 2 cores
    python benchmarks/bench_pretrain.py --quick          # tiny, 40 steps, 1 run each: about a minute

auto is fp32 on a CPU while minibert.training.CPU_AUTO_BF16 is off (bf16 training has not been shown to keep
fp32's accuracy), and then the two runs are the same setting and the ratio measures the noise; with it on,
auto is bf16 autocast where the CPU multiplies bf16 natively (AMX or AVX512-BF16). Runs alternate
(fp32, auto, fp32, auto, ...) so that machine noise hits both alike; each run's figure is real (unpadded)
tokens per second over its training steps, evaluation and saving left out (--eval-steps 0, --save-steps 0;
the held-out evaluation at the last step is outside the timed steps). The corpus is tokenized once into
the cache before the first run. Writes benchmarks/results/pretrain.json (--quick: runs/pretrain-quick.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from _common import add_run_flags, measured_on, output_path, write_result
import train_pretrain

PRESET_FLAGS = {"tiny": ["--preset", "tiny"], "mini": ["--preset", "mini", "--seq-len", "64", "--batch-size", "32"]}


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def run(preset: str, precision: str, steps: int, output_dir: str) -> dict:
    argv = [*PRESET_FLAGS[preset], "--max-steps", str(steps), "--precision", precision, "--eval-steps", "0",
            "--eval-batches", "1", "--save-steps", "0", "--output-dir", output_dir, "--no-progress"]
    train_pretrain.main(argv)
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    resolved = json.loads((Path(output_dir) / "pretrain_config.json").read_text())["resolved"]["precision"]
    # tokens_per_s is cumulative from the first step: the last row is the run's mean
    return {"precision": resolved, "tokens_per_s": train[-1]["tokens_per_s"], "final_loss": train[-1]["loss"]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny", "mini"], choices=list(PRESET_FLAGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3, help="runs of each precision, alternating")
    add_run_flags(parser, "pretrain", quick="tiny, 40 steps, one run of each")
    parser.add_argument("--output-dir", default="runs/bench-pretrain")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.steps, args.runs = ["tiny"], 40, 1
    out = output_path(args, "pretrain")
    torch.set_num_threads(args.threads)
    result = {**measured_on(args.threads), "cpu_native_bf16": cpu_has_native_bf16(), "steps": args.steps, "presets": {}}
    for preset in args.presets:
        runs = {"fp32": [], "auto": []}
        for i in range(args.runs):
            for precision in runs:
                runs[precision].append(run(preset, precision, args.steps, f"{args.output_dir}/{preset}-{precision}"))
                print(f"{preset} {precision} run {i + 1}: {json.dumps(runs[precision][-1])}", flush=True)
        fp32 = statistics.median(r["tokens_per_s"] for r in runs["fp32"])
        auto = statistics.median(r["tokens_per_s"] for r in runs["auto"])
        result["presets"][preset] = {"runs": runs, "auto_is": runs["auto"][0]["precision"], "fp32_tokens_per_s": fp32,
                                     "auto_tokens_per_s": auto, "auto_over_fp32": auto / fp32}
        print(f"{preset}: auto ({runs['auto'][0]['precision']}) {auto:.0f} tokens/s, fp32 {fp32:.0f} tokens/s: "
              f"{auto / fp32:.2f}x", flush=True)
        write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
