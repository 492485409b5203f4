"""Typed configuration read from YAML, with ``key=value`` overrides on top.

A config is a dataclass whose type hints and field ``metadata`` (``help``, ``choices``, ``min``,
``max``, ``gt``, ``lt``, ``required_if``) drive parsing and validation: adding a setting means
adding a field, not writing parsing code. Unknown keys, wrong types and out-of-range values are errors naming where
the value came from (the YAML file or ``--set``), the key, the value, what is accepted and the
closest known key. ``from_dict`` works for any such dataclass, so other parts (indexing,
serving) can define their own configs on the same machinery by subclassing ``Config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

OVERRIDE_SOURCE = "--set"
_META_KEYS = frozenset({"help", "choices", "min", "max", "gt", "lt", "required_if"})
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NULL = frozenset({"", "null", "none", "~"})
_OVERRIDE_FLAGS = ("--set", "--config_override", "--config-override")


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` holds one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class _Invalid(Exception):
    """A value that does not fit its field; ``hint`` is appended to what is accepted."""

    def __init__(self, reason: str = "has the wrong type", hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint


class Config:
    """Base of config dataclasses: validated construction, plain-dict and YAML output."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], source: str | Path = "config",
                  key_sources: Mapping[str, str] | None = None) -> T:
        return from_dict(cls, data, source, key_sources)

    def validated(self: T) -> T:
        """A copy checked like a config read from a file, for configs built in Python."""
        return from_dict(type(self), dataclasses.asdict(self), "config")  # type: ignore[call-overload]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML, atomically; ``load_config`` reads it back equal."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def check(self) -> list[tuple[str, str]]:
        """Rules spanning several fields, as (key, message); one-field rules belong in metadata."""
        return []


def from_dict(cls: type[T], data: Mapping[str, Any], source: str | Path = "config",
              key_sources: Mapping[str, str] | None = None) -> T:
    """Build and validate the dataclass ``cls`` from ``data``, raising ``ConfigError`` on any problem.

    ``source`` names where the values came from (a file path); ``key_sources`` overrides it for
    single keys (e.g. ``{"epochs": "--set"}``), so every message points at the right place.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: expected a mapping of key: value, got {type(data).__name__}"])
    sources = dict(key_sources or {})
    obj, problems = _build(cls, data, lambda key: sources.get(key, str(source)), "")
    if problems:
        raise ConfigError(problems)
    return obj


def _build(cls: type[T], data: Mapping[Any, Any], where: Callable[[str], str], prefix: str) -> tuple[Any, list[str]]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in data.items():
        spec = fields.get(key) if isinstance(key, str) else None
        if spec is None:
            problems.append(f"{where(str(key))}: unknown key {prefix}{key} = {raw!r} ({_suggest(str(key), fields)})")
            continue
        try:
            values[key] = _convert(raw, hints[key], spec.metadata, where(key), f"{prefix}{key}")
        except _Invalid as e:
            accepted = _describe(hints[key], spec.metadata)
            problems.append(f"{where(key)}: {prefix}{key} = {raw!r} {e.reason} (accepted: {accepted}{e.hint})")
        except ConfigError as e:  # a nested config (a stage) reports its own keys
            problems.extend(e.problems)
    for key, spec in fields.items():
        condition = spec.metadata.get("required_if")  # a bool field that makes this one required
        if condition:
            absent = values.get(key) is None if key in values else key not in data
            missing = absent and bool(values.get(condition, fields[condition].default))
        else:
            missing = key not in data and spec.default is MISSING and spec.default_factory is MISSING
        if missing:
            what = spec.metadata.get("help") or _describe(hints[key], spec.metadata)
            fix = "" if prefix else f"; set it in the config file or pass --set {key}=VALUE"
            problems.append(f"{where(key)}: missing required key {prefix}{key} ({what}){fix}")
    if problems:
        return None, problems
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        problems.extend(f"{where(key)}: {prefix}{message}" for key, message in check())
    return obj, problems


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))


def _convert(raw: Any, tp: Any, meta: Mapping[str, Any], label: str, name: str) -> Any:
    unknown = set(meta) - _META_KEYS
    if unknown:  # a typo in a field definition must not silently disable its validation
        raise TypeError(f"config field {name}: unknown metadata {sorted(unknown)}; known: {sorted(_META_KEYS)}")
    value = _coerce(raw, tp, label, name)
    items = value if isinstance(value, list) else [value]
    for item in items:
        _check_item(item, meta, many=isinstance(value, list))
    return value


def _check_item(item: Any, meta: Mapping[str, Any], many: bool) -> None:
    if item is None or isinstance(item, bool):
        return
    what = f"has item {item!r}, which is" if many else "is"
    choices = meta.get("choices")
    if choices is not None and isinstance(item, str) and item not in choices:
        close = difflib.get_close_matches(item, list(choices), n=1)
        raise _Invalid(f"{what} not an accepted choice", f"; did you mean {close[0]!r}?" if close else "")
    if isinstance(item, (int, float)) and not _in_range(item, meta):
        raise _Invalid(f"{what} out of range")


def _in_range(x: float, meta: Mapping[str, Any]) -> bool:
    return not (("min" in meta and x < meta["min"]) or ("max" in meta and x > meta["max"])
                or ("gt" in meta and x <= meta["gt"]) or ("lt" in meta and x >= meta["lt"]))


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """What a field accepts, in words, for error messages."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        text = " or ".join(_describe(m, meta) for m in get_args(tp) if m is not type(None))
        return text + ", or null" if type(None) in get_args(tp) else text
    if origin is list:
        inner = get_args(tp)[0]
        if dataclasses.is_dataclass(inner):
            return f"a list of entries, each {_describe(inner, {})}"
        return f"a list (YAML list, 'a,b' or '[a, b]'), each item {_describe(inner, meta)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is bool:
        return "true or false (also yes/no, on/off, 1/0)"
    if tp in (int, float):
        bounds = [f"{op} {meta[k]}" for k, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")) if k in meta]
        return ("an integer" if tp is int else "a number") + (" " + " and ".join(bounds) if bounds else "")
    if tp is str and meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    return "a mapping" if dict in (tp, origin) else "a string" if tp is str else "any value"


def _coerce(raw: Any, tp: Any, label: str, name: str) -> Any:
    """Turn a YAML value or an override string into a value of type ``tp``, or raise ``_Invalid``."""
    origin = get_origin(tp)
    if tp is Any:
        return raw
    if origin in (Union, types.UnionType):
        return _coerce_union(raw, get_args(tp), label, name)
    if origin is list:
        inner = get_args(tp)[0]
        items = _as_list(raw, structured=dataclasses.is_dataclass(inner) or dict in (inner, get_origin(inner)))
        return [_coerce(item, inner, label, f"{name}[{i}]") for i, item in enumerate(items)]
    if dataclasses.is_dataclass(tp):
        if isinstance(raw, tp):
            raw = dataclasses.asdict(raw)
        if not isinstance(raw, Mapping):
            raise _Invalid()
        obj, problems = _build(tp, raw, lambda _key: label, f"{name}.")
        if problems:
            raise ConfigError(problems)
        return obj
    if dict in (tp, origin):
        if isinstance(raw, str):
            raw = _parse_yaml_value(raw)
        if not isinstance(raw, Mapping):
            raise _Invalid()
        return dict(raw)
    parse = _SCALARS.get(tp)
    if parse is None:
        raise TypeError(f"config field {name}: type {tp!r} is not supported")
    return parse(raw)


def _coerce_union(raw: Any, members: tuple[Any, ...], label: str, name: str) -> Any:
    optional = type(None) in members
    members = tuple(m for m in members if m is not type(None))
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in _NULL):
        if optional:
            return None
        raise _Invalid()
    if len(members) == 1:  # keep the member's own (possibly nested) errors
        return _coerce(raw, members[0], label, name)
    # Strict parsers first so "true" means True and "3" means 3 before the catch-all str;
    # a string becomes a list only when it is written like one.
    rank = {bool: 0, int: 1, float: 2, str: 4}
    for member in sorted(members, key=lambda m: rank.get(m, 3)):
        if get_origin(member) is list and isinstance(raw, str) and not _looks_like_list(raw):
            continue
        try:
            return _coerce(raw, member, label, name)
        except (_Invalid, ConfigError):
            continue
    raise _Invalid()


def _looks_like_list(text: str) -> bool:
    return text.strip().startswith("[") or "," in text


def _as_list(raw: Any, structured: bool) -> list[Any]:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if not isinstance(raw, str):
        raise _Invalid()
    if structured:  # entries that are mappings can only be written as YAML
        parsed = _parse_yaml_value(raw)
        if not isinstance(parsed, list):
            raise _Invalid()
        return parsed
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    return [item.strip().strip("'\"") for item in text.split(",")] if text else []


def _parse_yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _Invalid("is not valid YAML") from None


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise _Invalid()


def _to_float(raw: Any) -> float:
    if isinstance(raw, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string, so YAML values come through here too
            raw = float(raw.strip())
        except ValueError:
            raise _Invalid() from None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
        return float(raw)
    raise _Invalid()


def _to_int(raw: Any) -> int:
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raw = _to_float(raw)  # "1e4" and "2.0" are whole numbers too
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise _Invalid()


def _to_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise _Invalid()


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}

LOSS_TYPES = ("kl_divergence", "feature_mse", "icl", "similarity_mse")
# Keys of vkd.evaluate.recall_at_k's result (default ks) that can choose the best weights.
BEST_METRICS = ("rsum", *(f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)))


@dataclass(kw_only=True)
class Stage(Config):
    """One stage of a schedule; stages run in order, each replacing the top-level epochs,
    temperature, distillation_weight (and learning_rate when given)."""

    epochs: int = field(metadata={"help": "epochs in this stage", "min": 1})
    temperature: float = field(metadata={"help": "KD softmax temperature in this stage", "gt": 0})
    distillation_weight: float = field(metadata={"help": "weight w of the KD terms", "min": 0, "max": 1})
    learning_rate: float | None = field(default=None, metadata={"help": "null = the top-level learning_rate", "gt": 0})


@dataclass(kw_only=True)
class DistillConfig(Config):
    """Everything ``vkd distill`` needs; keys match the YAML files users already write."""

    # models
    model_name_or_path: str = field(metadata={"help": "the student: a local model directory or hub id"})
    teacher_model_name_or_path: str | list[str] | None = field(
        default=None, metadata={"help": "the teacher model(s); needed because use_distillation is true",
                                "required_if": "use_distillation"})
    teacher_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per teacher; null = equal weights", "min": 0})
    teacher_mode: str = field(default="frozen", metadata={"choices": ["frozen", "ema"]})
    teacher_momentum: float = field(default=0.999, metadata={"help": "EMA momentum", "min": 0, "max": 1})
    update_teacher_every: int = field(default=1, metadata={"help": "steps between EMA updates", "min": 1})
    teacher_cache: bool = field(default=True, metadata={"help": "store teacher embeddings once per sample"})
    teacher_cache_dir: str | None = field(default=None, metadata={"help": "null = <output_dir>/teacher_cache"})
    # per-model options: each belongs to the model it is given for (a teacher's targets are
    # never cut to the student's shape); the teacher_* ones take one value for every teacher
    # or a list with one per teacher (null in it: that teacher's own default)
    teacher_max_text_length: int | list[int | None] | None = field(default=None, metadata={
        "help": "each teacher's text token limit (Qwen3-VL: the user's text only); null = the model's own",
        "min": 1})
    teacher_matryoshka_dim: int | list[int | None] | None = field(default=None, metadata={
        "help": "each teacher's Matryoshka size (Qwen3-VL only); null = its full dimension", "min": 1})
    query_instruction: str | None = field(default=None, metadata={
        "help": "Qwen3-VL instruction of texts (queries: captions); null = the model's own "
                "(saved with it, else 'Find an image that matches the given caption.')"})
    document_instruction: str | None = field(default=None, metadata={
        "help": "Qwen3-VL instruction of images (documents); null = the model's own (saved with it, else "
                "\"Represent the user's input.\")"})
    teacher_query_instruction: str | None = field(default=None, metadata={
        "help": "the teachers' query instruction; null = query_instruction"})
    teacher_document_instruction: str | None = field(default=None, metadata={
        "help": "the teachers' document instruction; null = document_instruction"})
    # data
    data_path: str = field(metadata={"help": "the training pair file, a .jsonl"})
    val_data_path: str | None = field(default=None, metadata={"help": "validation pair file; null = none"})
    output_dir: str = field(metadata={"help": "where the merged student, checkpoints and logs go"})
    max_text_length: int | None = field(default=None, metadata={
        "help": "the student's text token limit (Qwen3-VL: the user's text only); null = the model's own", "min": 1})
    num_workers: int = field(default=0, metadata={"help": "data loader processes; 0 = main process", "min": 0})
    # distillation
    use_distillation: bool = field(default=True, metadata={"help": "false = contrastive fine-tuning only"})
    distillation_loss_type: str | list[str] = field(default="kl_divergence", metadata={"choices": list(LOSS_TYPES)})
    temperature: float = field(default=2.0, metadata={"help": "KD softmax temperature", "gt": 0})
    distillation_weight: float = field(default=0.5, metadata={"help": "w in (1-w)·CE + w·KD", "min": 0, "max": 1})
    train_modes: list[str] | None = field(default=None, metadata={
        "help": "asymmetric search modes to train for (a projection into the first teacher's space, saved "
                "with the model; see vkd search --mode); null = two-stage only",
        "choices": ["student-query", "student-index"]})
    # each train_modes term: alignment·(2 − 2·cos) + contrastive·InfoNCE + kd·T²·KL(teacher's ranking ‖ the
    # mode's), the cross-modal logits at the teacher's logit scale / mode_temperature
    mode_alignment_weight: float = field(default=0.5, metadata={
        "help": "train_modes: weight of the projected student's squared distance to the teacher's vector", "min": 0})
    mode_contrastive_weight: float = field(default=0.5, metadata={
        "help": "train_modes: weight of the cross-modal InfoNCE (the caption's own image first)", "min": 0})
    mode_kd_weight: float = field(default=0.0, metadata={
        "help": "train_modes: weight of the KL between the teacher's own text→image ranking of the batch and the "
                "mode's (what overlap with teacher-only search measures)", "min": 0})
    mode_temperature: float = field(default=1.0, metadata={
        "help": "train_modes: the cross-modal terms' softmax temperature (logits = teacher scale · cos / T)",
        "gt": 0})
    projection_lr_scale: float = field(default=1.0, metadata={
        "help": "train_modes: the projection's learning rate as a multiple of learning_rate", "gt": 0})
    stages: list[Stage] | None = field(default=None, metadata={"help": "stages run in order; null = one stage"})
    matryoshka_dim: int | None = field(default=None, metadata={
        "help": "the student's embedding size, a prefix of its vector (Qwen3-VL only); null = full", "min": 1})
    # optimisation
    epochs: int = field(default=3, metadata={"min": 1})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps", "min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    learning_rate: float = field(default=1e-4, metadata={"gt": 0})
    weight_decay: float = field(default=0.01, metadata={"min": 0})
    warmup_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    use_gradient_cache: bool = field(default=False, metadata={"help": "encode the batch in chunks to save memory"})
    gradient_cache_chunk_size: int = field(default=32, metadata={"min": 1})
    mixed_precision: str = field(default="auto", metadata={"choices": ["no", "bf16", "fp16", "auto"]})
    seed: int = 42
    # LoRA
    use_lora: bool = True
    lora_r: int = field(default=16, metadata={"min": 1})
    lora_alpha: int = field(default=32, metadata={"min": 1})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "lt": 1})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "null = the family default"})
    # logging, evaluation, checkpoints
    logging_steps: int = field(default=10, metadata={"min": 1})
    save_steps: int = field(default=0, metadata={"help": "0 = save only at the end", "min": 0})
    eval_strategy: str = field(default="epoch", metadata={"choices": ["epoch", "steps", "no"]})
    eval_steps: int = field(default=500, metadata={"min": 1})
    best_metric: str = field(default="rsum", metadata={
        "help": "val metric that picks the weights written to model/ (rsum = R@1+R@5+R@10, both directions); "
                "a tie goes to the later evaluation", "choices": list(BEST_METRICS)})
    report_to: list[str] = field(default_factory=lambda: ["jsonl"], metadata={"choices": ["jsonl", "tensorboard"]})
    resume_from_checkpoint: str | bool | None = field(
        default=None, metadata={"help": "a checkpoint directory, or true/'latest' for the newest one"})

    @property
    def teachers(self) -> list[str]:
        """``teacher_model_name_or_path`` as a list (empty without a teacher)."""
        t = self.teacher_model_name_or_path
        return [] if t is None else [t] if isinstance(t, str) else list(t)

    def student_options(self) -> dict[str, Any]:
        """The student's own model options (None: the model's default)."""
        return {"max_text_length": self.max_text_length, "matryoshka_dim": self.matryoshka_dim,
                "query_instruction": self.query_instruction, "document_instruction": self.document_instruction}

    def teacher_options(self, index: int) -> dict[str, Any]:
        """Teacher ``index``'s own model options (None: the model's default); instructions not
        given for the teachers are the student's, since both encode the same task."""
        def own(value: Any) -> Any:
            return value[index] if isinstance(value, list) else value

        return {"max_text_length": own(self.teacher_max_text_length),
                "matryoshka_dim": own(self.teacher_matryoshka_dim),
                "query_instruction": self.teacher_query_instruction or self.query_instruction,
                "document_instruction": self.teacher_document_instruction or self.document_instruction}

    @property
    def loss_types(self) -> list[str]:
        """``distillation_loss_type`` as a list."""
        t = self.distillation_loss_type
        return [t] if isinstance(t, str) else list(t)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.use_distillation and not self.teachers:
            problems.append(("teacher_model_name_or_path", "teacher_model_name_or_path is empty; name a "
                             "teacher model or set use_distillation: false"))
        if self.teacher_weights is not None and self.teachers:
            if len(self.teacher_weights) != len(self.teachers):
                problems.append(("teacher_weights", f"teacher_weights = {self.teacher_weights!r} has "
                                 f"{len(self.teacher_weights)} entries for {len(self.teachers)} teacher(s); "
                                 "give one weight per teacher"))
            elif not any(self.teacher_weights):
                problems.append(("teacher_weights", "teacher_weights are all 0; at least one must be > 0"))
        for key in ("teacher_max_text_length", "teacher_matryoshka_dim"):
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != len(self.teachers):
                problems.append((key, f"{key} = {value!r} has {len(value)} entries for {len(self.teachers)} "
                                 "teacher(s); give one value for every teacher, or one per teacher"))
        if self.train_modes:
            if not self.use_distillation or not self.teachers:
                problems.append(("train_modes", f"train_modes = {self.train_modes!r} needs a teacher to align "
                                 "to: set use_distillation: true and teacher_model_name_or_path"))
            elif self.teacher_mode == "ema":
                problems.append(("train_modes", "train_modes needs teacher_mode: frozen (an EMA copy of the "
                                 "student is not a teacher whose space a search could use)"))
            if len(set(self.train_modes)) != len(self.train_modes):
                problems.append(("train_modes", f"train_modes = {self.train_modes!r} lists a mode twice"))
            if not (self.mode_alignment_weight or self.mode_contrastive_weight or self.mode_kd_weight):
                problems.append(("mode_alignment_weight", "mode_alignment_weight, mode_contrastive_weight and "
                                 "mode_kd_weight are all 0: train_modes would train nothing; give one a weight > 0"))
        if self.use_distillation and not self.loss_types:
            problems.append(("distillation_loss_type", "distillation_loss_type is empty (accepted: one or "
                             f"more of {', '.join(LOSS_TYPES)})"))
        return problems


# --- overrides and files ---------------------------------------------------------------------------------


def parse_override_args(args: Sequence[str]) -> list[str]:
    """Collect ``key=value`` items from ``--set k=v``, ``--config_override k=v k2=v2`` and bare ``k=v``."""
    items: list[str] = []
    problems: list[str] = []
    expecting: str | None = None
    for token in args:
        flag, eq, rest = token.partition("=")
        if token in _OVERRIDE_FLAGS:
            expecting = token
        elif flag in _OVERRIDE_FLAGS and eq:
            items.append(rest)
            expecting = None
        elif token.startswith("-"):
            problems.append(f"unexpected argument {token!r}; give overrides as --set key=value "
                            "or --config_override key=value ...")
        else:
            items.append(token)
            expecting = None
    if expecting:
        problems.append(f"{expecting} needs a key=value after it, e.g. {expecting} epochs=3")
    for item in items:
        try:
            split_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return items


def split_override(item: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; the value stays a string until its field's type parses it."""
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError([f"{OVERRIDE_SOURCE} {item!r}: expected key=value, e.g. --set epochs=3"])
    return key.strip(), value.strip()


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """A validated copy of ``config`` with ``key=value`` overrides applied (later ones win)."""
    data = dataclasses.asdict(config)  # type: ignore[call-overload]
    pairs = [split_override(item) for item in parse_override_args(overrides)]
    data.update(pairs)
    return from_dict(type(config), data, "config", {key: OVERRIDE_SOURCE for key, _ in pairs})


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                cls: type[T] = DistillConfig) -> T:  # type: ignore[assignment]
    """Defaults, then the YAML file at ``path`` (if any), then overrides in order; validated."""
    pairs = [split_override(item) for item in parse_override_args(overrides)]
    data = {} if path is None else read_yaml(path)
    data.update(pairs)
    return from_dict(cls, data, "config" if path is None else path, {key: OVERRIDE_SOURCE for key, _ in pairs})


def load_config_for_cli(path: str | Path | None, overrides: Sequence[str] = (),
                        cls: type[T] = DistillConfig) -> T:  # type: ignore[assignment]
    """``load_config`` for click commands: problems become a ``click.UsageError`` (exit status 2)."""
    import click  # only the CLI needs it

    try:
        return load_config(path, overrides, cls)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, which plain YAML loading resolves silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):  # other keys are reported as unknown anyway
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; unreadable, invalid or non-mapping files are ``ConfigError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})"]) from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of key: value, not {type(data).__name__}"])
    return data
