"""The report's verdict (which model to ship) and its warnings (what a reader must not miss)."""

import time

import pytest

from distil.evaluate import measure_speed
from distil.report import report_warnings, verdict


def row(accuracy: float, **extra) -> dict:
    return {"accuracy": accuracy, **extra}


def test_a_distilled_student_worse_than_its_baseline_is_warned_about():
    warnings = report_warnings({"teacher": row(0.9), "baseline": row(0.70), "student": row(0.65)})
    assert len(warnings) == 1 and "(0.650) is less accurate than the same student trained on labels alone (0.700)" \
        in warnings[0]
    assert report_warnings({"teacher": row(0.9), "baseline": row(0.70), "student": row(0.75)}) == []


def test_an_int8_file_larger_than_its_fp32_file_is_warned_about():
    models = {"student": row(0.8, onnx_bytes=4_000), "student-int8": row(0.8, bytes=5_500),
              "teacher": row(0.9, onnx_bytes=400_000), "teacher-int8": row(0.9, bytes=110_000)}
    warnings = report_warnings(models)
    assert len(warnings) == 1
    assert warnings[0].startswith("student-int8 (5,500 bytes) is larger than its fp32 ONNX file (4,000 bytes)")


def test_an_int8_model_that_lost_more_than_the_tolerance_is_warned_about():
    models = {"teacher": row(0.98), "student": row(0.90, onnx_bytes=20_000),
              "student-int8": row(0.885, bytes=8_000), "teacher-pruned": row(0.975, onnx_bytes=100_000),
              "teacher-pruned-int8": row(0.974, bytes=35_000)}
    warnings = report_warnings(models, tolerance=0.01)
    assert len(warnings) == 1
    assert warnings[0].startswith("student-int8 (0.885) lost 1.5 points of accuracy against its fp32 form student "
                                  "(0.900), more than the report's tolerance of 1.0 point")
    assert report_warnings(models, tolerance=0.02) == []


def test_a_pruned_model_that_lost_more_than_the_tolerance_is_warned_about():
    models = {"teacher": row(0.98), "teacher-pruned": row(0.95), "teacher-pruned-labels": row(0.97)}
    warnings = report_warnings(models, tolerance=0.01)
    assert len(warnings) == 1  # -labels lost exactly the tolerance: within it
    assert warnings[0].startswith("teacher-pruned (0.950) lost 3.0 points of accuracy against the unpruned teacher "
                                  "(0.980)")


# --- the verdict: which model to ship ---------------------------------------------------------------------


def measured(accuracy: float, onnx_bytes: int, ort_throughput: float, ort_latency: float) -> dict:
    return {"accuracy": accuracy, "bytes": onnx_bytes + 3000, "onnx_bytes": onnx_bytes,
            "ort_throughput_b256": ort_throughput, "ort_latency_ms_b1": ort_latency}


def demo_metrics() -> dict:
    """The rows of the demo's metrics.json (recipes/mnist1d.yaml, seed 0, a fresh clone's `make demo`), rounded."""
    return {"teacher": measured(0.984, 412_910, 21_534, 0.0600),
            "baseline": measured(0.607, 21_106, 8_209_470, 0.0068),
            "student": measured(0.827, 21_106, 8_717_861, 0.0088),
            "student-int8": measured(0.837, 8_650, 7_802_737, 0.0081),
            "teacher-pruned": measured(0.987, 107_309, 62_861, 0.0354),
            "teacher-pruned-int8": measured(0.987, 35_161, 251_557, 0.0171),
            "teacher-pruned-labels": measured(0.984, 107_309, 64_319, 0.0252)}


def test_the_demo_verdict_names_the_pruned_int8_teacher():
    """Within one point of the teacher (0.984) are the teacher and its three pruned forms; the students (0.8x)
    are far smaller and faster but not within it. The int8 pruned teacher is both the smallest and the fastest."""
    v = verdict(demo_metrics(), tolerance=0.01)
    assert v["within"] == ["teacher", "teacher-pruned", "teacher-pruned-int8", "teacher-pruned-labels"]
    assert v["smallest"]["model"] == v["fastest"]["model"] == "teacher-pruned-int8"
    assert v["runtime"] == "onnxruntime"
    best = v["smallest"]
    assert best["size_ratio"] == pytest.approx(35_161 / 412_910)  # 0.085: 11.7x smaller
    assert best["throughput_ratio"] == pytest.approx(251_557 / 21_534)  # 11.7x
    assert best["latency_ratio"] == pytest.approx(0.0171 / 0.0600)
    assert v["text"][0].startswith("Ship teacher-pruned-int8, the smallest and the fastest model within 1.0 point of "
                                   "the teacher's accuracy: accuracy 0.987 (+0.3 pt against the teacher's 0.984); its "
                                   "file is 34.3 KiB, 0.09x the teacher's (11.7x smaller); throughput 11.7x")


def test_a_looser_tolerance_lets_the_student_in_and_the_verdict_names_two_models():
    v = verdict(demo_metrics(), tolerance=0.16)  # the distilled student (0.827) is within 15.7 points
    assert v["smallest"]["model"] == "student-int8"  # 8,650 bytes
    assert v["fastest"]["model"] == "student"  # 8.7M samples/s against the int8 file's 7.8M
    assert v["text"][0].startswith("Smallest within 16.0 points of the teacher's accuracy: student-int8")
    assert v["text"][1].startswith("Fastest within 16.0 points: student")


def test_when_nothing_else_is_within_the_tolerance_the_verdict_says_ship_the_teacher():
    models = {name: m for name, m in demo_metrics().items() if not name.startswith("teacher-")}
    v = verdict(models, tolerance=0.01)
    assert v["within"] == ["teacher"]
    assert v["text"] == ["Ship the teacher: no other model of this run is within 1.0 point of its accuracy (0.984)."]


def test_without_onnx_files_the_verdict_compares_pytorch_speeds_and_checkpoint_bytes():
    models = {"teacher": {"accuracy": 0.97, "bytes": 400_000, "throughput_b256": 20_000, "latency_ms_b1": 0.2},
              "student": {"accuracy": 0.965, "bytes": 20_000, "throughput_b256": 900_000, "latency_ms_b1": 0.02}}
    v = verdict(models, tolerance=0.01)
    assert v["runtime"] == "pytorch" and v["smallest"]["model"] == "student"
    assert v["smallest"]["size_ratio"] == pytest.approx(0.05) and v["smallest"]["throughput_ratio"] == 45
    assert v["smallest"]["latency_ratio"] == pytest.approx(0.1)


def test_the_report_and_metrics_open_with_the_verdict(tmp_path):
    import json

    from distil.report import with_ratios, write_report

    models = demo_metrics()
    for m in models.values():  # the rest of a metrics row, as the report stage writes it
        m.update({"ece": 0.02, "params": 1000, "macs": 1000, "latency_ms_b1": m["ort_latency_ms_b1"],
                  "throughput_b256": m["ort_throughput_b256"], "runtime": "onnxruntime"})
    write_report(tmp_path, with_ratios(models), [], [], "distil report: demo", tolerance=0.01)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["verdict"]["smallest"]["model"] == "teacher-pruned-int8"
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "# distil report: demo" and md[2].startswith("**Verdict.** Ship teacher-pruned-int8,")
    assert "<h1>distil report: demo</h1><p><b>Verdict.</b> Ship teacher-pruned-int8," in \
        (tmp_path / "report.html").read_text()


def test_speed_of_a_slow_model_stops_at_the_budget_with_the_least_runs():
    calls = {"one": 0, "big": 0}

    def forward(x):
        calls[x] += 1
        time.sleep(0.02)

    latency, throughput = measure_speed(forward, "one", "big", batch=8, runs=50, repeats=10, min_seconds=0.0,
                                        budget=0.05)
    # warm-up: 2 (its budget is a third); latency: 5 (the least, the budget spent); throughput: 1 + 3
    assert calls == {"one": 2 + 5, "big": 1 + 3}
    assert latency >= 20 and throughput <= 8 / 0.02  # a sleep lasts at least its time (longer on a busy machine)


def test_speed_of_a_fast_model_takes_every_run_asked_for():
    calls = {"one": 0, "big": 0}

    def forward(x):
        calls[x] += 1

    measure_speed(forward, "one", "big", batch=8, runs=30, repeats=10, min_seconds=0.0)
    assert calls == {"one": 10 + 30, "big": 1 + 10}
