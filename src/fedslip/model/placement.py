"""Where the frozen backbone runs and in which precision: `train.device` and `train.precision`.

bf16 pays only where the hardware does it natively: on CUDA (bf16-capable GPUs) and on CPUs with
native bf16 matmuls (e.g. AVX512-BF16); on other CPUs bf16 emulation is 3 to 100 times slower than fp32.
So `precision = "auto"` times matmuls in both precisions, once per process (a small screen, then the
backbone's shape), and picks bf16 only where it is measurably faster. Only the frozen backbone is stored in bf16; adapters,
heads and optimizer states stay fp32 masters.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedslip.errors import UserError
from fedslip.model.cpu_heap import keep_freed_memory

BF16_MARGIN = 1.25  # bf16 must beat fp32 by this factor to be chosen
SCREEN_M, SCREEN_LOSS = 128, 4  # the screen's rows (32 × 4 tokens); bf16 this many times slower is emulated
_PROBES: dict[str, dict] = {}


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype  # of the frozen backbone's weights and activations
    info: dict = field(default_factory=dict)  # what was asked and measured, for results.json

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device = {setting!r}: no CUDA device here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'}); use 'cpu' or 'auto'")
        index = torch.device(setting).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device = {setting!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(setting)


def matmul_rate(device: torch.device, dtype: torch.dtype, m: int = 1792, k: int = 384, n: int = 1536,
                seconds: float = 0.25) -> float:
    """GFLOP/s of (m×k)@(k×n) in `dtype` on `device`: MiniLM's feed-forward shape at 32 × 56 tokens.

    Where one call already takes longer than `seconds` (bf16 emulated on a CPU: over a second here), that
    call is the measurement: repeating it would only make the run start later."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    flop = 2.0 * m * k * n
    _sync(device)
    start = time.perf_counter()
    a @ b
    _sync(device)
    first = time.perf_counter() - start
    if first >= seconds:
        return flop / first / 1e9
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    _sync(device)
    return flop * reps / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(device: torch.device) -> dict:
    """fp32 and bf16 matmul rates on `device`, measured once per process.

    First a screen on a 14× smaller matmul, best of two alternating timings: emulated bf16 (10 to 100× slower
    than fp32 at any shape) is decided there in a tenth of a second, where one full-size bf16 call costs over
    a second; a ClientApp on Flower starts a process, and so this probe, for every message. Otherwise
    alternating full-size timings, the best of three of each: a pause or a burst of other work during one
    of them (a shared machine) must not decide the precision of the whole run. Two bf16 timings in a row
    at under half the fp32 rate end it early."""
    key = str(device)
    if key not in _PROBES:
        fp32 = bf16 = 0.0
        for _ in range(2):
            fp32 = max(fp32, matmul_rate(device, torch.float32, m=SCREEN_M, seconds=0.01))
            bf16 = max(bf16, matmul_rate(device, torch.bfloat16, m=SCREEN_M, seconds=0.01))
        if bf16 < fp32 / SCREEN_LOSS:
            _PROBES[key] = _rates(fp32, bf16, f"screen {SCREEN_M}x384x1536")
            return _PROBES[key]
        fp32 = bf16 = 0.0
        clear_losses = 0
        for _ in range(3):
            fp32 = max(fp32, matmul_rate(device, torch.float32, seconds=0.08))
            timed = matmul_rate(device, torch.bfloat16, seconds=0.08)
            bf16 = max(bf16, timed)
            clear_losses = clear_losses + 1 if timed < fp32 / 2 else 0
            if clear_losses == 2:
                break
        _PROBES[key] = _rates(fp32, bf16, "1792x384x1536")
    return _PROBES[key]


def _rates(fp32: float, bf16: float, shape: str) -> dict:
    return {"fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1), "bf16_speedup": round(bf16 / fp32, 2),
            "shape": shape}


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")  # what picks a CPU's float kernels


def compute_kind(device: torch.device) -> dict:
    """What besides the code decides a run's float sums: the kernels (CPU model and vector extensions, or GPU)
    and the thread count. A run resumed under another kind goes on correctly but not bit for bit."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device)}
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "simd": " ".join(f for f in SIMD_FLAGS if f in flags), "threads": torch.get_num_threads()}


def native_cuda_bf16(device: torch.device) -> bool:
    """bf16 in hardware on that GPU (compute capability 8.0, Ampere, or later). torch's own
    `is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4), and asks the current device."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve(device_setting: str, precision_setting: str) -> Placement:
    device = resolve_device(device_setting)
    info: dict = {"device": str(device), "device_setting": device_setting, "precision_setting": precision_setting}
    if precision_setting == "fp32":
        dtype = torch.float32
    elif precision_setting == "bf16":
        if device.type == "cuda" and not native_cuda_bf16(device):
            raise UserError(f"train.precision = 'bf16': {torch.cuda.get_device_name(device)} has no native bf16")
        dtype = torch.bfloat16
    elif device.type == "cuda":
        dtype = torch.bfloat16 if native_cuda_bf16(device) else torch.float32
    else:
        measured = probe(device)
        info["probe"] = measured
        dtype = torch.bfloat16 if measured["bf16_speedup"] >= BF16_MARGIN else torch.float32
    info["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cpu":
        info["freed_memory"] = keep_freed_memory()
    return Placement(device, dtype, info)
