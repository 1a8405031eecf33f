"""Connectors: small learned adapters that map a student feature onto a teacher feature's shape.

They are built from the shapes seen on one dry-run batch, train with the student, are saved
to their own file, and never enter the exported student.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distil.errors import ShapeError


class Connector(nn.Module):
    """Maps (B, Cs, *S_s) to (B, Ct, *S_t): optional pooling of the spatial dims, then a 1x1 projection.

    Spatial dims are reduced by adaptive average pooling when the student's are larger; a
    student feature with more than two dims can be flattened to meet a (B, D) teacher feature.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.flatten = len(teacher_shape) == 2 and len(student_shape) > 2
        self.pool_to: tuple[int, ...] | None = None
        in_ch, out_ch = student_shape[1], teacher_shape[1]
        if self.flatten:
            in_ch = int(torch.tensor(student_shape[1:]).prod())
        elif student_shape[2:] != teacher_shape[2:]:
            self.pool_to = tuple(teacher_shape[2:])
        self.proj = _projection(len(teacher_shape), in_ch, out_ch)

    def forward(self, student_feat: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            student_feat = student_feat.flatten(1)  # (B, C, *S) -> (B, C*prod(S))
        elif self.pool_to is not None:
            pool = F.adaptive_avg_pool1d if len(self.pool_to) == 1 else F.adaptive_avg_pool2d
            student_feat = pool(student_feat, self.pool_to)
        return self.proj(student_feat)


def _projection(rank: int, in_ch: int, out_ch: int) -> nn.Module:
    if rank == 2:
        return nn.Linear(in_ch, out_ch)
    if rank == 3:
        return nn.Conv1d(in_ch, out_ch, kernel_size=1)
    return nn.Conv2d(in_ch, out_ch, kernel_size=1)


def build_connector(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], where: str, per_token: bool = False
) -> nn.Module:
    """An identity when shapes match, else a `Connector`; `ShapeError` when no connector fits.

    `where` names the feature pair ("student 'layer1' -> teacher 'layer2'") for the message. `per_token`:
    (B, T, C) features of a sequence model, channels last: a linear map of C at every position.
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    if per_token:
        if len(student_shape) != 3 or len(teacher_shape) != 3 or student_shape[1] != teacher_shape[1]:
            raise ShapeError(
                f"cannot connect {where}: per-token features must both be (B, T, C) with the same T, got student "
                f"{list(student_shape)} and teacher {list(teacher_shape)}. Tap block outputs (hidden states) of "
                "both models.")
        return nn.Linear(student_shape[2], teacher_shape[2])  # (B, T, Cs) -> (B, T, Ct)
    s_rank, t_rank = len(student_shape), len(teacher_shape)
    fits = s_rank == t_rank and s_rank in (2, 3, 4) or (t_rank == 2 and s_rank in (3, 4))
    if not fits:
        raise ShapeError(
            f"cannot connect {where}: student feature {list(student_shape)} and teacher feature "
            f"{list(teacher_shape)} " + ("have different ranks" if s_rank != t_rank else
                                          f"are {s_rank}-D, and connectors handle 2-D, 3-D and 4-D features only")
            + ". Pick layers of the same kind "
            "(both convolutional or both fully connected), or a fully connected teacher layer."
        )
    if s_rank == t_rank and s_rank > 2:
        smaller = any(s < t for s, t in zip(student_shape[2:], teacher_shape[2:]))
        if smaller:
            raise ShapeError(
                f"cannot connect {where}: the student feature's spatial size {list(student_shape[2:])} "
                f"is smaller than the teacher's {list(teacher_shape[2:])}. Pick an earlier student "
                "layer or a later teacher layer."
            )
    return Connector(student_shape, teacher_shape)
