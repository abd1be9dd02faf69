"""Seed robustness: one fine-tuning per random seed on the same data, the spread of their results, the best kept.

Fine-tuning results move by a point or more from one random seed to the next: the seed picks the new
head's weights, the order of the batches and the dropout masks (Dodge et al. 2020, "Fine-Tuning Pretrained
Language Models: Weight Initializations, Data Orders, and Early Stopping"; Mosbach et al. 2021). One run
says little; several say how far to trust a difference. For small, unstable tasks Devlin et al. (2019)
fine-tuned several times and kept the run that did best on the validation set: that is the model kept here.

    seeds = parse_seeds("42,1,2")
    summary = run_seeds(seeds, lambda seed, run_dir: finetune(seed=seed, output_dir=run_dir), "runs/x")

Each seed's run has a folder of its own, DIR/seeds/seed-N/, with everything a single run writes. The best
one's files (model, tokenizer, results, predictions) are copied into DIR itself, so DIR reads like a single
run's folder; DIR/seeds_results.json holds every run's results, and their mean and standard deviation
(over the seeds, with n - 1: a sample of the runs one could have had), metric by metric, split by split.
The runs go one after another, under torchrun too (every rank runs the same seed at the same time).

A stopped --seeds run continues as a single run does (minibert.runs): the same command again, or --resume
alone, under the settings it was started with (DIR/seeds/run_config.json, kept until the run finishes; a
changed one is an error). Each seed whose run had finished is skipped, its results read back from
DIR/seeds/seed-N.json (written as it finished); the seed that was stopped continues from its checkpoint;
the rest run as usual.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path

import numpy as np

from minibert.atomic_write import write_json
from minibert.metrics import greater_is_better

logger = logging.getLogger("minibert")

SEEDS_DIR = "seeds"  # DIR/seeds/seed-N/: the run of seed N
RESULTS_FILE = "seeds_results.json"
SPLITS = ("eval", "test")  # the result blocks a run returns and seeds_results.json summarises
RUN_CONFIG = "run_config.json"  # DIR/seeds/run_config.json: an unfinished --seeds run's settings


def parse_seeds(text: str) -> list[int]:
    """"42,1,2" -> [42, 1, 2]; at least two different integers (one seed is --seed)."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--seeds {text}: give integers separated by commas, e.g. --seeds 42,1,2") from None
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"--seeds {text} repeats {', '.join(map(str, repeated))}: a seed run twice gives the same "
                         "run twice; give each seed once")
    if len(seeds) < 2:
        raise ValueError(f"--seeds {text} is one seed: give two or more to compare (one run is --seed {seeds[0]})")
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds {text}: seeds are non-negative integers")
    return seeds


def run_dir(output_dir: str | Path, seed: int) -> Path:
    return Path(output_dir) / SEEDS_DIR / f"seed-{seed}"


def finished_file(output_dir: str | Path, seed: int) -> Path:
    """DIR/seeds/seed-N.json: what the run of seed N returned, written once it finished."""
    return Path(output_dir) / SEEDS_DIR / f"seed-{seed}.json"


def find_unfinished_run(output_dir: str | Path) -> Path | None:
    """DIR/seeds while the --seeds run in DIR is unfinished (it holds the settings the run was started with,
    run_config.json, which minibert.runs.resolve_resume compares and restores as a checkpoint's), else None."""
    folder = Path(output_dir) / SEEDS_DIR
    return folder if (folder / RUN_CONFIG).is_file() else None


def start_run(output_dir: str | Path, run_config: dict) -> None:
    """A new --seeds run in output_dir (on the main process): keep its settings until it finishes, and forget
    the seeds an earlier run there finished, which are not this run's."""
    folder = Path(output_dir) / SEEDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("seed-*.json"):
        path.unlink()
    write_json(folder / RUN_CONFIG, run_config)


def finished_runs(output_dir: str | Path, seeds: Sequence[int]) -> dict[int, dict]:
    """{seed: its results} of the seeds whose runs finished in an earlier start of this run, their folders whole."""
    return {seed: json.loads(finished_file(output_dir, seed).read_text(encoding="utf-8")) for seed in seeds
            if finished_file(output_dir, seed).is_file() and (run_dir(output_dir, seed) / "model.safetensors").is_file()}


def _aggregate(values: list, statistic: Callable[[np.ndarray], float]):
    """The statistic of each number found at the same place in every one of the values (nested dicts of
    metrics, as eval_results.json holds them); what is not a number in all of them is left out (None)."""
    if all(isinstance(v, dict) for v in values):
        out = {key: _aggregate([v[key] for v in values], statistic) for key in values[0] if all(key in v for v in values)}
        out = {key: value for key, value in out.items() if value is not None}
        return out or None
    if all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        return float(statistic(np.asarray(values, dtype=np.float64)))
    return None


def summarise(results: dict[int, dict]) -> dict:
    """{"mean": {split: metrics}, "std": {split: metrics}} over the runs' results ({seed: {"eval": ..., "test": ...}})."""
    runs = list(results.values())
    summary = {"mean": {}, "std": {}}
    for split in SPLITS:
        blocks = [run.get(split) for run in runs]
        if any(block is None for block in blocks):
            continue
        summary["mean"][split] = _aggregate(blocks, np.mean)
        summary["std"][split] = _aggregate(blocks, lambda x: np.std(x, ddof=1))
    return summary


def best_seed(results: dict[int, dict], metric: str) -> int:
    """The seed whose run did best on the validation set by metric (the first of equals, in the given order)."""
    def value(seed: int) -> float:
        found = (results[seed].get("eval") or {}).get(metric)
        if found is None or not math.isfinite(found):
            return -math.inf
        return found if greater_is_better(metric) else -found

    return max(results, key=value)


def keep_run(source: Path, output_dir: Path) -> None:
    """Copy a finished run's files (not its folders, nor hidden ones such as the run lock) into output_dir."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            tmp = output_dir / f".{path.name}.tmp"
            shutil.copyfile(path, tmp)
            tmp.replace(output_dir / path.name)


def run_seeds(seeds: Sequence[int], run_one: Callable[[int, Path], dict], output_dir: str | Path, *,
              resume: bool = False, is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> dict:
    """Run run_one(seed, run_dir(output_dir, seed)) for each seed, one after another; on the main process,
    write seeds_results.json and copy the best run into output_dir. run_one returns the run's results:
    {"eval": validation metrics, "test": test metrics or None, "main_metric": the metric that picks the best}.
    resume: the run continues an earlier, stopped start of it (the caller has checked that it has the same
    settings): the seeds that finished then are not run again."""
    output_dir = Path(output_dir)
    finished = finished_runs(output_dir, seeds) if resume else {}
    results = {}
    for i, seed in enumerate(seeds):
        if seed in finished:
            logger.info("minibert: seed %d (%d of %d) finished before, in %s: its results are kept", seed, i + 1,
                        len(seeds), run_dir(output_dir, seed))
            results[seed] = finished[seed]
            continue
        logger.info("minibert: seed %d (%d of %d), in %s", seed, i + 1, len(seeds), run_dir(output_dir, seed))
        results[seed] = run_one(seed, run_dir(output_dir, seed))
        if is_main:
            write_json(finished_file(output_dir, seed), {key: results[seed].get(key) for key in (*SPLITS, "main_metric")})
    metric = results[seeds[0]]["main_metric"]
    best = best_seed(results, metric)
    summary = {"seeds": list(seeds), "metric": metric, "best_seed": best,
               **summarise(results), "runs": {str(seed): {split: r.get(split) for split in SPLITS} for seed, r in results.items()}}
    if is_main:
        keep_run(run_dir(output_dir, best), output_dir)
        write_json(output_dir / RESULTS_FILE, summary)
        # Finished: a rerun is a new run. The settings go first: without them the records below count for nothing.
        (output_dir / SEEDS_DIR / RUN_CONFIG).unlink(missing_ok=True)
        for seed in seeds:
            finished_file(output_dir, seed).unlink(missing_ok=True)
        mean, std = summary["mean"].get("eval", {}), summary["std"].get("eval", {})
        logger.info("minibert: %d seeds, validation %s %.4f +- %.4f (mean +- std); best seed %d (%s %.4f), kept in %s",
                    len(seeds), metric, mean.get(metric, math.nan), std.get(metric, math.nan), best, metric,
                    results[best]["eval"][metric], output_dir)
    barrier()
    return summary
