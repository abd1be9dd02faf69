"""minibert.finetuning from Python: the steps train_finetune.py runs, called one by one, train the same model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import sentiment_rows, write_csv

import train_finetune
from minibert import finetuning
from minibert.config import BertConfig
from minibert.data.batching import collate
from minibert.tokenizer import load_tokenizer
from minibert.training import Distributed, Trainer, TrainingSettings, TrainState, seed_everything


def test_the_library_steps_train_exactly_what_the_script_trains(tiny_init_dir, tmp_path):
    train_file = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    dev_file = write_csv(tmp_path / "dev.csv", sentiment_rows(8))
    script = train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(train_file), "--validation-file",
                                  str(dev_file), "--output-dir", str(tmp_path / "script"), "--batch-size", "4",
                                  "--lr", "1e-3", "--max-steps", "5", "--eval-steps", "5", "--seed", "3", "--no-progress"])

    task = finetuning.load_task_data(train_file=str(train_file), validation_file=str(dev_file), seed=3)
    init_config = BertConfig.from_json_file(tiny_init_dir / "config.json")
    vocab = finetuning.choose_labels(task, init_config, init=str(tiny_init_dir))
    assert vocab.labels == ["neg", "pos"]
    tokenizer = load_tokenizer(tiny_init_dir)
    features = finetuning.encode_task(tokenizer, task, vocab, finetuning.max_length_for(init_config, None, "tiny"))
    seed_everything(3)  # as the script seeds: the new classifier and the dropout masks are drawn from it
    model = finetuning.build_model(task.task_type, vocab, tiny_init_dir)
    schedule = finetuning.Schedule(batch_size=4, grad_accum=1, seed=3, group_by_length=True, epochs=3, max_steps=5,
                                   eval_steps=5, save_steps=0, early_stopping=0)
    total_steps, epochs = schedule.steps([len(f) for f in features.train], Distributed())
    assert (total_steps, epochs) == (5, 1)
    trainer = Trainer(model, TrainingSettings(lr=1e-3, precision="fp32"), total_steps, tmp_path / "library")

    def accuracy(model) -> dict:  # written out here, independent of the script's predict/score
        model.eval()
        batch = collate(features.validation, tokenizer.token_to_id("[PAD]"))
        with torch.no_grad():
            predictions = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.argmax(-1)
        return {"accuracy": (predictions == batch["labels"]).float().mean().item()}

    stats = finetuning.train(trainer, TrainState(), features.train, schedule, epochs=epochs,
                             pad_token_id=tokenizer.token_to_id("[PAD]"), validate=accuracy, main_metric="accuracy",
                             tokenizer=tokenizer, progress=False)
    assert stats["steps"] == script["train"]["steps"] == 5
    saved_by_script = load_file(tmp_path / "script" / "model.safetensors")
    saved_by_library = load_file(tmp_path / "library" / "model.safetensors")
    assert saved_by_script.keys() == saved_by_library.keys()
    for key, tensor in saved_by_script.items():
        assert torch.equal(tensor, saved_by_library[key]), key
    assert accuracy(model)["accuracy"] == script["eval"]["accuracy"]


def test_hold_out_and_subset_are_seeded(tmp_path):
    train_file = write_csv(tmp_path / "train.csv", [(f"text {i}", "pos" if i % 2 else "neg") for i in range(40)])
    a = finetuning.load_task_data(train_file=str(train_file), validation_fraction=0.25, max_train_examples=12, seed=1)
    b = finetuning.load_task_data(train_file=str(train_file), validation_fraction=0.25, max_train_examples=12, seed=1)
    c = finetuning.load_task_data(train_file=str(train_file), validation_fraction=0.25, max_train_examples=12, seed=2)
    assert len(a.validation) == 10 and len(a.train) == 12
    assert [ex.text for ex in a.train] == [ex.text for ex in b.train]
    assert [ex.text for ex in a.train] != [ex.text for ex in c.train]
    held = {ex.text for ex in a.validation}
    assert not held & {ex.text for ex in a.train}
    # the subset keeps the file's order
    assert np.all(np.diff([int(ex.text.split()[1]) for ex in a.train]) > 0)


def test_a_fine_tuned_model_remembers_its_column_names(tiny_init_dir, tmp_path):
    train_file = write_csv(tmp_path / "train.csv", sentiment_rows(8), header=("review", "stars"))
    out = tmp_path / "out"
    train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(train_file), "--validation-file", str(train_file),
                         "--text-column", "review",
                         "--label-column", "stars", "--output-dir", str(out), "--batch-size", "4", "--max-steps", "1",
                         "--no-progress"])
    assert finetuning.saved_columns(out) == {"text_column": "review", "label_column": "stars"}
    assert finetuning.saved_columns(tiny_init_dir) == {}
    # --predict-only reads new data with the same columns without being told them again.
    rows = sentiment_rows(6)[::-1]
    new = write_csv(tmp_path / "new.csv", rows, header=("review", "stars"))
    results = train_finetune.main(["--init", str(out), "--predict-only", "--test-file", str(new),
                                   "--output-dir", str(tmp_path / "predicted")])
    predictions = [json.loads(line) for line in (tmp_path / "predicted" / "predictions.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == [text for text, _ in rows]
    hits = [p["label"] == stars for p, (_, stars) in zip(predictions, rows)]
    assert results["test"]["accuracy"] == sum(hits) / len(hits)  # scored against the stars column
    with pytest.raises(ValueError, match="--config nonsense=1: BertConfig has no field 'nonsense'"):  # read there too
        train_finetune.main(["--init", str(out), "--predict-only", "--test-file", str(new), "--config", "nonsense=1",
                             "--output-dir", str(tmp_path / "predicted")])
