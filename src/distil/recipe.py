"""Recipes: pydantic models, one per section, every field defaulted, unknown keys rejected.

A recipe names data, teacher, student, distillation terms and training settings. This module is
the schema alone (it imports nothing else of distil but its errors); `distil.build` checks the
names a recipe refers to and turns it into objects. YAML is read with `safe_load` only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distil.errors import DistilError, RecipeError, did_you_mean

COMPILE_MODES = ("default", "reduce-overhead")  # torch.compile's modes that `compile` takes (true = "default")
# the strings pydantic reads as a bool
_TRUE, _FALSE = {"true", "yes", "on", "1", "t", "y"}, {"false", "no", "off", "0", "f", "n"}


class _Section(BaseModel):
    # inf and nan are never a sensible setting (`lr: .inf` would only surface later as a NaN loss)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainConfig(_Section):
    """How one model trains: optimiser, schedule, batches. The recipe's `train:` sections and `fit`'s config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = True  # SGD only
    schedule: Literal["cosine", "step", "multistep", "onecycle", "constant"] = "cosine"
    step_size: int = Field(30, ge=1)  # epochs between decays, "step" only
    milestones: list[int] = Field(default_factory=list)  # epochs at which lr *= gamma, "multistep" only
    gamma: float = Field(0.1, gt=0)
    patience: int | None = Field(None, ge=1)
    workers: int = Field(2, ge=0)  # DataLoader worker processes reading a Dataset source (image files); 0: the
    #                                main process. In-memory data (a Split) is batched by indexing and needs none


    @model_validator(mode="after")
    def _milestones_fit(self) -> TrainConfig:
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones: the epochs at which lr is multiplied by gamma, "
                             "e.g. milestones: [150, 180, 210]")
        if any(m < 1 for m in self.milestones):  # beyond `epochs` is allowed: a shortened run never reaches them
            raise ValueError(f"milestones {self.milestones} are epochs: each must be at least 1")
        return self


TrainSection = TrainConfig  # the recipe's name for it


class DataSection(_Section):
    source: str = "mnist1d"
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the source function
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # used only when the source has no test split
    # train-time image augmentation, in order, e.g. [{kind: random_crop, size: 32, padding: 4}, {kind: hflip}];
    # a `normalize` entry sets the normalisation of every split (else: per-channel train statistics)
    augment: list[dict[str, Any]] = Field(default_factory=list)


class ModelSection(BaseModel):
    """`model` is a zoo name or 'package.module:factory'; any other key is a knob of that factory."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = "mlp"
    checkpoint: str | None = None  # load these weights instead of training (teacher only)
    # use the weights the model's factory loads (an hf: model's own), instead of training (teacher only)
    pretrained: bool = False
    train: TrainSection = Field(default_factory=TrainSection)

    def knobs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DistillSection(_Section):
    terms: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"kind": "kd", "weight": 0.9, "T": 4.0}, {"kind": "ce", "weight": 0.1}],
        min_length=1)
    use_transfer: bool = True  # add the source's unlabeled transfer set to the training split
    # teacher logits computed once and kept on disk, reused by every run with the same teacher and data
    cache: bool = True
    cache_dir: str | None = None  # default $DISTIL_CACHE/teachers
    cache_memory_mb: float = Field(256.0, ge=0)  # entries up to this size are read into memory, larger ones mapped
    top_k: int | None = Field(None, ge=1)  # keep only each sample's k largest teacher logits (and the rest's mass)
    # teacher features (for feature terms) are cached up to this many MB for all teachers together
    max_feature_mb: float = Field(2048.0, ge=0)
    fold_bn: bool = True  # run frozen teachers with their BatchNorm folded into the layer before (same outputs)
    # language models: the fraction of steps on which the student writes its own continuation of the first
    # prompt_tokens of each block and learns from the teacher's scores of it (on-policy, GKD's lambda)
    on_policy: float = Field(0.0, ge=0, le=1)
    prompt_tokens: int = Field(32, ge=1)
    # language models: the student learns from the teacher's continuations of the first prompt_tokens of each
    # block instead of the corpus's text (sequence-level KD, Kim & Rush 2016; `distil.seqkd`), sampled at
    # sequence_temperature (1: the teacher's distribution; 0: greedy)
    sequence_kd: bool = False
    sequence_temperature: float = Field(1.0, ge=0)


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
    # the verdict names the smallest and the fastest model whose test accuracy is within this of the teacher's
    # (a fraction: 0.01 is one point); warnings use it for int8 and pruned models too
    tolerance: float = Field(0.01, ge=0, lt=1)


class SchemesSection(_Section):
    """Training schemes beside the plain distillation; each adds its models to the report."""

    # more teachers by name, trained like `teacher` (or loaded from their checkpoint); terms read them by name,
    # e.g. {kind: kd, teacher: big} or {kind: multi_kd, combine: confidence}
    teachers: dict[str, ModelSection] = Field(default_factory=dict)
    assistants: list[ModelSection] = Field(default_factory=list)  # TAKD: teacher -> ta-1 -> ... -> student-takd
    born_again: int = Field(0, ge=0)  # generations of the teacher's architecture, each taught by the one before
    mutual: list[ModelSection] = Field(default_factory=list)  # peers that learn together with a fresh student (DML)
    mutual_T: float = Field(1.0, gt=0)
    ema: bool = False  # a fresh student taught online by an exponential moving average of itself
    ema_decay: float = Field(0.99, gt=0, lt=1)  # 0.999 averages over ~1,000 steps: too slow for short runs


class Recipe(_Section):
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast (fp16 with loss scaling)
    # torch.compile each training step (student, teachers that run, loss terms) as one graph; "reduce-overhead"
    # also replays it as CUDA graphs on a GPU (for small models, whose steps are many small kernels)
    compile: bool | Literal[COMPILE_MODES] = False
    data: DataSection = Field(default_factory=DataSection)
    teacher: ModelSection = Field(default_factory=lambda: ModelSection(model="cnn1d"))
    student: ModelSection = Field(default_factory=ModelSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    schemes: SchemesSection = Field(default_factory=SchemesSection)
    compress: CompressSection = Field(default_factory=CompressSection)
    export: ExportSection = Field(default_factory=ExportSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:  # "true", "no"...: as pydantic reads a bool
            return value.lower() in _TRUE
        if value in (True, False, *COMPILE_MODES):
            return value
        raise ValueError("compile must be true, false, 'default' or 'reduce-overhead' (which also replays each step "
                         "as CUDA graphs on a GPU)")


def parse_recipe(source: str | Path | dict, where: str = "recipe") -> Recipe:
    """Read a YAML file (or a dict from `where`) and validate its schema. `distil.build.load_recipe` also checks
    the names it refers to (sources, models, losses)."""
    if isinstance(source, dict):
        raw = source
    else:
        raw, where = _read_yaml(Path(source)), str(source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{where}: " + _explain(err)) from None


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
        raise RecipeError(f"{path} must hold a mapping of sections (data, teacher, student, ...), "
                          f"got {type(raw).__name__}")
    return raw


HINTS = {  # what to do, after pydantic's message for a field
    "distill.terms": ". Give at least one loss term, e.g. [{kind: kd, T: 4, weight: 0.9}, {kind: ce, weight: 0.1}]"}


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(Recipe, e["loc"][:-1])
            lines.append(f"unknown key '{loc}'." + did_you_mean(str(e["loc"][-1]), allowed))
        else:
            message = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            lines.append(f"'{loc}': {message} (got {e.get('input')!r})" + HINTS.get(loc, ""))
    return " ".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, every default written out, as YAML (but a mutual peer's `train`, which no stage
    reads: the peers train under student.train)."""
    written = recipe.model_dump(mode="json")
    for peer in written["schemes"]["mutual"]:
        del peer["train"]
    return yaml.safe_dump(written, sort_keys=False)
