"""Prediction speed on the CPU: minibert.pipeline against what a user could pick instead, in one run.

    python benchmarks/bench_predict.py              # ~10 minutes on 2 cores: benchmarks/results/predict.json
    python benchmarks/bench_predict.py --quick      # about a minute: fewer sentences, runs/predict-quick.json
    python benchmarks/bench_predict.py --model runs/my-classifier

The model is the fine-tuned built-in one: MiniLM fine-tuned on the movie-review polarity task
(`python train_finetune.py --output-dir runs/minilm-polarity`, which this script runs first, ~7 minutes,
when --model holds no model; --quick fine-tunes a 60-step one instead). The data are the movie-review
test sentences (1,072) at their real lengths. One process, 2 threads (torch and ONNX Runtime alike),
batch sizes 1 and 32. Side by side:

    minibert fp32 / bf16 / int8 / auto    minibert.pipeline(model, precision=...)
    transformers fp32 / bf16              transformers.pipeline("text-classification", model, dtype=...),
                                          the texts in the order given (as a user calls it) and, at batch 32,
                                          also sorted by length by hand (the best a user can do with it)
    onnxruntime fp32 / int8               the same directory exported with torch.onnx.export (transformers'
                                          model), and ONNX Runtime's own dynamic int8 quantization of it;
                                          batches sorted by length and padded, tokenized by the same tokenizer

Each system labels the same sentences; the systems are interleaved over --repeats rounds so that noise
on a shared machine hits them alike, and the median round is reported: sentences per second, the test
accuracy of its labels, and the ratios the targets are stated in (minibert auto / the fastest other
system at batch 32; minibert fp32 / transformers fp32; at batch 1, minibert / transformers at the same
precision). The JSON records the date, the CPU model and whether it has AMX and AVX512-BF16.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import minibert
from minibert import assets
from minibert.data.batching import eval_batches, in_original_order
from minibert.data.encoding import truncating_tokenizer
from minibert.data.tasks import movie_reviews
from minibert.finetuning import checkpoint_labels
from minibert.precision import cpu_has_native_bf16

THREADS = 2


def cpu_description() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    return {"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_int8": "amx_int8" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "native_bf16_for_torch": cpu_has_native_bf16()}


def ensure_model(directory: Path, quick: bool) -> None:
    """Fine-tune the built-in task into `directory` unless it already holds a fine-tuned model."""
    if (directory / "config.json").is_file() and "architectures" in json.loads((directory / "config.json").read_text()):
        return
    import train_finetune

    print(f"no fine-tuned model in {directory}: fine-tuning the built-in task there first")
    argv = ["--output-dir", str(directory), "--no-progress"]
    if quick:
        argv += ["--max-steps", "60", "--eval-steps", "60"]
    train_finetune.main(argv)


# ----------------------------------------------------------------------------- the systems


def minibert_system(model: Path, precision: str):
    classify = minibert.pipeline(model, precision=precision, progress=False)

    def run(texts: list[str], batch_size: int) -> list[str]:
        if batch_size == 1:
            return [classify(text)["label"] for text in texts]
        return [r["label"] for r in classify(texts, batch_size=batch_size)]

    return run, classify.precision.name


def transformers_system(model: Path, dtype: torch.dtype, sort: bool):
    import transformers

    classify = transformers.pipeline("text-classification", model=str(model), dtype=dtype, device="cpu")

    def run(texts: list[str], batch_size: int) -> list[str]:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i])) if sort else list(range(len(texts)))
        labels = [None] * len(texts)
        if batch_size == 1:
            outputs = [classify(texts[i]) for i in order]
            outputs = [out[0] if isinstance(out, list) else out for out in outputs]
        else:
            outputs = classify([texts[i] for i in order], batch_size=batch_size)
        for i, out in zip(order, outputs):
            labels[i] = out["label"]
        return labels

    return run


def export_transformers_onnx(model: Path, folder: Path) -> tuple[Path, Path]:
    """transformers' classifier as ONNX (torch.onnx.export), and ONNX Runtime's dynamic int8 quantization of it."""
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "transformers.onnx", folder / "transformers.int8.onnx"
    if not fp32.is_file():
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
        ids = torch.tensor([[101, 2023, 2003, 1037, 2143, 102, 0, 0], [101, 2307, 2143, 1012, 2009, 2001, 2204, 102]])
        mask, types = (ids != 0).long(), torch.zeros_like(ids)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=hf.config.max_position_embeddings)
        torch.onnx.export(hf, (ids, mask, types), fp32, input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["logits"], dynamo=True, dynamic_shapes=({0: batch, 1: seq},) * 3,
                          external_data=False, verbose=False)
    if not int8.is_file():
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    return fp32, int8


def onnxruntime_system(onnx_file: Path, model: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    tokenizer = truncating_tokenizer(minibert.load_tokenizer(model), 128)
    labels = checkpoint_labels(minibert.BertConfig.from_json_file(model / "config.json"))

    def run(texts: list[str], batch_size: int) -> list[str]:
        encodings = tokenizer.encode_batch(texts)
        batches = eval_batches([len(e.ids) for e in encodings], batch_size)
        outputs = []
        for batch in batches:
            width = max(len(encodings[i].ids) for i in batch)
            ids, mask, types = (np.zeros((len(batch), width), dtype=np.int64) for _ in range(3))
            for row, i in enumerate(batch):
                n = len(encodings[i].ids)
                ids[row, :n], mask[row, :n], types[row, :n] = encodings[i].ids, 1, encodings[i].type_ids
            logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
            outputs.append([labels[int(k)] for k in logits.argmax(-1)])
        return in_original_order(batches, outputs)

    return run


# ----------------------------------------------------------------------------- timing


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a fine-tuned classifier directory (default runs/minilm-polarity)")
    parser.add_argument("--quick", action="store_true", help="256 sentences at batch 32, 48 at batch 1, 2 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Path(args.model or ("runs/minilm-polarity-quick" if args.quick else "runs/minilm-polarity"))
    ensure_model(model, args.quick)
    repeats = args.repeats or (2 if args.quick else 5)
    out = Path(args.out or ("runs/predict-quick.json" if args.quick else "benchmarks/results/predict.json"))

    test = movie_reviews("classification")[2]
    texts, gold = [ex.text for ex in test], [ex.label for ex in test]
    sizes = {32: len(texts), 1: 300} if not args.quick else {32: 256, 1: 48}

    systems, chosen = {}, {}
    for precision in ("fp32", "bf16", "int8", "auto"):
        systems[f"minibert {precision}"], chosen[precision] = minibert_system(model, precision)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        systems[f"transformers {name}"] = transformers_system(model, dtype, sort=False)
        systems[f"transformers {name}, sorted by hand"] = transformers_system(model, dtype, sort=True)
    # transformers' exported model, kept beside the others minibert caches (named by the weights' path and time)
    weights = next(model.glob("*.safetensors"), model / "config.json")
    key = hashlib.sha256(f"{weights.resolve()}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    onnx_folder = assets.cache_dir() / "bench-onnx" / key
    onnx_folder.mkdir(parents=True, exist_ok=True)
    fp32_onnx, int8_onnx = export_transformers_onnx(model, onnx_folder)
    systems["onnxruntime fp32"] = onnxruntime_system(fp32_onnx, model)
    systems["onnxruntime int8"] = onnxruntime_system(int8_onnx, model)
    batch1 = [name for name in systems if "sorted by hand" not in name]  # one at a time there is nothing to sort

    seconds = {(name, b): [] for name in systems for b in sizes}
    labels = {}
    for name in systems:  # warm-up: first-call costs (oneDNN kernel choice, ORT arenas) stay out of the timing
        systems[name](texts[:64], 32)
        systems[name](texts[:4], 1)
    for round_ in range(repeats):
        for batch_size, n in sizes.items():
            for name in (systems if batch_size == 32 else batch1):
                start = time.perf_counter()
                predicted = systems[name](texts[:n], batch_size)
                seconds[(name, batch_size)].append(time.perf_counter() - start)
                if batch_size == 32:
                    labels[name] = predicted
        print(f"round {round_ + 1}/{repeats} done")

    results = {}
    for name in systems:
        agree = np.mean([p == g for p, g in zip(labels[name], gold)])
        results[name] = {"accuracy": round(float(agree), 4), "sentences": sizes[32]}
        for batch_size, n in sizes.items():
            if (name, batch_size) in seconds and seconds[(name, batch_size)]:
                results[name][f"batch {batch_size}"] = round(n / statistics.median(seconds[(name, batch_size)]), 1)
    fp32_labels = labels["minibert fp32"]
    for name in systems:
        results[name]["agrees with minibert fp32"] = round(float(np.mean([a == b for a, b in zip(labels[name], fp32_labels)])), 4)

    def speed(name, batch_size):
        return results[name][f"batch {batch_size}"]

    others = [n for n in systems if not n.startswith("minibert")]
    fastest = max(others, key=lambda n: speed(n, 32))
    ratios = {
        f"minibert auto / fastest other at batch 32 ({fastest}); target >= 1.3": speed("minibert auto", 32) / speed(fastest, 32),
        "minibert fp32 / transformers fp32 at batch 32; target >= 1.5": speed("minibert fp32", 32) / speed("transformers fp32", 32),
        "minibert fp32 / transformers fp32 at batch 1; target >= 1": speed("minibert fp32", 1) / speed("transformers fp32", 1),
        "minibert bf16 / transformers bf16 at batch 1; target >= 1": speed("minibert bf16", 1) / speed("transformers bf16", 1),
        "minibert int8 / onnxruntime int8 at batch 32": speed("minibert int8", 32) / speed("onnxruntime int8", 32),
        "minibert int8 / minibert fp32 at batch 32": speed("minibert int8", 32) / speed("minibert fp32", 32),
        "minibert auto accuracy - minibert fp32 accuracy (points); target within 0.5":
            100 * (results["minibert auto"]["accuracy"] - results["minibert fp32"]["accuracy"]),
    }
    report = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_description(), "threads": THREADS, "processes": 1,
        "torch": torch.__version__, "model": str(model), "auto chose": chosen["auto"], "repeats": repeats,
        "quick": args.quick, "sentences per second and accuracy": results,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(map(len, systems))
    print(f"\n{'system':<{width}}  batch 32/s  batch 1/s  accuracy  agrees w/ fp32")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['batch 32']:>10.1f}  {r.get('batch 1', float('nan')):>9.1f}  {r['accuracy']:>8.4f}"
              f"  {r['agrees with minibert fp32']:>13.4f}")
    for k, v in report["ratios"].items():
        print(f"{v:7.3f}  {k}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
