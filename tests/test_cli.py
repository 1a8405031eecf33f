"""The command: listing, a run, and every kind of bad input exiting 2 with one clear message."""

import textwrap

import numpy as np
import pytest

from conftest import fails_cleanly, runner, write_recipe
from distil.cli import app
from distil.errors import DistilError


@pytest.mark.parametrize("what,expected", [("methods", ["kd", "ce", "fitnet", "at"]),
                                           ("models", ["mlp", "cnn", "cnn1d", "resnet8x4", "mobilenetv2"]),
                                           ("datasets", ["mnist1d", "digits", "npz", "imagefolder", "csv"])])
def test_list_prints_one_line_per_entry(what, expected):
    result = runner.invoke(app, ["list", what])
    assert result.exit_code == 0
    first_words = [line.split()[0] for line in result.output.splitlines()]
    assert set(expected) <= set(first_words)


def test_list_unknown_category():
    fails_cleanly(["list", "method"], "Did you mean 'methods'")


def test_unknown_recipe_key_exits_2_with_did_you_mean(tmp_path, tiny_recipe):
    tiny_recipe["studnet"] = tiny_recipe.pop("student")
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe)], "unknown key 'studnet'. Did you mean 'student'?")


def test_debug_shows_the_traceback(tmp_path, tiny_recipe):
    tiny_recipe["studnet"] = tiny_recipe.pop("student")
    result = runner.invoke(app, ["--debug", "run", write_recipe(tmp_path, tiny_recipe)])
    assert result.exit_code != 0 and isinstance(result.exception, DistilError)


def test_wrong_type_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["teacher"]["train"]["batch_size"] = "big"
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe)], "'teacher.train.batch_size'")


def test_missing_recipe_file_exits_2(tmp_path):
    fails_cleanly(["run", str(tmp_path / "nope.yaml")], "recipe file not found")


def test_missing_data_file_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["data"] = {"source": "npz", "args": {"path": str(tmp_path / "data.npz")}}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "data file not found")


def test_empty_data_set_exits_2(tmp_path, tiny_recipe):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4)), y=np.zeros(0))
    tiny_recipe["data"] = {"source": "npz", "args": {"path": str(tmp_path / "empty.npz")}}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")], "empty")


def test_bad_override_exits_2(tmp_path, tiny_recipe):
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--set", "seed"], "must look like field.path=value")


def user_models(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_teacher_and_student_with_different_class_counts_exit_2(tmp_path, tiny_recipe, monkeypatch):
    user_models(tmp_path, monkeypatch, "fiveway", """
        from torch import nn
        def five_way(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    """)
    tiny_recipe["student"] = {"model": "fiveway:five_way", "train": {"epochs": 1}}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "the student (fiveway:five_way) gives outputs of shape [2, 5] for a batch of 2, "
                  "but the data has 10 classes")


def test_feature_pair_that_cannot_be_connected_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["distill"]["terms"].append({"kind": "fitnet", "student": "fc", "teacher": "layer1"})
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "cannot connect student 'fc' -> teacher 'layer1'")


def test_wrong_layer_name_lists_the_closest(tmp_path, tiny_recipe):
    tiny_recipe["distill"]["terms"].append({"kind": "fitnet", "student": "layer1", "teacher": "layr2"})
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "the teacher has no module named 'layr2'. Closest valid names: layer2")


def test_non_finite_loss_exits_2(tmp_path, tiny_recipe, monkeypatch):
    user_models(tmp_path, monkeypatch, "brokenmodel", """
        import torch
        from torch import nn
        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
            def forward(self, x):
                return self.fc(x.flatten(1)) * float("inf")
        def broken(input_shape, num_classes):
            return Broken()
    """)
    tiny_recipe["teacher"] = {"model": "brokenmodel:broken", "train": {"epochs": 1}}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")], "loss became nan")


@pytest.mark.slow
def test_run_prints_the_table_and_the_report_path(tmp_path, tiny_recipe):
    result = runner.invoke(app, ["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "teacher" in result.output and "student" in result.output and "report.md" in result.output
    assert "distill epoch 2/2" in result.output  # one plain line per epoch when not on a terminal
    again = runner.invoke(app, ["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")])
    assert "nothing to do" in again.output


def test_a_stage_the_recipe_does_not_enable_exits_2(tmp_path, tiny_recipe):
    fails_cleanly(["compress", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "stage 'compress' is not enabled by this recipe: set compress.enabled: true")


def test_a_stage_before_its_inputs_exist_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["export"] = {"enabled": True, "quantize": ["student"]}
    fails_cleanly(["export", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "stage 'export' needs the output of stage 'teacher'")


def test_quantizing_a_model_the_run_does_not_have_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["export"] = {"enabled": True, "quantize": ["teacher-pruned"]}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe)],
                  "export.quantize: this run has no model 'teacher-pruned'")


def test_bench_of_a_missing_file_exits_2(tmp_path):
    fails_cleanly(["bench", str(tmp_path / "model.onnx")], "file not found")


@pytest.mark.slow
def test_compress_and_export_end_to_end(tmp_path, tiny_recipe):
    """Pruned, fine-tuned, exported, quantized: the report has every row and the files exist."""
    tiny_recipe["compress"] = {"enabled": True, "ratio": 0.5, "finetune": {"epochs": 1, "batch_size": 64}}
    tiny_recipe["export"] = {"enabled": True, "quantize": ["student", "teacher-pruned"], "calibration_samples": 64}
    run_dir = tmp_path / "r"
    result = runner.invoke(app, ["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    import json

    models = json.loads((run_dir / "metrics.json").read_text())["models"]
    assert list(models) == ["teacher", "baseline", "student", "student-int8", "teacher-pruned",
                            "teacher-pruned-int8", "teacher-pruned-labels"]
    for m in models.values():
        assert {"accuracy", "params", "macs", "bytes", "latency_ms_b1", "throughput_b256"} <= set(m)
    assert models["teacher-pruned"]["macs"] < 0.5 * models["teacher"]["macs"]
    assert models["teacher-pruned-int8"]["runtime"] == "onnxruntime"
    assert 0.8 <= models["teacher-pruned-int8"]["fp32_agreement"] <= 1
    # the verdict: the smallest and the fastest model within 1 point of the teacher, worked out here from the rows
    verdict = json.loads((run_dir / "metrics.json").read_text())["verdict"]
    within = [n for n, m in models.items() if m["accuracy"] >= models["teacher"]["accuracy"] - 0.01 - 1e-9]
    assert verdict["within"] == within and verdict["runtime"] == "onnxruntime"
    assert verdict["smallest"]["model"] == min(within, key=lambda n: models[n]["onnx_bytes"])
    assert verdict["fastest"]["model"] == max(within, key=lambda n: models[n]["ort_throughput_b256"])
    assert (run_dir / "report.md").read_text().splitlines()[2].startswith("**Verdict.** ")
    assert "verdict:" in result.output
    exported = json.loads((run_dir / "export.json").read_text())
    assert all(v.get("max_abs_logit_diff", 0) <= 1e-4 for v in exported.values())
    bench = runner.invoke(app, ["bench", str(run_dir / "teacher-pruned.safetensors")])
    assert bench.exit_code == 0 and "onnxruntime" in bench.output and "pytorch" in bench.output


# --- defects found trying it as a new user would: each is one message, exit 2, no traceback ---


@pytest.mark.parametrize("override,match", [
    ("distill.terms=[]", "'distill.terms': List should have at least 1 item"),
    ("distill.terms=[{kind: kd, weight: -1}]", "distill.terms[0] (kd): kd: weight must be a finite number >= 0"),
    ("student.train.lr=.inf", "'student.train.lr': Input should be a finite number"),
    ("distill.terms=[{kind: kd}, {kind: kd, T: 2}]", "distill.terms[1] (kd) repeats the term 'kd'"),
    ("precision=fp8", "'precision': Input should be 'fp32', 'bf16' or 'fp16'"),
    ("data.augment=[{kind: flip}]", "unknown augmentation 'flip'. Did you mean 'hflip'?"),
])
def test_bad_recipe_values_exit_2_naming_the_field(tmp_path, tiny_recipe, override, match):
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r"), "--set", override],
                  match)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_csv_with_a_missing_cell_exits_2_naming_file_line_and_column(tmp_path, tiny_recipe):
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,,y\n5,6,x\n")
    tiny_recipe["data"] = {"source": "csv", "args": {"path": str(tmp_path / "t.csv")}}
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "t.csv, line 3, column 'b': the value '' is not a finite number")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_that_is_not_there_exits_2_before_training(tmp_path, tiny_recipe):
    out = fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r"), "--device",
                         "cuda"], "device 'cuda': no CUDA GPU is available")
    assert "run folder" not in out and not (tmp_path / "r").exists()  # refused before anything is said or written


def test_brackets_in_an_error_message_are_printed_as_written(tmp_path, tiny_recipe):
    tiny_recipe["distill"]["terms"].append({"kind": "fitnet", "student": "layer[1]", "teacher": "layer1"})
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "the student has no module named 'layer[1]'")


def test_an_unknown_experiment_exits_2_with_did_you_mean():
    fails_cleanly(["experiment", "method"], "unknown experiment 'method'. Did you mean 'methods'?")



def test_a_crd_bank_asking_more_negatives_than_the_data_has_exits_2(tmp_path, tiny_recipe):
    tiny_recipe["distill"]["terms"].append({"kind": "crd", "student": "layer1", "teacher": "layer2",
                                            "negatives": 5000})
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "distill.terms[2] (crd)")


def test_a_relation_loss_on_features_of_different_batch_sizes_exits_2(tmp_path, tiny_recipe, monkeypatch):
    user_models(tmp_path, monkeypatch, "folded", """
        import torch
        from torch import nn

        class Fold(nn.Module):  # (B, 64) -> (2B, 32): a layer that mixes up the batch dimension
            def forward(self, x):
                return x.reshape(-1, 32)

        class Folded(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.flatten, self.layer1, self.fc = nn.Flatten(), Fold(), nn.Linear(64, num_classes)

            def forward(self, x):
                x = self.flatten(x)
                self.layer1(x)
                return self.fc(x)

        def folded(input_shape, num_classes):
            return Folded(num_classes)
    """)
    tiny_recipe["student"] = {"model": "folded:folded", "train": {"epochs": 1}}
    tiny_recipe["distill"]["terms"].append({"kind": "rkd", "student": "layer1", "teacher": "layer1"})
    fails_cleanly(["run", write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "r")],
                  "rkd: student 'layer1' -> teacher 'layer1' give features of batch sizes 4 and 2")
