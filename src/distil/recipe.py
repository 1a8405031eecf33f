"""Recipes: pydantic models, one per section, every field defaulted, unknown keys rejected.

A recipe names data, teacher, student, distillation terms and training settings. Config stops
here: builders turn it into flat typed arguments (`TrainConfig`, loss-term constructors,
model factories). YAML is read with `safe_load` only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from distil.errors import DistilError, RecipeError, did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSection(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0)
    patience: int | None = Field(None, ge=1)


class DataSection(_Section):
    source: str = "mnist1d"
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the source function
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # used only when the source has no test split


class ModelSection(BaseModel):
    """`model` is a zoo name or 'package.module:factory'; any other key is a knob of that factory."""

    model_config = ConfigDict(extra="allow")
    model: str = "mlp"
    checkpoint: str | None = None  # load these weights instead of training (teacher only)
    train: TrainSection = Field(default_factory=TrainSection)

    def knobs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DistillSection(_Section):
    terms: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"kind": "kd", "weight": 0.9, "T": 4.0}, {"kind": "ce", "weight": 0.1}])
    use_transfer: bool = True  # add the source's unlabeled transfer set to the training split


class CompressSection(_Section):
    """Prune a model of the run, then fine-tune it with the unpruned model as its teacher."""

    enabled: bool = False
    source: Literal["teacher", "student"] = "teacher"
    method: Literal["channels", "magnitude"] = "channels"  # structured (torch-pruning) | unstructured
    ratio: float = Field(0.5, gt=0, lt=1)  # channels removed / sparsity / MACs kept (target: macs)
    target: Literal["channels", "macs"] = "channels"
    importance: Literal["l1", "l2", "taylor"] = "l2"
    scope: Literal["global", "layer"] = "global"  # magnitude pruning only
    steps: int = Field(1, ge=1)  # channel pruning in steps, with a short fine-tune between
    exclude: list[str] = Field(default_factory=list)  # module names never pruned
    compare_labels_only: bool = True  # also fine-tune a copy on labels alone, for the report
    finetune: TrainSection = Field(default_factory=lambda: TrainSection(epochs=10))


class ExportSection(_Section):
    """ONNX export (fp32, parity-checked) of every model, and int8 forms of `quantize`."""

    enabled: bool = False
    quantize: list[str] = Field(default_factory=lambda: ["student"])  # e.g. [student, teacher-pruned]
    quantization: Literal["auto", "static", "dynamic"] = "auto"  # auto: static for conv nets, else dynamic
    # static: one weight scale per output channel instead of per tensor. Off by default: on the digits
    # CNN of tests/test_export.py per-channel agreed with fp32 on 93% of the test set, per-tensor on 99%
    per_channel: bool = False
    calibration_samples: int = Field(512, ge=0)
    parity_atol: float = Field(1e-4, gt=0)
    # where int8 loses more than qat_threshold of validation accuracy against fp32, fine-tune with
    # fake quantization, distilling from the model's teacher, then quantize again
    qat: bool = True
    qat_threshold: float = Field(0.01, ge=0)
    qat_finetune: TrainSection = Field(default_factory=lambda: TrainSection(epochs=3, lr=1e-4))


class ReportSection(_Section):
    latency_runs: int = Field(50, ge=50)  # batch-1 latency: median of this many runs after warm-up
    throughput_batch: int = Field(256, ge=1)
    threads: int | None = Field(1, ge=1)  # for every timing in the report; None = all cores. 1 is stable
    #                                       and close to one core of an edge device; `distil bench` shows both


class Recipe(_Section):
    name: str = "run"
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    teacher: ModelSection = Field(default_factory=lambda: ModelSection(model="cnn1d"))
    student: ModelSection = Field(default_factory=ModelSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    compress: CompressSection = Field(default_factory=CompressSection)
    export: ExportSection = Field(default_factory=ExportSection)
    report: ReportSection = Field(default_factory=ReportSection)


def load_recipe(source: str | Path | dict, where: str = "recipe") -> Recipe:
    """Read a YAML file (or a dict from `where`), validate every section, and check the names it refers to."""
    if isinstance(source, dict):
        raw = source
    else:
        raw, where = _read_yaml(Path(source)), str(source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{where}: " + _explain(err)) from None
    check_references(recipe)
    return recipe


def read_recipe(path: str | Path) -> dict:
    """The raw mapping of a recipe file, unvalidated (see `load_recipe`)."""
    return _read_yaml(Path(path))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `dotted.path=value` overrides (value parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}' must look like field.path=value, e.g. student.train.epochs=5")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}': '{part}' is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DistilError(f"recipe file not found: {path}. Ready recipes are in recipes/ (e.g. recipes/mnist1d.yaml).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of sections (data, teacher, student, ...), got {type(raw).__name__}")
    return raw


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(Recipe, e["loc"][:-1])
            lines.append(f"unknown key '{loc}'." + did_you_mean(str(e["loc"][-1]), allowed))
        else:
            lines.append(f"'{loc}': {e['msg']} (got {e.get('input')!r})")
    return " ".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def bind_kwargs(fn, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate `kwargs` against `fn`'s signature (names and annotated types) and return them coerced.

    An unknown name or a wrong type raises `RecipeError` naming `where` and the allowed names.
    """
    sig = inspect.signature(fn, eval_str=True)
    skip = {"self", "input_shape", "num_classes"}
    params = {n: p for n, p in sig.parameters.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL,)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    fields = {n: (Any if p.annotation is p.empty else p.annotation, ... if p.default is p.empty else p.default)
              for n, p in params.items()}
    model = create_model(f"{getattr(fn, '__name__', 'options')}_options", __config__=ConfigDict(extra="forbid"), **fields)
    try:
        validated = model.model_validate(kwargs)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                allowed = f"allowed: {sorted(fields)}" if fields else "it takes no options"
                problems.append(f"unknown option '{name}' ({allowed})." + (did_you_mean(name, fields) if fields else ""))
            else:
                problems.append(f"'{name}': {e['msg']} (got {e.get('input')!r})")
        raise RecipeError(f"{where}: " + " ".join(problems)) from None
    return {k: getattr(validated, k) for k in kwargs}


def check_references(recipe: Recipe) -> None:
    """Check what the schema cannot: source, model and loss names and their options."""
    from distil.data import SOURCES
    from distil.losses import LOSSES
    from distil.models import MODELS, resolve_factory

    if recipe.data.source not in SOURCES:
        raise RecipeError(f"data.source: unknown source '{recipe.data.source}'." + did_you_mean(recipe.data.source, SOURCES))
    bind_kwargs(SOURCES[recipe.data.source], recipe.data.args, "data.args")
    for role in ("teacher", "student"):
        section: ModelSection = getattr(recipe, role)
        if section.model in MODELS:
            bind_kwargs(resolve_factory(section.model), section.knobs(), f"{role} (model '{section.model}')")
    names = ["teacher", "baseline", "student"]
    if recipe.compress.enabled:
        names += [f"{recipe.compress.source}-pruned", f"{recipe.compress.source}-pruned-labels"]
    for name in recipe.export.quantize if recipe.export.enabled else []:
        if name not in names:
            raise RecipeError(f"export.quantize: this run has no model '{name}' (it has {names})."
                              + did_you_mean(name, names))
    if recipe.export.enabled and recipe.export.quantize and recipe.export.quantization != "dynamic" \
            and recipe.export.calibration_samples == 0:
        raise RecipeError("export.calibration_samples is 0: static quantization needs a calibration set. "
                          "Set it to e.g. 512, or export.quantization: dynamic.")
    for i, term in enumerate(recipe.distill.terms):
        kind = term.get("kind")
        if kind not in LOSSES:
            raise RecipeError(f"distill.terms[{i}].kind: unknown loss '{kind}'." + did_you_mean(str(kind), LOSSES))
        bind_kwargs(LOSSES[kind], {k: v for k, v in term.items() if k != "kind"}, f"distill.terms[{i}] ({kind})")


def build_terms(specs: list[dict[str, Any]]) -> list:
    """Recipe terms -> loss modules, e.g. {kind: kd, weight: 0.9, T: 4} -> KD(T=4.0, weight=0.9)."""
    from distil.losses import LOSSES

    terms = []
    for i, spec in enumerate(specs):
        cls = LOSSES[spec["kind"]]
        terms.append(cls(**bind_kwargs(cls, {k: v for k, v in spec.items() if k != "kind"}, f"distill.terms[{i}]")))
    return terms


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, every default written out, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
