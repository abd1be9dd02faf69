"""What the benchmarks share: the flags that size a run, and the record of where its figures were measured.

    parser = argparse.ArgumentParser()
    add_run_flags(parser, "cpu", quick="MiniLM, 3 repeats")   # --threads, --quick, --out
    args = parser.parse_args(argv)
    out = output_path(args, "cpu")            # --out, else benchmarks/results/cpu.json (--quick: runs/cpu-quick.json)
    torch.set_num_threads(args.threads)
    result = {**measured_on(args.threads), "rows": rows}      # the date, the machine and torch first
    write_result(out, result)

A figure means little without the machine, the threads and the torch that made it, so every result JSON
starts with them. A --quick run writes under runs/, never over the published results in results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
THREADS = 2  # the results in results/ were measured on 2-core machines, one torch thread per core


def add_run_flags(parser: argparse.ArgumentParser, name: str, *, quick: str, quick_out: str | None = None) -> None:
    """--threads, --quick (`quick` says what it cuts) and --out, whose default is output_path's."""
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=None, help=f"default benchmarks/results/{name}.json "
                                                    f"(--quick: {quick_out or f'runs/{name}-quick.json'})")


def output_path(args: argparse.Namespace, name: str, quick_out: str | None = None) -> Path:
    """--out, else benchmarks/results/NAME.json, or with --quick runs/NAME-quick.json (quick_out if given)."""
    if args.out:
        return Path(args.out)
    return Path(quick_out or f"runs/{name}-quick.json") if args.quick else RESULTS / f"{name}.json"


def measured_on(threads: int) -> dict:
    """The head of every result: the date, the machine with its cores and torch's threads, and torch's version."""
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads",
            "torch": torch.__version__}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
