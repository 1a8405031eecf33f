"""Training on 2 CPU processes over gloo (torchrun) equals one process with the same global batch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distil.checkpoint import load_tensors

SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from distil import CE, KD, ClassificationTask, Distiller, Split, TrainConfig, fit
    from distil.checkpoint import save_tensors
    from distil.losses import CC, DIST, PKT, RKD, SP

    def blobs(n=192):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 3
        return Split(torch.eye(4)[y] * 2 + 0.7 * torch.randn(n, 4, generator=g), y)

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def terms(kind):
        if kind == "kd":
            return [KD(T=2, weight=0.7), CE(weight=0.3)]
        # terms over the batch: each process computes them on every process's rows, as one process would
        return [CE(weight=0.3), RKD(student="1", teacher="1", weight=1.0), SP(student="1", teacher="1", weight=30.0),
                CC(student="1", teacher="1", weight=1.0), PKT(student="1", teacher="1", weight=300.0),
                DIST(weight=1.0)]

    def train(out, kind="kd"):
        torch.set_num_threads(1)
        cfg = TrainConfig(epochs=3, batch_size=32, lr=0.02)
        teacher = mlp(1)
        fit(ClassificationTask(teacher), blobs(), blobs(60), cfg, device="cpu", checkpoint_dir=out, name="t")
        student = mlp(0)
        distiller = Distiller(student, teacher, terms(kind))
        result = fit(distiller, blobs(), blobs(60), cfg, device="cpu", checkpoint_dir=out, name="s")
        return teacher, student, result

    if __name__ == "__main__":
        teacher, student, result = train(sys.argv[1], sys.argv[2])
        import torch.distributed as dist
        if dist.get_rank() == 0:
            save_tensors(sys.argv[1] + "/ranks.safetensors",
                         {**{"t." + k: v for k, v in teacher.state_dict().items()},
                          **{"s." + k: v for k, v in student.state_dict().items()}},
                         {"history": result.history})
''')


@pytest.mark.parametrize("kind", ["kd", "relation"])
def test_two_gloo_processes_train_the_same_student_as_one(tmp_path, monkeypatch, kind):
    (tmp_path / "job.py").write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))  # keep the caller's too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "job.py"), str(tmp_path / "ddp"), kind], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, meta = load_tensors(tmp_path / "ddp" / "ranks.safetensors")

    monkeypatch.syspath_prepend(str(tmp_path))
    import job

    teacher, student, result = job.train(str(tmp_path / "one"), kind)
    one = {**{"t." + k: v for k, v in teacher.state_dict().items()},
           **{"s." + k: v for k, v in student.state_dict().items()}}
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=1e-5), name
    # the logged parts and validation accuracy are reduced over both processes: they match the one-process run
    for mine, theirs in zip(result.history, meta["history"]):
        assert mine["val_acc"] == pytest.approx(theirs["val_acc"])
        for part in mine["parts"]:
            assert mine["parts"][part] == pytest.approx(theirs["parts"][part], rel=1e-4), part
    written = {p.name for p in (tmp_path / "ddp").iterdir()}  # rank 0's checkpoints only, no duplicates
    assert written == {p.name for p in (tmp_path / "one").iterdir()} | {"ranks.safetensors"}


def test_nproc_that_does_not_divide_the_batch_exits_2_before_launching(tmp_path, tiny_recipe):
    import yaml
    from typer.testing import CliRunner

    from distil.cli import app

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    args = ["run", str(tmp_path / "r.yaml"), "--nproc", "3", "--run-dir", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "teacher.train.batch_size 64 must be divisible by --nproc 3" in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_distil_run_on_two_processes_writes_one_report_close_to_one_process(tmp_path, tiny_recipe):
    import yaml

    from distil.build import load_recipe
    from distil.pipeline import load_metrics, run_pipeline

    tiny_recipe["teacher"]["train"]["epochs"] = tiny_recipe["student"]["train"]["epochs"] = 4
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "distil", "run", str(tmp_path / "r.yaml"), "--nproc", "2",
                           "--run-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("report:") == 1  # rank 0 speaks for both
    run_pipeline(load_recipe(tiny_recipe), tmp_path / "one")
    two, one = load_metrics(tmp_path / "two")["models"], load_metrics(tmp_path / "one")["models"]
    assert abs(two["student"]["accuracy"] - one["student"]["accuracy"]) <= 0.03
    lines = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "log.jsonl").read_text().splitlines())  # written once, by rank 0


CRD_JOB = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from distil import CE, Distiller, Split, TrainConfig, fit
    from distil.checkpoint import save_tensors
    from distil.losses import CRD

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.arange(64) % 3
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    crd = CRD(student="1", teacher="1", num_samples=64, feat_dim=8, negatives=16)
    first_means = []  # this process's mean score on the first batch, for each anchor (student, then teacher)
    normaliser = crd._normaliser
    def spy(name, scores):
        if len(first_means) < 2:
            first_means.append(scores.detach().mean())
        return normaliser(name, scores)
    crd._normaliser = spy
    fit(Distiller(student, teacher, [crd, CE()]), Split(x, y), None, TrainConfig(epochs=1, batch_size=32), device="cpu")
    import torch.distributed as dist
    means = [torch.empty(2) for _ in range(2)]
    dist.all_gather(means, torch.stack(first_means))
    save_tensors(f"{sys.argv[1]}/rank{dist.get_rank()}.safetensors",
                 {"memory": crd.student_memory, "z": torch.stack([crd.z_student, crd.z_teacher]),
                  "first_means": torch.stack(means)})
''')


def test_crd_memory_banks_and_normalisers_are_the_same_on_every_process(tmp_path):
    (tmp_path / "crd_job.py").write_text(CRD_JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "crd_job.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_tensors(tmp_path / f"rank{r}.safetensors")[0] for r in (0, 1)]
    memory = ranks[0]["memory"]
    updated = (memory.norm(dim=1) - 1).abs() < 1e-5  # updated rows are unit vectors, initial ones are not
    assert int(updated.sum()) == 64  # both processes' rows, not only rank 0's 32
    # Z = num_samples * the mean score over the whole first batch (both processes' 16 rows), not over rank 0's
    # share alone (which DDP's buffer broadcast would otherwise hand to rank 1 from the second step on)
    first_means = ranks[0]["first_means"]  # (process, anchor)
    assert not torch.allclose(first_means[0], first_means[1])  # the shares do differ
    for rank in ranks:
        torch.testing.assert_close(rank["z"], 64 * first_means.mean(0))


ALONE_JOB = textwrap.dedent('''
    import datetime, torch, torch.distributed as dist
    from torch import nn
    from distil import CE, Distiller, Split, TrainConfig, fit
    from distil.distributed import Group
    from distil.losses import DIST, RKD

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))  # a hang fails in 20 s
    if dist.get_rank() == 0:  # rank 0 trains alone, as the export stage's fine-tune does, with the group up
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 4, generator=g), torch.arange(64) % 3
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        terms = [CE(), RKD(student="1", teacher="1"), DIST()]
        fit(Distiller(student, teacher, terms), Split(x, y), None, TrainConfig(epochs=1, batch_size=32), device="cpu",
            group=Group())
    dist.barrier()
''')


def test_terms_over_the_batch_gather_nothing_when_one_process_trains_alone(tmp_path):
    """Relation terms gather over the processes that the running fit trains on, not over whatever group is up:
    rank 0 training alone must not wait for the others' rows."""
    (tmp_path / "alone.py").write_text(ALONE_JOB)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "alone.py")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_batch_sizes_are_checked_for_the_stages_that_train_only():
    from distil.build import load_recipe
    from distil.errors import ConfigError
    from distil.run import check_batch_sizes

    sizes = {"teacher": {"model": "cnn1d", "train": {"batch_size": 64}}, "student": {"train": {"batch_size": 96}}}
    with pytest.raises(ConfigError, match=r"teacher.train.batch_size 64 must be divisible by --nproc 3"):
        check_batch_sizes(load_recipe(sizes), 3, "--nproc 3")
    sizes["teacher"]["checkpoint"] = "t.safetensors"  # loaded, not trained: its batch size is never used
    check_batch_sizes(load_recipe(sizes), 3, "--nproc 3")
    sizes["compress"] = {"enabled": True, "finetune": {"batch_size": 64}}
    with pytest.raises(ConfigError, match=r"compress.finetune.batch_size 64 must be divisible by --nproc 3"):
        check_batch_sizes(load_recipe(sizes), 3, "--nproc 3")
