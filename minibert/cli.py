"""What the two scripts share as command-line programs: flags from a settings dataclass, BertConfig
overrides (--config FIELD=VALUE), the log, and how a run ends on bad input or Ctrl-C.

    settings = parse_settings(FinetuneConfig, argv, __doc__)   # one --flag per field, help from comments
    overrides = config_overrides(["hidden_act=silu"])           # {"hidden_act": "silu"}, typed by BertConfig
    setup_logging()                                             # "minibert: ..." lines on stdout, rank 0 only
    run_cli(main, parse_args)                                   # one-line errors, one line on Ctrl-C
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from minibert.config import BertConfig
from minibert.runs import find_checkpoint

logger = logging.getLogger("minibert")

# ----------------------------------------------------------------------------- flags


def field_comments(source: str) -> dict[str, str]:
    """A dataclass's fields and what its comments say of each: the comment on the field's line, else the
    comment lines right above it (section headers such as "# --- data ---" excepted)."""
    comments, above = {}, []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            above = [] if text.startswith("---") else [*above, text]
            continue
        field = re.match(r"(\w+):[^#]*?(?:#\s*(.+))?$", stripped)
        if field:
            comments[field.group(1)] = field.group(2) or " ".join(above)
        above = []
    return comments


def parse_settings(cls, argv: list[str] | None, doc: str):
    """A command line made from a settings dataclass: one --flag per field (underscores become dashes),
    the field's default as the flag's; bools get --flag/--no-flag, list fields take several values (or,
    with metadata repeat=True, one value each time the flag is given). The scripts' docstrings (commands
    to run) and the fields' comments become the help text."""
    comments = field_comments(inspect.getsource(cls))
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, help = "--" + f.name.replace("_", "-"), comments.get(f.name, "").replace("%", "%%")
        metavar = f.metadata.get("metavar", "PATH")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif f.type.startswith("list") and f.metadata.get("repeat"):
            parser.add_argument(flag, action="append", default=None, metavar=metavar, help=help)
        elif f.type.startswith("list"):
            parser.add_argument(flag, nargs="+", default=[], metavar=metavar, help=help)
        else:
            kind = {"int": int, "float": float}.get(f.type.replace(" | None", ""), str)
            default = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper(), help=help + default)
    values = vars(parser.parse_args(argv))
    settings = cls(**{name: [] if value is None and name in _list_fields(cls) else value for name, value in values.items()})
    # Which flags were typed: --resume takes the others from the run it continues (settings_to_resume).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    settings.given_flags = frozenset(vars(parser.parse_args(argv)))
    return settings


def _list_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type.startswith("list")}


def check_counts(settings, at_least_one: tuple[str, ...] = (), at_least_zero: tuple[str, ...] = ()) -> None:
    """One-line errors for counts out of range (--batch-size 0 would otherwise fail deep inside)."""
    for names, least in ((at_least_one, 1), (at_least_zero, 0)):
        for name in names:
            if getattr(settings, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(settings, name)}")


# ----------------------------------------------------------------------------- --config FIELD=VALUE

# BertConfig's fields a --config may set: all but `extra`, the unknown keys of a config.json.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(BertConfig) if f.name != "extra")


def config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """--config FIELD=VALUE items as {field: value}, each value read as its BertConfig field's type says
    (int, float, bool as true/false, str; none for a field that may be None; JSON for id2label). Whether
    the values make a valid model is BertConfig's own check, when the config is built."""
    types_of = typing.get_type_hints(BertConfig)
    fields = ", ".join(CONFIG_FIELDS)
    overrides = {}
    for item in items:
        name, equals, text = (part.strip() for part in item.partition("="))
        if not equals or name not in CONFIG_FIELDS:
            problem = f"BertConfig has no field {name!r}" if equals else "give it as FIELD=VALUE"
            raise ValueError(f"--config {item}: {problem}; the fields are {fields}")
        try:
            overrides[name] = _typed(text, types_of[name])
        except ValueError:
            raise ValueError(f"--config {item}: {name} takes {_type_name(types_of[name])}, not {text!r}; "
                             f"the fields are {fields}") from None
    return overrides


def _typed(text: str, kind) -> Any:
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    if type(None) in options:
        if text.lower() in ("none", "null"):
            return None
        kind = next(option for option in options if option is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if kind in (int, float, str):
        return kind(text)
    value = json.loads(text)  # a dict (id2label): JSON, as config.json writes it
    if not isinstance(value, typing.get_origin(kind) or kind):
        raise ValueError(text)
    return value


def _type_name(kind) -> str:
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
    return " or ".join(names.get(option, "a JSON object") for option in options)


# ----------------------------------------------------------------------------- the log and the end of a run


def setup_logging() -> None:
    """minibert's messages, one line each, on stdout, where a log file (`> log`) catches them. Under
    torchrun only rank 0 says them: every rank would say the same, once per process. (Errors end a run
    on stderr, through run_cli.)"""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if int(os.environ.get("RANK", "0")) > 0:
        logger.setLevel(logging.ERROR)


def run_cli(main: Callable, parse_args: Callable, script: str) -> None:
    """Run a script's main() on its command line. Bad input (DataError, CorpusError: ValueErrors; missing
    files) ends the run with its one-line message and exit status 1 instead of a traceback; Ctrl-C ends
    it with one line that says where the last checkpoint is and how to continue from it."""
    settings = None
    try:
        settings = parse_args(None)
        main(settings)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if settings is not None and int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_message(settings.output_dir, script), file=sys.stderr)
        sys.exit(130)  # the shell's status for a run ended by SIGINT


def interrupted_message(output_dir: str, script: str) -> str:
    checkpoint = find_checkpoint(output_dir)
    if checkpoint is None:
        return f"minibert: interrupted before the first checkpoint in {output_dir} was written: there is nothing to resume"
    return (f"minibert: interrupted; the last checkpoint is {checkpoint}: continue with "
            f"`python {script} --output-dir {output_dir} --resume`")
