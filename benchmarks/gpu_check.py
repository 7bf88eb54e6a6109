"""One-command check of the CUDA paths (issue 21), for the first time a GPU is at hand.

On one GPU, in a few minutes:

1. the CUDA-only tests (``tests/test_cuda.py``, ``tests/test_tensor.py -k cuda``): layers,
   ADMM, the LSTM's backward, bf16/fp16 autocast, fp16 training with its GradScaler and
   export, each against a CPU oracle;
2. ResNet-20 training steps on CIFAR-10-shaped batches (128 images, random, on the device),
   dense against TT 6.8x, in fp32, bf16 autocast and fp16 autocast with a GradScaler,
   channels_last: median milliseconds per step;
3. one ADMM update (Z and U of every planned layer) of the TT 6.8x plan: median ms;
4. export of the TT model from the device, as ``.pt2`` and ONNX, each run back and compared.

It prints a table and writes ``benchmarks/results/gpu_check.json`` (``--out``); exit status
1 if any check failed. Without a CUDA device it says so and exits 0. ``--device cpu
--quick`` runs the same code on the CPU (a dry run of the script itself).

    python benchmarks/gpu_check.py                       # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick  # dry run here
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tdcompress as tdc
from tdcompress.models import build_model
from tdcompress.train.checkpoint import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(device: torch.device) -> dict[str, nn.Module]:
    """ResNet-20 dense and its TT 6.8x factorization (the paper's CIFAR-10 plan)."""
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10)
    plan = tdc.plan(dense, "tt", target_ratio=6.8, input_shape=(1, 3, 32, 32))
    tt, _ = tdc.decompose(dense, plan)
    out = {}
    for name, m in (("dense", dense), ("tt 6.8x", tt)):
        out[name] = m.to(device).to(memory_format=torch.channels_last)
    out["_plan"] = plan  # type: ignore[assignment]
    return out


def step_times(
    model: nn.Module, device: torch.device, amp: str | None, batch: int, steps: int
) -> float:
    """Median milliseconds of one SGD training step (forward, backward, update)."""
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    model.train()
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        _sync(device)
        if i >= 3:
            times.append(1e3 * (time.perf_counter() - t0))
    if not torch.isfinite(loss.detach()).item():
        raise FloatingPointError(f"{amp or 'fp32'} step gave a non-finite loss")
    return statistics.median(times)


def admm_update_ms(dense: nn.Module, plan: Any, device: torch.device, repeats: int) -> float:
    admm = tdc.ADMM(dense, plan, rho=0.01)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        admm.update()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_tests(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "not a CUDA device"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    cmd2 = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tensor.py"]
    out = {}
    for name, c in (("test_cuda", cmd), ("test_tensor -k cuda", [*cmd2, "-k", "cuda"])):
        p = subprocess.run(c, cwd=REPO, capture_output=True, text=True, timeout=600)
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        out[name] = {"returncode": p.returncode, "summary": tail[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 timed steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine: nothing to check (exit 0)")
        return 0
    batch, steps = (16, 3) if a.quick else (128, 20)
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": batch,
        "checks": {},
        "train_step_ms": {},
    }
    failed: list[str] = []

    def check(name: str, fn) -> Any:  # noqa: ANN001
        t0 = time.time()
        try:
            val = fn()
            doc["checks"][name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
            return val
        except Exception as e:  # a failed check is reported, the others still run
            doc["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
            failed.append(name)
            return None

    tests = check("tests", lambda: run_tests(device))
    if tests:
        doc["tests"] = tests
        bad = [k for k, v in tests.items() if isinstance(v, dict) and v.get("returncode")]
        if bad:
            doc["checks"]["tests"]["ok"] = False
            failed.append("tests")
    ms = check("models", lambda: models(device))
    if ms:
        plan = ms.pop("_plan")
        amps = [None, "bf16"] + (["fp16"] if device.type == "cuda" else [])
        for amp in amps:
            for name, m in ms.items():
                key = f"{name} {amp or 'fp32'}"
                t = check(
                    f"train step {key}",
                    lambda m=m, amp=amp: step_times(m, device, amp, batch, steps),
                )
                if t is not None:
                    doc["train_step_ms"][key] = round(t, 2)
        doc["admm_update_ms"] = check(
            "admm update", lambda: admm_update_ms(ms["dense"], plan, device, 3 if a.quick else 10)
        )
        with tempfile.TemporaryDirectory() as tmp:
            x = torch.randn(2, 3, 32, 32, device=device)
            for fmt in ("pt2", "onnx"):
                res = check(
                    f"export {fmt}",
                    lambda fmt=fmt: tdc.export_model(
                        ms["tt 6.8x"].eval(), x, Path(tmp) / f"tt.{fmt}"
                    ),
                )
                if res is not None:
                    doc[f"export_{fmt}"] = {
                        "max_abs_diff": res.max_abs_diff,
                        "checked_with": res.checked_with,
                        "file_bytes": res.file_bytes,
                    }
    print(f"\ngpu_check on {doc['device']} (torch {doc['torch']}), batch {batch}")
    for name, v in doc["checks"].items():
        print(
            f"  {'ok  ' if v['ok'] else 'FAIL'} {name}" + (f": {v['error']}" if not v["ok"] else "")
        )
    for key, t in doc["train_step_ms"].items():
        print(f"  train step {key:18s} {t:9.2f} ms")
    if doc.get("admm_update_ms") is not None:
        print(f"  ADMM update (TT 6.8x plan)  {doc['admm_update_ms']:9.2f} ms")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
