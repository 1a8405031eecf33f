"""The report's warnings: what a reader must not miss."""

from distil.report import report_warnings


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
