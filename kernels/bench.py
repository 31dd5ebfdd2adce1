"""The measurements behind `lcl bench kernels` (lcl_megatron/bench/kernels.py): the fused losses against eager torch (and Liger / Cut Cross-Entropy if installed).

One row per (op, shape, dtype, implementation): median time of a forward plus
backward, achieved TFLOP/s (the model's matrix products: 6·N·V·D for the LM
loss, 12·n·M·D for the two contrastive directions, whatever an implementation
recomputes), GB/s over the compulsory traffic (inputs read once, gradients
written once: a normalised speed, not measured bandwidth), peak memory above
the inputs, and that peak less the input gradients every implementation must
return (the working memory of the loss itself).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the run minus what
was allocated before it. On CPU each (case, implementation) is measured in its
own subprocess with glibc told to mmap every allocation of 64 KiB or more
(MALLOC_MMAP_THRESHOLD_), so freed tensors go straight back to the OS and the
resident set follows the live tensors; the peak is the kernel's high-water mark
of resident memory (VmHWM, reset through /proc/self/clear_refs before the run)
minus the resident memory just before it. CPU times come from another fresh
subprocess with the default allocator.

CPU cases always run; GPU cases run when CUDA is available. `--quick` uses
small shapes and prints only (unless --output is given); a full run also
writes the table into the "Kernels" section of BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from kernels.contrastive_loss import contrastive_loss, contrastive_loss_reference
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

SECTION = "## Kernels"
MMAP_THRESHOLD = str(64 << 10)


@dataclass(frozen=True)
class Case:
    name: str  # "generation" (LM-head linear cross-entropy) or "contrastive"
    rows: int  # N tokens, or n local pairs
    cols: int  # V vocabulary, or M gathered columns
    width: int  # D
    dtype: str
    device: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.rows}:{self.cols}:{self.width}:{self.dtype}:{self.device}"

    @classmethod
    def from_key(cls, key: str) -> "Case":
        name, rows, cols, width, dtype, device = key.split(":")
        return cls(name, int(rows), int(cols), int(width), dtype, device)

    @property
    def shape(self) -> str:
        if self.name == "generation":
            return f"N={self.rows} D={self.width} V={self.cols}"
        return f"n={self.rows} M={self.cols} D={self.width}"

    @property
    def flops(self) -> float:
        products = 3 if self.name == "generation" else 6
        return 2.0 * products * self.rows * self.cols * self.width

    @property
    def compulsory_bytes(self) -> float:
        element = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        features = (self.rows + self.cols) * self.width * (1 if self.name == "generation" else 2)
        return 2.0 * features * element  # read once, gradient written once


def cpu_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("generation", 1024, 8192, 256, "float32", "cpu"),
                Case("contrastive", 512, 4096, 256, "float32", "cpu")]
    return [Case("generation", 8192, 49411, 512, "float32", "cpu"),
            Case("contrastive", 4096, 32768, 512, "float32", "cpu")]


def gpu_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("generation", 4096, 32768, 1024, "bfloat16", "cuda"),
                Case("contrastive", 2048, 16384, 768, "float32", "cuda")]
    return [Case("generation", 16384, 151936, 2048, "bfloat16", "cuda"),
            Case("contrastive", 8192, 65536, 768, "float32", "cuda")]


def make_inputs(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)

    def leaf(tensor):
        return tensor.to(device=device, dtype=dtype).requires_grad_()

    if case.name == "generation":
        targets = torch.randint(0, case.cols, (case.rows,), generator=gen)
        targets[torch.rand(case.rows, generator=gen) < 0.1] = -100
        hidden = torch.randn(case.rows, case.width, generator=gen)
        weight = torch.randn(case.cols, case.width, generator=gen) * case.width ** -0.5
        return [leaf(hidden), leaf(weight)], targets.to(device)
    all_img = torch.nn.functional.normalize(torch.randn(case.cols, case.width, generator=gen), dim=-1)
    all_txt = torch.nn.functional.normalize(torch.randn(case.cols, case.width, generator=gen), dim=-1)
    valid = torch.ones(case.cols, dtype=torch.bool)
    valid[-max(1, case.cols // 64):] = False  # zero-padded columns, as from a rank with fewer pairs
    all_img[~valid] = 0
    all_txt[~valid] = 0
    leaves = [leaf(all_img[: case.rows]), leaf(all_txt[: case.rows]), leaf(all_img), leaf(all_txt),
              torch.tensor(100.0, device=device).requires_grad_()]
    return leaves, (torch.arange(case.rows, device=device), valid.to(device))


def implementations(case: Case) -> dict:
    if case.name == "generation":
        impls = {"eager torch": lambda leaves, t: linear_cross_entropy_reference(*leaves, t),
                 "fused (ours)": lambda leaves, t: fused_linear_cross_entropy(*leaves, t)}
        if case.device == "cuda":
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                liger = LigerFusedLinearCrossEntropyLoss()
                impls["liger-kernel"] = lambda leaves, t: liger(leaves[1], leaves[0], t)
            except ImportError:
                pass
            try:
                from cut_cross_entropy import linear_cross_entropy as cce

                impls["cut-cross-entropy"] = lambda leaves, t: cce(leaves[0], leaves[1], t)
            except ImportError:
                pass
        return impls
    return {"eager torch": lambda leaves, extra: contrastive_loss_reference(*leaves, *extra),
            "fused (ours)": lambda leaves, extra: contrastive_loss(*leaves, *extra)}


def _step(fn, leaves, extra):
    for leaf in leaves:
        leaf.grad = None
    fn(leaves, extra).backward()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _gradient_bytes(leaves) -> int:
    return sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves if leaf.grad is not None)


def measure_memory(case: Case, impl: str) -> dict:
    """Peak memory of one forward + backward above the inputs, in this process."""
    leaves, extra = make_inputs(case)
    fn = implementations(case)[impl]
    _step(fn, leaves, extra)  # warm-up (kernel compilation, allocator, thread pools)
    for leaf in leaves:
        leaf.grad = None
    _sync(case.device)
    if case.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(fn, leaves, extra)
        _sync(case.device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _proc_kib("VmRSS")
        _step(fn, leaves, extra)
        peak = (_proc_kib("VmHWM") - before) * 1024
    return {"peak_bytes": peak, "gradient_bytes": _gradient_bytes(leaves)}


def measure_time(case: Case, impl: str, repeats: int) -> dict:
    """Median seconds of a forward + backward, after a warm-up, in this process."""
    leaves, extra = make_inputs(case)
    fn = implementations(case)[impl]
    _step(fn, leaves, extra)
    times = []
    for _ in range(repeats):
        _sync(case.device)
        start = time.perf_counter()
        _step(fn, leaves, extra)
        _sync(case.device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times)}


def _worker(what: str, case: Case, impl: str, repeats: int) -> dict:
    """One measurement in a fresh interpreter: memory with glibc mmapping every
    allocation of 64 KiB or more (so the resident set follows the live tensors),
    time with the default allocator."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if what == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-m", "kernels.bench", what, case.key, impl, str(repeats)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker ({what}) for {case.key} / {impl} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(case: Case, impl: str, repeats: int) -> dict:
    """CPU rows in fresh subprocesses (a clean heap for each); CUDA rows in this process."""
    if case.device == "cpu":
        return {**_worker("memory", case, impl, repeats), **_worker("time", case, impl, repeats)}
    return {**measure_memory(case, impl), **measure_time(case, impl, repeats)}


def bf16_matmul_tflops() -> float:
    """The bf16 matrix rate this GPU reaches in a large plain product (the 100% mark)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * runs / (time.perf_counter() - start) / 1e12


def run_all(quick: bool, repeats: int, devices: str = "all") -> tuple[list[dict], dict]:
    rows, notes = [], {}
    cases = cpu_cases(quick) if devices in ("all", "cpu") else []
    if torch.cuda.is_available() and devices in ("all", "cuda"):
        cases += gpu_cases(quick)
        notes["bf16_matmul_tflops"] = bf16_matmul_tflops()
    for case in cases:
        for impl in implementations(case):
            result = measure(case, impl, repeats)
            row = {"case": case, "impl": impl, **result}
            rows.append(row)
            print(f"  {case.name} {case.shape} {impl}: {result['seconds']:.3f} s, "
                  f"{result['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return rows, notes


def target_lines(rows: list[dict], notes: dict, quick: bool) -> list[str]:
    """The targets (peak memory and time against eager torch), each with the measured ratio and whether it is met."""
    if quick:
        return []
    by = {(r["case"].name, r["case"].device, r["impl"]): r for r in rows}
    lines = []

    def check(text, value, limit, smaller_is_better):
        met = value <= limit if smaller_is_better else value >= limit
        lines.append(f"- {text}: {value:.2f} ({'met' if met else 'NOT met'}; target {'<=' if smaller_is_better else '>='} {limit})")

    def memory(name, device, limit):
        eager, fused = by.get((name, device, "eager torch")), by.get((name, device, "fused (ours)"))
        if eager and fused:
            check(f"{device.upper()} {name} loss, eager peak / fused peak", eager["peak_bytes"] / fused["peak_bytes"], limit, False)
            check(f"{device.upper()} {name} loss, the same without the input gradients",
                  _working(eager) / max(_working(fused), 1), limit, False)

    def speed(name, device, limit):
        eager, fused = by.get((name, device, "eager torch")), by.get((name, device, "fused (ours)"))
        if eager and fused:
            check(f"{device.upper()} {name} loss, fused time / eager time", fused["seconds"] / eager["seconds"], limit, True)

    memory("generation", "cpu", 8)
    speed("generation", "cpu", 1.2)
    memory("contrastive", "cpu", 16)
    fused = by.get(("generation", "cuda", "fused (ours)"))
    if fused:
        achieved = fused["case"].flops / fused["seconds"] / 1e12
        check(f"CUDA generation loss, fused TFLOP/s / measured bf16 matmul rate ({notes['bf16_matmul_tflops']:.0f} TFLOP/s)",
              achieved / notes["bf16_matmul_tflops"], 0.6, False)
    speed("contrastive", "cuda", 1.0)
    memory("contrastive", "cuda", 20)
    return lines


def _working(row) -> int:
    return row["peak_bytes"] - row["gradient_bytes"]


def format_table(rows: list[dict]) -> str:
    header = ("| op | shape | dtype | device | impl | time (s) | TFLOP/s | GB/s | peak memory (MiB) "
              "| peak less input grads (MiB) |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        case, seconds = r["case"], r["seconds"]
        lines.append(f"| {case.name} | {case.shape} | {case.dtype} | {case.device} | {r['impl']} | {seconds:.3f} | "
                     f"{case.flops / seconds / 1e12:.3f} | {case.compulsory_bytes / seconds / 1e9:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {_working(r) / 2**20:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def render_section(table: str, targets: list[str], quick: bool) -> str:
    today = datetime.date.today().isoformat()
    parts = [SECTION, "",
             f"`lcl bench kernels`{' --quick' if quick else ''}, {today}, on {machine()}.",
             "Forward + backward; time is the median over the timed runs (CPU times on a shared machine are noisy). "
             "Peak memory is above the inputs (CPU: resident-set high-water mark in a fresh process per row, "
             "see kernels/bench.py; CUDA: max_memory_allocated); the last column subtracts the input gradients, "
             "which every implementation returns and which set a floor on the peak. TFLOP/s counts the model's "
             "matrix products only. On CPU \"fused (ours)\" is the chunked torch path.", "", table, ""]
    if targets:
        parts += ["Targets:", "", *targets, ""]
    if not torch.cuda.is_available():
        parts += ["GPU cases (generation 16384 x 2048 x 151936 bf16, contrastive 8192 x 65536 x 768 fp32, "
                  "with Liger-Kernel / Cut Cross-Entropy when installed) run when CUDA is present; "
                  "they have not been measured yet.", ""]
    return "\n".join(parts)


def worker_main(argv: list[str]) -> int:
    """`python -m kernels.bench WHAT CASE IMPL REPEATS`: one measurement, one JSON line (see `_worker`)."""
    what, key, impl, repeats = argv
    case = Case.from_key(key)
    result = measure_memory(case, impl) if what == "memory" else measure_time(case, impl, int(repeats))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
