"""What a bad spec is told: one line per problem, naming the file, the key path and the fix.

`describe` turns a pydantic error into `<key path>: <problem>` (with "did you mean" for a
misspelt key or value); `reject_old_keys` names a key of the spec format before the core's
configs became its sections, and its new name. docs/harness.md lists the messages.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel


class SpecError(Exception):
    """A spec the user must fix; `str()` is the full message, one problem per line."""


class LocatedError(ValueError):
    """A validator's error for a key below the validated model (pydantic only knows the model)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def at(loc: tuple, message: str) -> ValueError:
    # Pydantic keeps the exception object in the error's ctx: `describe` reads loc from it.
    return LocatedError(loc, message)


def unknown(kind: str, name: Any, allowed: Iterable[Any]) -> str:
    allowed = [str(a) for a in allowed]
    message = f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}"
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def _format_loc(loc: Iterable) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _is_union_tag(part: Any) -> bool:
    """A tagged union's tag in an error's key path (`seeds.(rounds).sequential`): not a key."""
    return isinstance(part, str) and part.startswith("(") and part.endswith(")")


def describe(error: dict, root: type[BaseModel]) -> str:
    loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    located = ctx.get("error")
    if isinstance(located, LocatedError):
        return f"{_format_loc(loc + located.loc)}: {located.message}"
    if kind == "extra_forbidden":
        allowed = _keys_at(loc[:-1], root)
        return f"{_format_loc(loc)}: {unknown('key', loc[-1], allowed)}"
    if kind == "missing":
        return f"{_format_loc(loc)}: required key is missing"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        if loc and loc[-1] == "[key]":  # a mapping key restricted to literals
            return f"{_format_loc(loc[:-1])}: {unknown('key', value, allowed)}"
        return f"{_format_loc(loc)}: {unknown('value', value, allowed)}"
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{_format_loc(loc)}: {message}"
    bounds = {
        "greater_than": ("> ", "gt"),
        "greater_than_equal": (">= ", "ge"),
        "less_than": ("< ", "lt"),
        "less_than_equal": ("<= ", "le"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"{_format_loc(loc)}: must be {op}{ctx[key]}, got {value!r}"
    if kind == "string_pattern_mismatch":
        return (
            f"{_format_loc(loc)}: {value!r} is not allowed; use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    message = str(error["msg"])
    message = message[0].lower() + message[1:] if message else message
    return f"{_format_loc(loc)}: {message}, got {value!r}"


def _keys_at(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Field names of the spec section at `loc` (for "did you mean" on an unknown key)."""
    node: Any = root
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int) or part == "[key]":
            args = typing.get_args(node)
            node = args[-1] if args else Any
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; `Annotated[X, ...]` -> X."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in map(_unwrap, args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(args) == 1:
            return _unwrap(args[0])
        if len(models) == 1:  # `list[int] | SeedRounds`: the keys are the model's
            return models[0]
    return annotation


# Keys of the spec before the core's configs became its sections -> their new names.
RENAMED = {
    "training.pretrain_epochs": "pretrain.budget (e.g. {unit: epochs, value: 2})",
    "training.finetune_epochs": "finetune.budget (e.g. {unit: epochs, value: 2})",
    "training.batch_size": "pretrain.batch_size and finetune.batch_size",
    "training.lr": "pretrain.optim.lr and finetune.optim.lr",
    "training.weight_decay": "pretrain.optim.weight_decay and finetune.optim.weight_decay",
    "training.w_bev": "finetune.w_bev",
    "training.w_reproj": "pretrain.w_reproj",
    "training.w_temporal": "pretrain.w_temporal",
    "training.device": "runtime.device",
    "training.options.reproj_stride": "pretrain.reprojection.stride",
    "training.options.reproj_loss": "pretrain.reprojection.loss",
    "training.options.focal_gamma": "pretrain.reprojection.focal_gamma",
    "training.options.reproj_class_weights": "pretrain.reprojection.class_weights",
    "training.options.bev_class_weights": "finetune.bev_class_weights",
    "training.options.bev_pos_weight": "finetune.bev_pos_weight",
    "training.options.temporal_loss": "pretrain.temporal_loss",
    "training.options.pretrain_val": "pretrain.val_every (null: never)",
    "training.options.val_every": "finetune.val_every",
    "training.options.finetune_w_reproj": "finetune.w_reproj",
    "training.options.finetune_w_temporal": "finetune.w_temporal",
    "training.options.bf16": "runtime.bf16",
    "search.label_fraction": "search.finetune.label_fraction",
    "search.pretrain_epochs": "search.pretrain.budget.value",
    "search.w_reproj": "search.pretrain.w_reproj",
    "search.w_temporal": "search.pretrain.w_temporal",
    "search.optuna": "optuna (with params keyed pretrain.w_reproj, ...)",
}
_OPTIM_FIELDS = (
    "backbone_lr_mult", "grad_clip_norm", "warmup_iters", "warmup_ratio", "warmup_max_fraction",
    "min_lr_ratio",
)  # fmt: skip
_PHASE_FIELDS = ("use_history", "bev_aug_yaw_deg")


def _old_name(key: str) -> str | None:
    if key in RENAMED:
        return RENAMED[key]
    field = key.removeprefix("training.options.")
    if field in _OPTIM_FIELDS:
        return f"pretrain.optim.{field} and finetune.optim.{field}"
    if field in _PHASE_FIELDS:
        return f"pretrain.{field} and finetune.{field}"
    if key.startswith("training"):
        return "the sections pretrain, finetune and runtime (docs/harness.md)"
    return None


def reject_old_keys(raw: dict, path: Path) -> None:
    """An old-style spec is an error that names the old key and its new name (no migration)."""
    keys: list[str] = []
    training = raw.get("training")
    if training is not None:
        keys.append("training")
        if isinstance(training, dict):
            for key, value in training.items():
                if key == "options" and isinstance(value, dict):
                    keys[:0] = [f"training.options.{k}" for k in value] or ["training.options"]
                else:
                    keys.insert(0, f"training.{key}")
    search = raw.get("search")
    if isinstance(search, dict):
        keys[:0] = [f"search.{k}" for k in search if "." not in k]
    for key in keys:
        new = _old_name(key)
        if new is not None:
            raise SpecError(f"{path}: {key}: renamed; use {new}")
