"""Peak FLOP/s for MFU: the run's dtype, a bounded and cached CPU measurement, and MFU within (0, 1] in a real run."""

import csv
import time
import warnings

import pytest
import torch

from litgpt_mm.training import flops


@pytest.mark.parametrize(
    "precision, dtype",
    [
        ("32-true", torch.float32),
        (None, torch.float32),
        ("bf16-mixed", torch.bfloat16),
        ("bf16-true", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("64-true", torch.float64),
    ],
)
def test_compute_dtype_follows_the_precision(precision, dtype):
    assert flops.compute_dtype(precision) == dtype


def test_cpu_peak_is_measured_quickly_in_the_asked_dtype_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LITGPT_MM_CACHE", str(tmp_path))
    measured = []
    real = flops.measure_matmul_flops
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda d, t: measured.append(t) or real(d, t))
    start = time.perf_counter()
    peak = flops.peak_flops(torch.device("cpu"), torch.float32)
    assert time.perf_counter() - start < 2.0
    assert measured == [torch.float32]  # never bf16 for an fp32 run
    assert 1e8 < peak < 1e14  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    start = time.perf_counter()
    assert flops.peak_flops(torch.device("cpu"), torch.float32) == peak  # from the cache, not measured again
    assert measured == [torch.float32] and time.perf_counter() - start < 0.1
    assert (tmp_path / "litgpt-mm" / "peak_flops.json").is_file()


def test_an_emulated_dtype_stays_within_the_budget():
    # float64 runs far below the fp32 peak; the measurement must still stop within its budget
    start = time.perf_counter()
    value = flops.measure_matmul_flops(torch.device("cpu"), torch.float64, budget_s=0.3)
    assert value > 0 and time.perf_counter() - start < 1.0


def test_cpu_without_native_bf16_is_warned(monkeypatch):
    monkeypatch.setattr(flops, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        flops.warn_if_slow_bf16("cpu", "bf16-mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flops.warn_if_slow_bf16("cpu", "32-true")
        flops.warn_if_slow_bf16("cuda", "bf16-mixed")


def test_fp32_cpu_run_logs_mfu_between_zero_and_one(pretrained_tiny):
    out, _ = pretrained_tiny
    with open(out / "logs" / "train_log.csv", newline="") as f:
        mfu = [float(r["mfu"]) for r in csv.DictReader(f)]
    assert mfu and all(0 < m <= 1 for m in mfu), (min(mfu), max(mfu))


def test_a_peak_measured_on_a_busy_machine_is_measured_again(tmp_path, monkeypatch):
    """A run faster than the cached peak proves the cache wrong: it is measured again and never left below what the
    run reached, so the next run's MFU is sound."""
    monkeypatch.setenv("LITGPT_MM_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda d, t: 1e9)  # as if measured under load
    assert flops.peak_flops(cpu, torch.float32) == 1e9
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda d, t: 5e10)  # the machine is quiet again
    assert flops.refresh_peak_flops(cpu, torch.float32, at_least=2e9) == 5e10
    assert flops.peak_flops(cpu, torch.float32) == 5e10  # cached
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda d, t: 1e9)  # still busy: the run's own rate stands
    assert flops.refresh_peak_flops(cpu, torch.float32, at_least=6e10) == 6e10 == flops.peak_flops(cpu, torch.float32)
