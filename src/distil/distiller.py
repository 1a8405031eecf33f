"""Tasks: what one training step computes.

`ClassificationTask` (teacher, baseline, fine-tune) and `Distiller` (a student learning from one
or more frozen teachers) both give `forward(batch, progress) -> StepOutput(loss, parts, outputs)`,
so the one training loop `fit` never knows which method runs. `parts` holds each weighted term by
its unique name and `loss == sum(parts.values())`. The task owns its validation metric (`score`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from distil.batches import Batch, Progress
from distil.cache import TeacherCache, cache_keys, top_k_pack, top_k_unpack
from distil.checkpoint import save_tensors
from distil.data import Split
from distil.errors import ConfigError, DataError, ModelError
from distil.evaluate import model_device
from distil.losses import CE, KD, STUDENT, UNLABELED, Outputs, Term, Views, ce_loss
from distil.taps import FeatureTaps, is_tap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # scalar, what is minimised
    parts: dict[str, torch.Tensor]  # each weighted term by name; they sum to `loss`
    outputs: torch.Tensor  # (B, K) logits of the model being trained


class Task(Protocol):
    """What `fit` trains. `metric` names the validation score (higher is better when `higher_is_better`)."""

    metric: str
    higher_is_better: bool

    def prepare(self, batch: Batch) -> None: ...
    def forward(self, batch: Batch, progress: Progress) -> StepOutput: ...
    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]: ...
    def check_targets(self, targets: torch.Tensor) -> None: ...
    def trainable_module(self) -> nn.Module: ...
    def to(self, device: torch.device) -> Task: ...
    # mode: only passed for compile: reduce-overhead; may return what undoes its setup when the fit ends
    def compile(self, mode: str | None = None) -> Callable[[], None] | None: ...


def top1_score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, labelled) counts of a batch, as tensors on its device: summed over batches without a host sync."""
    labelled = targets != UNLABELED
    return ((logits.argmax(-1) == targets) & labelled).sum(), labelled.sum()


def bits_score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, tokens) of a batch of next-token logits (B, T, V) and targets (B, T) (-1 = no loss): the summed
    cross-entropy in bits over the real tokens, and their count. With byte-level tokens, bits per byte."""
    real = targets != UNLABELED
    nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=UNLABELED, reduction="sum")
    return nats / math.log(2), real.sum()


@dataclass(frozen=True)
class Scoring:
    """A validation metric: its name, its direction and `fn(logits, targets) -> (sum, count)` per batch
    (the metric is sum / count over the split)."""

    metric: str
    higher_is_better: bool
    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


TOP1 = Scoring("acc", True, top1_score)
BITS_PER_BYTE = Scoring("bpb", False, bits_score)  # byte-level language models: lower is better
FEATURE_CACHE_MB = 2048.0  # MB of teacher features (all teachers together) precomputed for a split, at most


def scoring_for(task: str) -> Scoring:
    """The metric of a data set's task: top-1 for "classify", bits per byte for "lm"."""
    return BITS_PER_BYTE if task == "lm" else TOP1


def check_class_targets(targets: torch.Tensor, num_classes: int, allow_unlabeled: bool) -> None:
    """Targets must lie in [0, K) (or be -1 where unlabeled samples are allowed): a clear error instead of
    torch's IndexError (or a device-side assert on a GPU)."""
    low = UNLABELED if allow_unlabeled else 0
    bad = (targets < low) | (targets >= num_classes)
    if bool(bad.any()):
        value, where = int(targets[bad][0]), int(bad.nonzero()[0, 0])
        unlabeled = " or -1 (unlabeled)" if allow_unlabeled else ""
        fix = f"build the model with num_classes={value + 1}" if value >= num_classes else "map them to 0..K-1"
        raise DataError(f"label {value} (sample {where}) is outside the model's {num_classes} classes: labels must "
                        f"be 0..{num_classes - 1}{unlabeled}. Check the labels, or {fix}.")


class ClassificationTask:
    """Plain supervised training: `loss = CE(model(x), y)` with optional label smoothing; scored by top-1
    (or by `scoring`: bits per byte for a language model, whose CE is per token)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, scoring: Scoring = TOP1) -> None:
        self.model, self.label_smoothing, self.scoring = model, label_smoothing, scoring
        self.metric, self.higher_is_better = scoring.metric, scoring.higher_is_better
        self.num_classes: int | None = None

    def prepare(self, batch: Batch) -> None:
        with torch.no_grad():
            was_training = self.model.training
            self.num_classes = self.model.eval()(batch.inputs).shape[-1]
            self.model.train(was_training)
        self.check_targets(batch.targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        if self.num_classes is not None:  # -1 marks an unlabeled sample: it adds nothing to the loss
            check_class_targets(targets, self.num_classes, allow_unlabeled=True)

    def forward(self, batch: Batch, progress: Progress | None = None) -> StepOutput:
        logits, loss = self._logits_and_loss(batch.inputs, batch.targets)
        return StepOutput(loss, {"ce": loss}, logits)

    def _logits_and_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(inputs)
        return logits, ce_loss(logits, targets, self.label_smoothing)

    __call__ = forward

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring.fn(self.model(batch.inputs), batch.targets)

    def trainable_module(self) -> nn.Module:
        return self.model

    def to(self, device: torch.device) -> ClassificationTask:
        self.model.to(device)
        return self

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the training step's forward, the model and its loss as one graph (the model itself, its
        weights and state_dict keys stay as they are); `mode` is torch.compile's (None: its default)."""
        self._logits_and_loss = torch.compile(self._logits_and_loss, mode=mode)


class Distiller(nn.Module):
    """A student learning from frozen teachers through weighted loss terms.

        Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1),
                                     FitNet(student="layer2", teacher="layer3", weight=1.0)])
        Distiller(student, {"big": t1, "ta": t2}, [KD(T=4, weight=0.5, teacher="big"),
                                                   KD(T=4, weight=0.4, teacher="ta"), CE(weight=0.1)])

    The trainable part is this module: the student plus the terms' connectors. Teachers are not
    registered as submodules: they never train, never enter `state_dict`, and stay in eval mode
    whatever `train()` is called with. `to(device)` moves them too.

    A frozen teacher's BatchNorm layers are constants, so with `fold_bn` (the default) each step runs a copy
    of the teacher with every BatchNorm folded into the convolution or linear layer before it (`fold_batchnorm`):
    the same outputs to float rounding (checked on the first batch), one operation fewer per pair (8-23% off
    the demo's small CNN teacher on a CPU, nothing measurable on a ResNet there: `benchmarks/fold.py`). A
    teacher whose layers a term taps runs as it is, and so does one
    that cannot be traced by torch.fx or carries hooks of yours. The copy is made at the teacher's first
    forward pass (a teacher whose outputs are all cached is never copied) and made again at the next `fit`
    if the teacher's weights, device or dtype changed; within one `fit`, teachers must not change. Other
    Distillers of the same unchanged teacher (a sweep's trials) share the copy. It doubles that teacher's
    memory, for as long as the teacher lives; `fold_bn=False` (recipe: `distill.fold_bn: false`) turns it off.
    """

    def __init__(self, student: nn.Module, teachers: nn.Module | dict[str, nn.Module], terms: list[Term],
                 scoring: Scoring = TOP1, fold_bn: bool = True) -> None:
        super().__init__()
        self.scoring = scoring
        self.metric, self.higher_is_better = scoring.metric, scoring.higher_is_better
        teachers = {"teacher": teachers} if isinstance(teachers, nn.Module) else dict(teachers)
        _check_participants(student, teachers, terms)
        self.student = student
        self.terms = nn.ModuleList(terms)
        self._teachers = tuple(teachers.items())  # a tuple: not registered as submodules
        for teacher in teachers.values():
            teacher.eval().requires_grad_(False)
        reads = [term.reads() for term in terms]
        self._term_teacher = [_resolve_teacher(r.teacher, teachers) if r.needs_teacher else None for r in reads]
        self.student_taps = FeatureTaps(student, sorted({n for r in reads for n in r.student_layers}), STUDENT)
        self.teacher_taps = {name: FeatureTaps(model, sorted({n for r, t in zip(reads, self._term_teacher)
                                                              if t == name for n in r.teacher_layers}), name)
                             for name, model in teachers.items()}
        ensembles = [_resolve_ensemble(r.ensemble, teachers) for r in reads if r.ensemble is not None]
        read = set(self._term_teacher).union(*ensembles)
        self.needed = [name for name in teachers if name in read]  # teachers run each step
        # where each teacher's cached features of each tapped layer sit in a batch: layer -> "teacher/layer"
        self._feature_keys = {name: tuple((layer, feature_key(name, layer)) for layer in taps.modules)
                              for name, taps in self.teacher_taps.items()}  # pairs: torch.compile iterates them
        self._teacher_map = MappingProxyType(dict(teachers))  # read at every step; not registered either
        # what runs of each teacher, chosen at its first forward pass (`_runner`): the teacher itself, or a copy
        # with its BatchNorm folded in. A teacher whose outputs are all cached never runs, and is never copied.
        self._fold_bn = fold_bn
        self._runners: dict[str, nn.Module] = {}
        self._built_from: dict[str, tuple] = {}  # each runner's teacher, as it was when the runner was made
        self.num_classes: int | None = None
        self.cache_events: dict[str, dict] = {}
        self._packed: dict[str, int] = {}  # teachers whose cached per-token top-k stay packed: name -> vocabulary

    @property
    def teachers(self) -> dict[str, nn.Module]:
        return dict(self._teachers)

    @property
    def teacher(self) -> nn.Module:
        """The only teacher (an error when there are several: use `teachers[name]`)."""
        if len(self._teachers) != 1:
            raise ModelError(f"this Distiller has {len(self._teachers)} teachers: use .teachers[name]")
        return self._teachers[0][1]

    def _frozen(self) -> list[nn.Module]:
        """The teachers and their folded copies, each once."""
        models = [teacher for _, teacher in self._teachers]
        return models + [runner for runner in self._runners.values() if all(runner is not m for m in models)]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for model in self._frozen():
            model.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        """`to`, `cuda`, `cpu`, `double`, `half`... reach the teachers too (they are not submodules)."""
        super()._apply(fn, recurse)
        for model in self._frozen():
            model._apply(fn, recurse)
        return self

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the training step's forward as one graph: the student, what runs of the teachers and
        every loss term, so the terms' small operations (softmaxes, KL) fuse with the student's into a few
        kernels, forward and backward (state_dict keys stay the same; `score`, `prepare` and
        `with_teacher_logits` run as they are). `mode` is torch.compile's: "reduce-overhead" also replays
        each step's kernels as CUDA graphs on a GPU. The feature taps' hooks are held until the fit ends (the
        call this returns, which `fit` makes; they record nothing outside a step), so that tapping layers does not
        break the graph."""
        taps = [t for t in (self.student_taps, *self.teacher_taps.values()) if t.modules]
        for t in taps:
            t.hold()
        super().compile(mode=mode)

        def release() -> None:  # the models are the user's again: no hooks of ours left on them
            for t in taps:
                t.release()

        return release

    def _runner(self, name: str, inputs: torch.Tensor, keep: bool = True) -> nn.Module:
        """What runs of teacher `name`: at its first forward pass, a copy with its BatchNorm folded in
        (`fold_batchnorm`) if that gives the teacher's outputs on `inputs` to float rounding, else the
        teacher itself (also when `fold_bn` is off or a term taps its layers). `keep`: hold it for the steps
        to come (with_teacher_logits uses one and lets it go)."""
        runner = self._runners.get(name)
        if runner is None:
            runner = teacher = self._teacher_map[name]
            if self._fold_bn and not self.teacher_taps[name].modules:
                runner = _folded(name, teacher, inputs, remember=keep)
            if keep:
                self._runners[name], self._built_from[name] = runner, weights_signature(teacher)
        return runner

    def _drop_stale_runners(self) -> None:
        """Forget a folded copy whose teacher changed since it was made (new weights, device or dtype): the
        next forward pass folds the teacher as it is now. Called once per fit, by `prepare`."""
        for name, teacher in self._teachers:
            if name in self._runners and self._built_from.get(name) != weights_signature(teacher):
                del self._runners[name]

    def prepare(self, batch: Batch) -> None:
        """Dry-run one batch: check class counts agree and build connectors from feature shapes."""
        was_training = self.training
        self.eval()
        self._drop_stale_runners()
        with torch.no_grad():
            # the batch's cached teacher outputs, if any, stand in for the teachers here as in training
            views = self._views(Batch(batch.inputs, torch.zeros_like(batch.targets), batch.index,
                                      teacher_logits=batch.teacher_logits))
        self.train(was_training)
        self.num_classes = student_k = views.student.logits.shape[-1]
        for name in self.needed:
            teacher_k = views.outputs[name].logits.shape[-1]
            if teacher_k != student_k:
                raise ModelError(
                    f"teacher and student disagree on the number of classes: teacher '{name}' gives {teacher_k} "
                    f"logits, student gives {student_k}. Build both for the same data (same num_classes).")
        for term in self.terms:
            term.build(views)
        self.check_targets(batch.targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        if self.num_classes is not None:
            check_class_targets(targets, self.num_classes, allow_unlabeled=True)

    def _views(self, batch: Batch, progress: Progress | None = None) -> Views:
        outputs = {STUDENT: Outputs(_tapped(self.student, self.student_taps, batch.inputs), self.student_taps.outputs)}
        teachers = self._teacher_map
        for name in self.needed:
            taps, keys, stored = self.teacher_taps[name], self._feature_keys[name], batch.teacher_logits
            if name in stored and all(key in stored for _, key in keys):
                logits = stored[name]
                if name in self._packed:  # per-token top-k, stored packed: (B, T, 2k+1) -> (B, T, V)
                    logits = top_k_unpack(logits, self._packed[name])
                elif logits.dim() == 3 and logits.shape[-1] != outputs[STUDENT].logits.shape[-1]:
                    raise DataError(
                        f"the cached logits of teacher '{name}' hold {logits.shape[-1]} values per position, the "
                        f"student's vocabulary {outputs[STUDENT].logits.shape[-1]}: they are top-k logits packed by "
                        "another Distiller's with_teacher_logits. Call with_teacher_logits on this Distiller (with a "
                        "TeacherCache the logits are read back, not recomputed).")
                outputs[name] = Outputs(logits, {layer: stored[key] for layer, key in keys})
                continue
            with torch.no_grad():
                outputs[name] = Outputs(_tapped(self._runner(name, batch.inputs), taps, batch.inputs), taps.outputs)
        return Views(outputs, batch.targets, tuple(teachers), batch.index, batch.mask, progress or Progress())

    def with_teacher_logits(self, split: Split, batch_size: int = 1024, cache: TeacherCache | None = None,
                            top_k: int | None = None, max_feature_mb: float = FEATURE_CACHE_MB) -> Split:
        """`split` with each teacher's outputs precomputed, so training skips the teachers' forward passes.

        The logits go under the teacher's name in `Split.teacher_logits`, and the features that feature terms
        read under `feature_key(teacher, layer)` ("teacher/layer3"), all (N, ...) per sample. Exact because
        teachers are frozen in eval mode and the inputs are fixed tensors: never use it with random
        augmentation. A teacher whose features would take the features of all teachers over `max_feature_mb`
        still runs each step (`cache_events` says why). With a `cache`, each output is read from (or stored in)
        it, keyed by the teacher's weights, the inputs and what was computed; `cache_events` then says, per
        teacher, whether they were reused or built. With `top_k`, only each sample's k largest logits and the
        rest's total mass are kept (`distil.cache.top_k_pack`); the other classes share that mass equally when
        the targets are rebuilt. The teachers run here (on a cache miss) as in training, BatchNorm folded.
        """
        cached, self.cache_events, self._packed = {}, {}, {}
        feature_total = 0.0  # MB of features cached so far, over the teachers
        for name in self.needed:
            teacher, taps = self.teachers[name], self.teacher_taps[name]
            shapes = output_shapes(teacher, taps, split)  # "": (K,), or (T, V) per token; each layer: (C, ...)
            shape, layers = shapes.pop(""), shapes
            if len(shape) == 2 and top_k is None:  # per-token logits: N * T * V floats, e.g. 2 GB for 2 MB of text
                self.cache_events[name] = {"status": "online", "top_k": None, "reason": (
                    f"per-token logits of {len(split):,} x {shape[0]} x {shape[1]} floats "
                    f"({len(split) * shape[0] * shape[1] * 4 / 2**30:.1f} GiB) are not precomputed; "
                    "distill.top_k would store each token's k likeliest, an approximation of the targets")}
                continue
            feature_mb = len(split) * sum(math.prod(s) for s in layers.values()) * 4 / 2**20
            if feature_total + feature_mb > max_feature_mb:
                self.cache_events[name] = {"status": "online", "top_k": top_k, "reason": (
                    f"the features of {', '.join(layers)} for {len(split):,} samples would take {feature_mb:,.0f} MB, "
                    f"and the limit for all teachers' features is {max_feature_mb:,.0f} MB "
                    f"({feature_total:,.0f} taken; distill.max_feature_mb)")}
                continue
            feature_total += feature_mb
            classes = shape[-1]
            if top_k is not None and not 1 <= top_k <= classes:
                raise ConfigError(f"top_k={top_k}: keep between 1 and the {classes} classes of teacher '{name}'")
            pack = (lambda logits: logits) if top_k is None else (lambda logits: top_k_pack(logits, top_k))
            # computed once, at the first read (a cache miss), by the folded copy when there is one
            outputs = _TeacherOutputs(functools.partial(self._runner, name, keep=False), model_device(teacher), taps,
                                      split.x, batch_size, pack)
            whats = {"": "logits" if top_k is None else f"top{top_k}", **{t: f"features:{t}" for t in layers}}
            if cache is None:
                values = {part: outputs[part] for part in whats}
            else:
                keys = cache_keys(teacher, split.x, list(whats.values()))
                values, statuses = {}, []
                for part, key in zip(whats, keys):
                    values[part] = cache.get(key, functools.partial(outputs.__getitem__, part))
                    statuses.append(cache.last_event)
                built = [status for status in statuses if status != "reused"]
                self.cache_events[name] = {"key": keys[0], "status": built[0] if built else "reused", "top_k": top_k,
                                           **({"features": list(layers)} if layers else {})}
            logits = values.pop("")
            if top_k is not None and len(shape) == 2:
                cached[name], self._packed[name] = logits, classes  # unpacked per batch: (B, T, 2k+1) -> (B, T, V)
            else:
                cached[name] = logits if top_k is None else top_k_unpack(logits, classes)
            cached.update({feature_key(name, layer): features for layer, features in values.items()})
        return Split(split.x, split.y, {**(split.teacher_logits or {}), **cached}) if cached else split

    def forward(self, batch: Batch, progress: Progress | None = None) -> StepOutput:
        """One step; a teacher's cached logits (and features) in `batch.teacher_logits` replace its forward pass."""
        views = self._views(batch, progress)
        parts = {term.name: term.weight * term(views) for term in self.terms}
        loss = functools.reduce(operator.add, parts.values())
        return StepOutput(loss, parts, views.student.logits)

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring.fn(self.student(batch.inputs), batch.targets)

    def trainable_module(self) -> nn.Module:
        return self

    def save_connectors(self, path) -> None:
        """Write the connectors (training-only parts) to their own file, apart from the student."""
        save_tensors(path, {k: v for k, v in self.terms.state_dict().items()})


def _tapped(model: nn.Module, taps: FeatureTaps, inputs: torch.Tensor) -> torch.Tensor:
    """`model(inputs)` with `taps` recording its layers (a plain call when it taps none). Started and stopped
    rather than entered: torch.compile cannot enter a context of ours, and with the hooks held (`compile`)
    the whole step stays one graph."""
    if not taps.modules:
        return model(inputs)
    taps.start()
    try:
        return model(inputs)
    finally:
        taps.stop()


# Each teacher's folded copy, shared by every Distiller of that teacher while its weights stay as they were (a
# sweep's trials, an experiment's seeds): folded and checked once, and one module, so that a compiled training
# step is not compiled again for every Distiller (torch.fx makes a new class for each copy, and torch.compile
# compiles a step again for each class it meets, up to its recompile limit, then runs the step uncompiled).
# The copy lives as long as its teacher (keys are weak; a copy holds no reference to its teacher).
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _folded(name: str, teacher: nn.Module, inputs: torch.Tensor, remember: bool = True) -> nn.Module:
    """Teacher `name` with its BatchNorm folded in (`fold_batchnorm`), the copy made for it before if its weights
    are unchanged; the teacher itself where folding gives other outputs on `inputs` or folds nothing. A copy
    made with `remember` off (one pass to fill a cache) is not kept for later Distillers."""
    signature = weights_signature(teacher)
    known = _FOLDED.get(teacher)
    if known is not None and known[0] == signature:
        return known[1]
    folded = fold_batchnorm(teacher)
    if folded is teacher:
        return teacher
    if not same_outputs(folded, teacher, inputs):
        log.warning("teacher '%s' with its BatchNorm folded gives other outputs than the teacher itself: running it "
                    "unfolded", name)
        return teacher
    if remember:
        _FOLDED[teacher] = (signature, folded)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode `model` with each BatchNorm folded into the Conv or Linear layer that feeds it
    alone (torch.fx's `fuse`), frozen and in eval mode; `model` itself when it has no BatchNorm to fold or
    torch.fx cannot trace it."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if any(not is_tap(hook) for m in model.modules() for hook in (*m._forward_hooks.values(),
                                                                  *m._forward_pre_hooks.values())):
        return model  # hooks of the user's on its modules would not fire on the traced copy (distil's held taps
        #               record nothing outside their Distiller's step)
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model.eval())
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # untraceable forward (data-dependent control flow, ...): run the model as it is
        log.info("cannot fold the BatchNorm of %s (%s): it runs unfolded", type(model).__name__, err)
        return model
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if norms == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model  # nothing folded (no conv -> BN pair): keep the original, no copy
    for m in folded.modules():  # the copy carries no taps of another Distiller's (nor, through them, its model)
        for key in [k for k, hook in m._forward_hooks.items() if is_tap(hook)]:
            del m._forward_hooks[key]
    return folded.eval().requires_grad_(False)


def same_outputs(folded: nn.Module, model: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether `folded` gives `model`'s outputs on `inputs` to float rounding (full fp32 precision: no autocast
    and no TF32, whose 10-bit products alone differ by ~1e-3 on a GPU; no gradients)."""
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False), no_tf32():
        a, b = folded(inputs).float(), model(inputs).float()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(b.abs().max())))


@contextlib.contextmanager
def no_tf32():
    """Plain fp32 matrix products and convolutions on CUDA within the block (TF32 off), then as they were."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def weights_signature(model: nn.Module) -> tuple:
    """What changes when a model's tensors do: each parameter's and buffer's storage, version counter (bumped by
    in-place writes such as load_state_dict and optimiser steps), dtype and device."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in itertools.chain(model.parameters(), model.buffers()))


def feature_key(teacher: str, layer: str) -> str:
    """Where a teacher's cached features of one layer sit in `Split.teacher_logits` and `Batch.teacher_logits`."""
    return f"{teacher}/{layer}"


def output_shapes(teacher: nn.Module, taps: FeatureTaps, split: Split) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of a teacher's outputs: "" its logits ((K,), or (T, V) per token for a language
    model), and each tapped layer's features."""
    device = model_device(teacher)
    with torch.no_grad(), taps:
        shapes = {"": tuple(teacher(split.x[:1].to(device)).shape[1:])}
    return shapes | {layer: tuple(features.shape[1:]) for layer, features in taps.outputs.items()}


class _TeacherOutputs:
    """A teacher's logits (packed by `pack`) and tapped features on `x`, computed in batches on `device` at the
    first read, then held on the CPU: `outputs[""]` (N, K), `outputs[layer]` (N, ...). `model_for(first_batch)`
    gives the model that computes them (the teacher, or its folded copy)."""

    def __init__(self, model_for: Callable[[torch.Tensor], nn.Module], device: torch.device, taps: FeatureTaps,
                 x: torch.Tensor, batch_size: int, pack: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model_for, self.device, self.taps, self.x = model_for, device, taps, x
        self.batch_size, self.pack = batch_size, pack
        self.values: dict[str, torch.Tensor] | None = None

    def __getitem__(self, part: str) -> torch.Tensor:
        if self.values is None:
            device, parts = self.device, {"": [], **{layer: [] for layer in self.taps.modules}}
            with torch.no_grad():  # not inference_mode: the outputs later enter autograd as targets
                model = self.model_for(self.x[:self.batch_size].to(device))
                for i in range(0, len(self.x), self.batch_size):
                    with self.taps:
                        parts[""].append(self.pack(model(self.x[i:i + self.batch_size].to(device))).cpu())
                    for layer, features in self.taps.outputs.items():
                        parts[layer].append(features.cpu())
            self.values = {name: torch.cat(chunks) for name, chunks in parts.items()}
        return self.values[part]


def _check_participants(student: nn.Module, teachers: dict[str, nn.Module], terms: list) -> None:
    if not terms:
        raise ConfigError("Distiller needs at least one loss term, e.g. [KD(T=4, weight=0.9), CE(weight=0.1)]")
    for i, term in enumerate(terms):
        if isinstance(term, Term) and not isinstance(term, nn.Module):
            raise ConfigError(f"term {i} ({type(term).__name__}) must be an nn.Module (subclass torch.nn.Module), so "
                              "that its connectors train, move to the device and save with the student.")
        if not isinstance(term, Term):
            raise ConfigError(f"term {i} ({type(term).__name__}) is not a loss term: it needs `name`, `weight`, "
                              "`reads()`, `build(views)` and `__call__(views)` (see distil.losses.Term).")
    if STUDENT in teachers:
        raise ConfigError(f"'{STUDENT}' names the model being trained; give the teacher another name.")
    for name, teacher in teachers.items():
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"teacher '{name}' is a {type(teacher).__name__}, not an nn.Module")
        if teacher is student:
            raise ConfigError(f"the student was passed as its own teacher ('{name}'): the teacher would be frozen "
                              "with it. Pass a copy: copy.deepcopy(student).")
    names = [term.name for term in terms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"two loss terms share the part name {twice}: each part is logged and summed by its name. "
                          "Give them different teachers or layers, or merge them into one term.")


def _resolve_teacher(name: str | None, teachers: dict[str, nn.Module]) -> str:
    if name is None:
        if len(teachers) != 1:
            raise ConfigError(f"a term needs a teacher but does not name one, and there are {len(teachers)} "
                              f"teachers ({list(teachers)}): pass teacher='<name>' to the term.")
        return next(iter(teachers))
    if name not in teachers:
        from distil.errors import did_you_mean

        raise ConfigError(f"a term reads teacher '{name}', which the Distiller does not have."
                          + did_you_mean(name, teachers))
    return name


def _resolve_ensemble(names: tuple[str, ...], teachers: dict[str, nn.Module]) -> set[str]:
    if not names:
        return set(teachers)
    unknown = [n for n in names if n not in teachers]
    if unknown:
        from distil.errors import did_you_mean

        raise ConfigError(f"a term reads teacher '{unknown[0]}', which the Distiller does not have."
                          + did_you_mean(unknown[0], teachers))
    return set(names)


def hinton_terms(T: float = 4.0, alpha: float = 0.9) -> list[nn.Module]:
    """Hinton's loss as terms: `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`."""
    return [KD(T=T, weight=alpha), CE(weight=1.0 - alpha)]
