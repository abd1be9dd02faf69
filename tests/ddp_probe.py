"""Run train_finetune.py or train_pretrain.py with probes, for tests/test_distributed.py (under torchrun):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py \
        finetune|pretrain RECORD_DIR STOP_AFTER HOLD_FILE -- SCRIPT_ARGS...

Each rank appends to RECORD_DIR/rank{R}.jsonl one line per training forward pass: its own loss (before
DDP averages it) and the dropout mask of its embeddings, the first dropout of the model. Its first line
gives its pid, written once the run holds its output folder and has built its trainer; with a HOLD_FILE
(not "-") the run then waits until that file exists, so a test can start a second run in its folder
while it is certainly alive. STOP_AFTER > 0 stops the run after that many steps, as a kill would.
"""

import json
import os
import sys
import time
from pathlib import Path

from minibert import cli, training


def main() -> None:
    script, record_dir, stop_after, hold_file, separator, *argv = sys.argv[1:]
    assert separator == "--", sys.argv
    record = Path(record_dir) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    record.parent.mkdir(parents=True, exist_ok=True)

    def write(line: dict) -> None:
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    build_trainer = training.Trainer.__init__

    def probed_trainer(self, model, *args, **kwargs):
        build_trainer(self, model, *args, **kwargs)
        seen = {}

        def on_dropout(module, inputs, output):
            if module.training:
                seen["mask"] = "".join("1" if kept else "0" for kept in (output != 0).flatten().tolist())
                seen["shape"] = list(output.shape)

        def on_forward(module, inputs, output):
            if module.training:
                write({"loss": output.loss.item(), **seen})

        model.bert.embeddings.dropout.register_forward_hook(on_dropout)
        model.register_forward_hook(on_forward)
        write({"pid": os.getpid()})
        while hold_file != "-" and not Path(hold_file).exists():
            time.sleep(0.05)

    training.Trainer.__init__ = probed_trainer
    script_module = __import__(f"train_{script}")
    script_module.main(argv, _stop_after_steps=int(stop_after) or None)


if __name__ == "__main__":
    cli.run_cli(lambda _settings: main(), lambda _argv: None, "ddp_probe.py")  # one-line errors, as the scripts
