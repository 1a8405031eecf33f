"""distil: knowledge distillation and model compression for PyTorch.

    from distil import Distiller, KD, CE, FitNet, fit, TrainConfig
    distiller = Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
    fit(distiller, train, val, TrainConfig(epochs=10))
"""

from distil.batches import Batch, EpochSampler, Progress
from distil.build import load_recipe
from distil.data import Split, Splits, load_splits
from distil.distiller import ClassificationTask, Distiller, StepOutput, Task, hinton_terms
from distil.errors import DistilError
from distil.evaluate import accuracy
from distil.losses import AT, CE, KD, LOSSES, FitNet, Outputs, Term, Views
from distil.models import MODELS, build_model
from distil.recipe import Recipe, TrainConfig
from distil.train import fit

__all__ = ["AT", "CE", "KD", "LOSSES", "MODELS", "Batch", "ClassificationTask", "DistilError", "Distiller",
           "EpochSampler", "FitNet", "Outputs", "Progress", "Recipe", "Split", "Splits", "StepOutput", "Task",
           "Term", "TrainConfig", "Views", "accuracy", "build_model", "fit", "hinton_terms", "load_recipe",
           "load_splits"]
__version__ = "0.2.0"
