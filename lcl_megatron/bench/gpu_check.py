"""`make gpu-check`: everything that needs a GPU, in one command, on a bare machine without a network.

    make wheelhouse   # beforehand, on a machine with a network: wheels + the embedded corpus, <= 60 MiB
    make gpu-check    # on the GPU machine (Python >= 3.10 with CUDA torch, triton, transformers)

Steps, each with its own time limit so that the whole check ends within about
8 minutes: install the wheelhouse into a private folder (no network), the GPU
tests (`pytest -m gpu`: Triton kernels compiled at real shapes in bf16 and
fp32, fused attention, one fp32 training step equal to the CPU's), the demo
config trained 200 steps in bf16 with its zero-shot top-1, end-to-end MFU of
20 steps of a ViT-L/14 + Llama-style decoder sized for one GPU, and the GPU
rows of `lcl bench kernels`. Results go to one JSON file (and `$OUT`, where
set). Without CUDA it says so in one line and exits 0.

Only the standard library and torch are imported here: the rest is not
installed until the first step has run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE_LIMIT_MIB = 60
# Seconds per step; together about 8 minutes on one H200.
LIMITS = {"install": 60, "pytest": 150, "demo": 150, "mfu": 90, "kernels": 90}
MFU_CONFIG = ["--config", "configs/lcl_vit_l14_llama.yaml", "--synthetic", "--steps", "20", "--warmup", "3",
              # one GPU holds the whole model: no recomputation (MFU counts model FLOPs only)
              "parallel.activation_checkpointing_vit=false", "parallel.activation_checkpointing_lm=false",
              "train.micro_batch_size=8"]


def run_step(name: str, command: list[str], env: dict, results: dict) -> str:
    start = time.perf_counter()
    print(f"gpu-check: {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LIMITS[name])
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        code = "timeout"
    results[name] = {"exit": code, "seconds": round(time.perf_counter() - start, 1), "tail": output[-3000:]}
    print(f"gpu-check: {name}: exit {code} in {results[name]['seconds']} s", file=sys.stderr, flush=True)
    return output


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--wheelhouse", default="wheelhouse", help="folder written by `make wheelhouse`")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check",
                   help="folder for results.json and the logs (default $OUT, else runs/gpu-check)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wheelhouse = REPO / args.wheelhouse
    site = REPO / ".gpu-site"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0",
           "LCL_CACHE_DIR": str(wheelhouse / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    python = sys.executable

    wheels = sorted(str(w) for w in wheelhouse.glob("*.whl"))
    if not wheels:
        print(f"gpu-check: no wheels in {wheelhouse}: run `make wheelhouse` on a machine with a network first",
              file=sys.stderr)
        return 2
    shutil.rmtree(site, ignore_errors=True)
    run_step("install", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--target", str(site), *wheels], env, results)

    tests = run_step("pytest", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "tests/integration/test_gpu.py"], env, results)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", tests)
    results["pytest"]["counts"] = {kind: int(n) for n, kind in summary}

    demo_dir = out / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo = run_step("demo", [python, "-m", "lcl_megatron.cli", "train", "--config", "configs/demo.yaml",
                             "train.precision=bf16", "train.steps=200", "logging.progress=false",
                             f"run.dir={demo_dir}"], env, results)
    top1 = re.search(r"zero-shot top-1 on .*?: ([0-9.]+)", demo)
    results["demo"]["zeroshot_top1"] = float(top1.group(1)) if top1 else None

    mfu = run_step("mfu", [python, "-m", "lcl_megatron.cli", "bench", "train", *MFU_CONFIG], env, results)
    results["mfu"]["result"] = last_json_line(mfu)

    run_step("kernels", [python, "-m", "lcl_megatron.cli", "bench", "kernels", "--device", "cuda",
                         "--output", str(out / "kernels.md")], env, results)
    results["kernels"]["table"] = (out / "kernels.md").read_text() if (out / "kernels.md").exists() else None

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)} |
                     {k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in results.items()
                      if isinstance(v, dict)}))
    failed = [name for name in LIMITS if results.get(name, {}).get("exit") != 0]
    print(f"gpu-check: results in {out / 'results.json'}" + (f"; failed: {', '.join(failed)}" if failed else
                                                               "; every step passed"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
