"""LoRA, low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Fine-tuning changes each weight W by some dW. LoRA bets that dW has low rank and trains it as a product
while W stays frozen:

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r of 4 to 16

A is drawn as nn.Linear draws a weight (Kaiming-uniform, as peft does) and B starts at zero, so training
starts from the base model exactly. With r = 8 on attention's query and value, BERT-base trains 0.3 M of its
110 M weights (plus the classifier), and the optimizer keeps state for those alone.

    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    lora = LoraModel(model, LoraSettings(rank=8, alpha=16, targets=("query", "value")), base=base)
    ...                                   # train `lora` like any minibert model
    lora.save_pretrained(out)             # out/: the merged plain BERT (W + (alpha/r) B A); out/adapter/: for peft
    lora = LoraModel.from_pretrained(out)                   # out/adapter on the base it names
    lora = LoraModel.from_adapter(model, peft_adapter_dir)  # an adapter peft trained, on `model` (its base)

The adapter is peft's format: adapter_config.json and adapter_model.safetensors, keyed by transformers' BERT
module names (base_model.model.bert.encoder.layer.N.attention.self.query.lora_A.weight), with the classifier
(and the pooler, if it trains) saved whole as peft's `modules_to_save`. So
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), out / "adapter")` gives
minibert's logits, and an adapter peft trained loads here.

LoraModel wraps a task model as peft's PeftModel does and changes it in place: each adapted nn.Linear
becomes a LoraLinear that holds it as `base_layer`. model.py knows nothing of LoRA.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from minibert.atomic_write import atomic_write, atomic_write_text
from minibert.checkpoint import _load_file, hf_to_minibert_key, minibert_to_hf_key
from minibert.config import BertConfig
from minibert.dropout import Dropout
from minibert.model import BertForSequenceClassification, BertForTokenClassification

logger = logging.getLogger("minibert")

# ----------------------------------------------------------------------------- the LoRA layer


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: base_layer(x) + scaling * lora_B(lora_A(dropout(x))).
    The attribute names are peft's, so the weights are base_layer.weight, lora_A.weight and lora_B.weight."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.scaling = alpha / rank
        # nn.Linear has drawn A already; peft draws it once more, the same way, so a seed gives peft's numbers.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: the model starts as the base model
        self.merged = False  # True while B A is added into base_layer.weight (see merge)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:  # (out, in)
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: the same outputs from one matmul instead of three. Training
        a merged layer trains nothing of A and B; unmerge first."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out again (exact up to float rounding, ~1e-7 relative)."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


# ----------------------------------------------------------------------------- settings

# --lora-targets names -> the nn.Linear of each encoder layer (minibert's names; checkpoint.ENCODER_MODULES
# gives HF's). "up"/"down" are minibert's names for HF's intermediate.dense/output.dense: both are accepted.
TARGETS = {
    "query": "attention.query",
    "key": "attention.key",
    "value": "attention.value",
    "attention-output": "attention.output",
    "intermediate": "feed_forward.up",
    "up": "feed_forward.up",
    "output": "feed_forward.down",
    "down": "feed_forward.down",
}
CANONICAL = {linear: name for name, linear in reversed(TARGETS.items())}  # linear -> its first name above
LAYER_ORDER = list(dict.fromkeys(TARGETS.values()))  # the Linear layers in the order a layer runs them

TASK_TYPES = {"SEQ_CLS": BertForSequenceClassification, "TOKEN_CLS": BertForTokenClassification}  # peft's names


@dataclass
class LoraSettings:
    rank: int = 8  # r, the rank of B A: the paper finds 4-8 enough for attention's projections
    # The update is scaled by alpha / rank, the paper's alpha/r: a change of rank then keeps the update's size
    # at the same learning rate. 2 x rank is the usual choice.
    alpha: float = 16.0
    dropout: float = 0.1  # on the input of the LoRA branch only; the frozen path keeps the model's own dropout
    # Which Linear of every layer adapts: the paper's query and value. Kept in layer order under the first
    # name TARGETS gives each ("down" becomes "output"), so that equal settings compare equal.
    targets: tuple[str, ...] = ("query", "value")
    train_pooler: bool = False  # also train the pooler in full, as the classifier is (saved whole in the adapter)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.rank} (8 is usual)")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha} (2 x rank is usual)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets: unknown name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"choose from {', '.join(TARGETS)}, comma-separated")
        linears = [TARGETS[t] for t in self.targets]
        if len(set(linears)) < len(linears):
            raise ValueError(f"--lora-targets {','.join(self.targets)} names a layer twice (up is intermediate, "
                             "down is output)")
        self.targets = tuple(CANONICAL[linear] for linear in LAYER_ORDER if linear in linears)


# ----------------------------------------------------------------------------- the wrapped model

PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> its LoraModel -> the transformers model: key prefix


def _hf_module(module: str) -> str:
    """minibert module name -> transformers' (bert.layers.0.attention.query -> bert.encoder.layer.0.attention.self.query),
    through the key table of checkpoint.py."""
    return minibert_to_hf_key(module + ".weight", "bert.").removesuffix(".weight")


class LoraModel(nn.Module):
    """A minibert task model (sequence or token classifier) with LoRA in the chosen Linear layers of every
    encoder layer. Everything else is frozen except the classifier, and the pooler if settings.train_pooler."""

    def __init__(self, model: nn.Module, settings: LoraSettings, base: str | None = None):
        super().__init__()
        if not isinstance(model, tuple(TASK_TYPES.values())):
            raise ValueError(f"LoRA adapts a sequence or token classifier, not a {type(model).__name__}")
        if settings.train_pooler and model.bert.pooler is None:
            raise ValueError("--lora-train-pooler: a token classifier has no pooler to train")
        # A pooler the base checkpoint lacks was drawn anew (from_pretrained's new_keys), and transformers would
        # draw another one under the adapter: it has to train and be saved with it.
        if any(k.startswith("bert.pooler.") for k in getattr(model, "new_keys", ())) and not settings.train_pooler:
            logger.info("minibert: the base model has no pooler: the new one trains in full, and is saved in the adapter")
            settings = replace(settings, train_pooler=True)
        self.model, self.settings = model, settings
        # What adapter_config.json names as the base: a hub id as given, a local directory as an absolute
        # path (so that a run resumes from any working directory).
        self.base = str(Path(base).resolve()) if base is not None and Path(base).is_dir() else base
        model.requires_grad_(False)
        suffixes = tuple("." + TARGETS[t] for t in settings.targets)
        # In module order, as peft injects: a seed draws the same A matrices as peft's on transformers' BERT.
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.layers.")
                 and n.endswith(suffixes)]
        for name in names:
            model.set_submodule(name, LoraLinear(model.get_submodule(name), settings.rank, settings.alpha, settings.dropout))
        self.fully_trained = ["classifier"] + (["bert.pooler"] if settings.train_pooler else [])
        for name in self.fully_trained:
            model.get_submodule(name).requires_grad_(True)

    @property
    def config(self) -> BertConfig:
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameter_groups(self, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
        return self.model.parameter_groups(weight_decay, layer_lr_decay)  # the frozen weights are left out there

    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def merge(self) -> None:
        for layer in self.lora_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def merged_model(self) -> nn.Module:
        """A plain minibert model with W + (alpha/r) B A in each adapted Linear; this model is left as it is
        (merging in place and back would change the frozen weights by float rounding)."""
        plain = copy.deepcopy(self.model)
        for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, LoraLinear)]:
            layer.merge()
            plain.set_submodule(name, layer.base_layer)
        return plain

    # --------------------------------------------------------------------- saving and loading

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors under peft's names: LoRA's A and B, and the fully trained modules whole."""
        tensors = {}
        for name, layer in self.lora_layers().items():
            for part in ("lora_A", "lora_B"):
                tensors[f"{PEFT_PREFIX}{_hf_module(name)}.{part}.weight"] = getattr(layer, part).weight
        for module in self.fully_trained:
            for suffix, tensor in self.model.get_submodule(module).state_dict().items():
                tensors[PEFT_PREFIX + minibert_to_hf_key(f"{module}.{suffix}", "bert.")] = tensor
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def adapter_config(self) -> dict:
        """adapter_config.json as peft reads it. target_modules lists every adapted module by its full name,
        which peft matches exactly (a suffix such as "output.dense" would match attention's output too)."""
        return {
            "peft_type": "LORA",
            "task_type": next(k for k, cls in TASK_TYPES.items() if isinstance(self.model, cls)),
            "base_model_name_or_path": self.base,
            "r": self.settings.rank,
            "lora_alpha": int(self.settings.alpha) if float(self.settings.alpha).is_integer() else self.settings.alpha,
            "lora_dropout": self.settings.dropout,
            "target_modules": [_hf_module(n).removeprefix("bert.") for n in self.lora_layers()],
            # peft's names for what trains in full; it adds "classifier" for a classifier task by itself.
            "modules_to_save": [m.removeprefix("bert.") for m in self.fully_trained],
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }

    def save_adapter(self, directory: str | Path) -> int:
        """Write adapter_config.json and adapter_model.safetensors; returns their size in bytes."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.adapter_state_dict()
        atomic_write(directory / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_text(directory / "adapter_config.json", json.dumps(self.adapter_config(), indent=2) + "\n")
        return sum((directory / name).stat().st_size for name in ("adapter_model.safetensors", "adapter_config.json"))

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Both ways out: DIRECTORY is the merged model, a plain BERT directory that minibert and transformers
        load; DIRECTORY/adapter the adapter, for peft on the base model."""
        self.merged_model().save_pretrained(directory, tokenizer=tokenizer)
        self.save_adapter(Path(directory) / "adapter")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, verbose: bool = True, **config_overrides) -> LoraModel:
        """What save_pretrained wrote, for training further: DIRECTORY/adapter on the base model its
        adapter_config.json names, with the task settings (labels, dropout, ...) of DIRECTORY/config.json."""
        directory = Path(directory)
        config = BertConfig.from_json_file(directory / "config.json", **config_overrides)
        adapter = read_adapter_config(directory / "adapter")
        if not adapter.get("base_model_name_or_path") or adapter.get("task_type") not in TASK_TYPES:
            raise ValueError(f"{directory / 'adapter'} does not name its base model and task: load it with "
                             "LoraModel.from_adapter(model, directory) on a model of its base")
        # Every setting as the run had it (labels, dropout, fewer layers, ...); reinit_head: the head is the
        # adapter's, whatever head the base has.
        settings = {f.name: getattr(config, f.name) for f in fields(BertConfig) if f.name != "extra"}
        model = TASK_TYPES[adapter["task_type"]].from_pretrained(
            adapter["base_model_name_or_path"], reinit_head=True, verbose=verbose, **settings)
        # And what the run kept beside the fields (tag_scheme, calibration_temperature, label_thresholds): the
        # base's config has none of it, and without tag_scheme a tagger would decode without its BIO rules.
        model.config.extra = dict(config.extra)
        return cls.from_adapter(model, directory / "adapter")

    @classmethod
    def from_adapter(cls, model: nn.Module, directory: str | Path, *, base: str | None = None,
                     load_head: bool = True) -> LoraModel:
        """A LoRA adapter (minibert's or peft's) on `model`, a minibert classifier of the adapter's base.
        The adapter's settings and targets are its own; its head replaces the model's unless load_head=False
        (a new head for other labels). Module names and shapes are checked against the model."""
        directory = Path(directory)
        config = read_adapter_config(directory)
        task_type = config.get("task_type")
        if task_type in TASK_TYPES and not isinstance(model, TASK_TYPES[task_type]):
            raise ValueError(f"the adapter in {directory} is for a {TASK_TYPES[task_type].__name__} (task_type "
                             f"{task_type}), not the {type(model).__name__} this task needs")
        state, misfits = {}, []  # minibert key -> the adapter's tensor; adapter keys with no place here
        for key, tensor in read_adapter_weights(directory).items():
            hf_key = key.removeprefix(PEFT_PREFIX)
            lora = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", hf_key)
            target = hf_to_minibert_key(f"{lora.group(1)}.weight" if lora else hf_key, "bert.")
            if not isinstance(target, str):  # a key the table does not know, or one it drops
                misfits.append(key)
            elif lora:
                module = target.removesuffix(".weight")
                adaptable = re.fullmatch(r"bert\.layers\.\d+\.(.+)", module)
                if adaptable and adaptable.group(1) in CANONICAL:
                    state[f"{module}.{lora.group(2)}.weight"] = tensor
                else:
                    misfits.append(key)
            elif target.startswith(("classifier.", "bert.pooler.")):
                state[target] = tensor
            else:
                misfits.append(key)
        if misfits:
            raise ValueError(f"the adapter in {directory} changes {', '.join(misfits[:2])}{', ...' if len(misfits) > 2 else ''}, "
                             "which minibert's LoRA does not train: it adapts the encoder's Linear layers "
                             f"({', '.join(CANONICAL[linear] for linear in LAYER_ORDER)}) and trains the classifier and pooler whole")
        adapted = sorted({k.rsplit(".", 2)[0] for k in state if ".lora_" in k})
        if not adapted:
            raise ValueError(f"the adapter in {directory} holds no LoRA weights (lora_A, lora_B): it is not a LoRA adapter")
        linears = sorted({re.sub(r"^bert\.layers\.\d+\.", "", name) for name in adapted})
        expected = [f"bert.layers.{i}.{linear}.{part}.weight" for i in range(len(model.bert.layers))
                    for linear in linears for part in ("lora_A", "lora_B")]
        extra, absent = sorted(k for k in state if ".lora_" in k and k not in expected), [k for k in expected if k not in state]
        if extra:
            raise ValueError(f"the adapter in {directory} has LoRA weights for {_hf_module(extra[0].rsplit('.', 2)[0])}, "
                             f"which --init (with {len(model.bert.layers)} layers) does not have: it belongs to another base model")
        if absent:
            raise ValueError(f"the adapter in {directory} lacks {_hf_module(absent[0].rsplit('.', 2)[0])}."
                             f"{absent[0].rsplit('.', 2)[1]}: minibert adapts a module in every layer or in none")
        settings = LoraSettings(rank=config["r"], alpha=float(config["lora_alpha"]),
                                dropout=float(config.get("lora_dropout") or 0.0),
                                targets=tuple(CANONICAL[linear] for linear in linears),
                                train_pooler=any(k.startswith("bert.pooler.") for k in state))
        if any(k.startswith("bert.pooler.") for k in getattr(model, "new_keys", ())) and not settings.train_pooler:
            raise ValueError(f"the base model has no pooler and the adapter in {directory} brings none: it was trained "
                             "on another base model, one with a pooler")
        wrapped = cls(model, settings, base=base or config.get("base_model_name_or_path"))
        if not load_head:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        own = wrapped.model.state_dict()
        for key, tensor in state.items():
            if tensor.shape == own[key].shape:
                continue
            if key.startswith("classifier."):
                raise ValueError(f"the adapter's classifier has {tensor.shape[0]} outputs but the task has "
                                 f"{own[key].shape[0]}: pass --reinit-head to train a new head on the adapter")
            raise ValueError(f"the adapter's {key} has shape {tuple(tensor.shape)} but --init's needs "
                             f"{tuple(own[key].shape)}: the adapter belongs to a base model of other sizes")
        wrapped.model.load_state_dict(state, strict=False)
        return wrapped


# What a LoRA adapter's settings must be for the plain LoRA that minibert computes; peft's variants
# (DoRA, rsLoRA, trained biases, per-module ranks, ...) compute something else.
PLAIN_LORA = {
    "use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None,
    "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
}
# Inits that leave the base weights as they were (PiSSA, OLoRA, LoftQ, ... change them, so the adapter
# needs that changed base).
BASE_KEEPING_INITS = (True, False, "gaussian", "eva")


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter minibert can compute, with a one-line error for any other."""
    directory = Path(directory)
    path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"--lora-adapter {directory}: no such directory (pass the folder peft's save_pretrained "
                                "wrote, or a LoRA run's adapter/)")
    if not path.is_file():
        raise FileNotFoundError(f"--lora-adapter {directory} has no adapter_config.json: pass the folder peft's "
                                "save_pretrained wrote (adapter_config.json, adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): save the adapter again") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"--lora-adapter {directory} is a {config.get('peft_type')} adapter; minibert loads LoRA "
                         "adapters only (peft_type LORA)")
    for key, plain in PLAIN_LORA.items():
        value = config.get(key)
        if not (value is None or value == plain or (not value and not plain)):  # [] and None: nothing set
            raise ValueError(f"--lora-adapter {directory} has {key} = {value!r}, a LoRA variant minibert does not "
                             f"compute (plain LoRA has {plain!r}): train it with plain LoRA")
    if config.get("init_lora_weights", True) not in BASE_KEEPING_INITS:
        raise ValueError(f"--lora-adapter {directory} was initialised with {config['init_lora_weights']!r}, which changes "
                         "the base weights: convert it to a plain LoRA adapter with peft first")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise ValueError(f"{path} lacks a positive rank r or lora_alpha: it is not a complete LoRA adapter config")
    return config


def read_adapter_weights(directory: Path) -> dict[str, Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # peft before 0.6 wrote the pickle, read as data
        if (directory / name).is_file():
            return _load_file(directory / name)
    raise FileNotFoundError(f"--lora-adapter {directory} has adapter_config.json but no adapter_model.safetensors: "
                            "copy the adapter's weights next to it")
