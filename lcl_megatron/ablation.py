"""`make ablation`: the LCL paper's Table 1 in miniature, on a CPU.

    python -m lcl_megatron.ablation [--arms lcl,generation,...] [--seeds 0,1,2] [--steps N]

Trains each arm (one objective, everything else equal: configs/ablation.yaml)
for each seed with `lcl train`, then probes every checkpoint's frozen vision
encoder on the held-out scenes (linear and attentive probes, latent rank and
variance; zero-shot where a contrastive term exists), beside an untrained ViT
of the same seeds. Each invocation works in a new directory under runs/ablation/
(never touching earlier ones); the full default set also writes the results
section of docs/ablation.md and docs/ablation.png, a subset writes them into
its work directory only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lcl_megatron.config import ConfigError, load_config

CONFIG = Path("configs/ablation.yaml")
DOC, PLOT = Path("docs/ablation.md"), Path("docs/ablation.png")
WORK_ROOT = Path("runs/ablation")
INTERLEAVED, PAIRS = "embedded:digit-scenes", "embedded:digit-scenes-pairs"
# Both scene corpora hold the same probe-training and held-out images.
LABELLED_SET = INTERLEAVED
DEFAULT_SEEDS = (0, 1, 2)
RESULTS_HEADING = "## Results"


@dataclass(frozen=True)
class Arm:
    label: str
    data: str | None  # None: the untrained model, no training
    generation: float = 0.0
    contrastive: float = 0.0
    regression: float = 0.0
    paper: str = "—"  # the paper's IN-1k probe (ViT-L/14, Table 1), for orientation only

    def overrides(self) -> list[str]:
        return [f"data.path=[{self.data}]", f"loss.generation_weight={self.generation}",
                f"loss.contrastive_weight={self.contrastive}", f"loss.regression_weight={self.regression}"]


ARMS = {
    "untrained": Arm("untrained ViT", None),
    "lcl": Arm("LCL (interleaved)", INTERLEAVED, generation=1.0, contrastive=1.0, paper="75.2"),
    "generation": Arm("generation only, Flamingo-like (interleaved)", INTERLEAVED, generation=1.0, paper="24.0"),
    "emu": Arm("generation + latent regression, Emu-like (interleaved)", INTERLEAVED, generation=1.0,
               regression=1.0, paper="5.7"),
    "contrastive": Arm("contrastive only (interleaved)", INTERLEAVED, contrastive=1.0),
    "pairs-lcl": Arm("LCL (pairs)", PAIRS, generation=1.0, contrastive=1.0, paper="82.2"),
    "pairs-contrastive": Arm("contrastive only, CLIP-like (pairs)", PAIRS, contrastive=1.0, paper="82.1"),
}
METRICS = (("linear_patch_top1", "linear probe, mean patch"), ("linear_latent_top1", "linear probe, latent"),
           ("attentive_top1", "attentive probe"), ("zeroshot_top1", "zero-shot"),
           ("latent_effective_rank", "latent eff. rank"), ("latent_variance", "latent variance"))


def parse_list(text: str, known, what: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        items = [convert(item) for item in items]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list, got {text!r}") from None
    unknown = [item for item in items if known is not None and item not in known]
    if not items or unknown:
        raise ConfigError(f"{what}: unknown {', '.join(map(str, unknown)) or 'empty list'} "
                          f"(known: {', '.join(known)})" if known is not None else f"{what} is empty")
    return items


def train_arm(arm: Arm, seed: int, run_dir: Path, steps: int | None) -> Path:
    """`lcl train` of one arm and seed in its own process; returns the final checkpoint."""
    command = [sys.executable, "-m", "lcl_megatron.cli", "train", "--config", str(CONFIG), f"run.dir={run_dir}",
               f"train.seed={seed}", "data.heldout=", *arm.overrides()]
    if steps:
        command.append(f"train.steps={steps}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (run_dir / "train.log").write_text(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"training {run_dir} failed (exit {done.returncode}); see {run_dir / 'train.log'}")
    return Path(done.stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))


def evaluate(arm: Arm, model, cfg, labelled: dict, zeroshot_set) -> dict:
    from lcl_megatron.eval.probe import probe_model
    from lcl_megatron.eval.zeroshot import zeroshot_top1

    out = probe_model(model, labelled)
    if arm.contrastive > 0:
        out["zeroshot_top1"] = zeroshot_top1(model, *zeroshot_set)
    return out


def run(arms: list[str], seeds: list[int], steps: int | None, work: Path, jobs: int) -> list[dict]:
    """Train every (arm, seed) `jobs` at a time (one single-threaded process each), seed by
    seed, and probe each checkpoint as soon as it exists (one probe at a time): every
    finished run is in results.jsonl even if the whole set is stopped early."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lcl_megatron.data.labelled import load_labelled_set
    from lcl_megatron.eval.datasets import load_zeroshot_set
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval
    from lcl_megatron.eval.probe import untrained_model

    base = load_config(CONFIG)
    size = base.model.vision.image_size
    labelled = load_labelled_set(LABELLED_SET, size)
    zeroshot_sets = {data: load_zeroshot_set(data, size) for data in (INTERLEAVED, PAIRS)}
    probing = threading.Lock()
    rows = []

    def one(name_seed) -> dict:
        name, seed = name_seed
        arm = ARMS[name]
        begin = time.perf_counter()
        if arm.data is not None:
            run_dir = work / f"{name}-seed{seed}"
            run_dir.mkdir(parents=True)
            checkpoint = train_arm(arm, seed, run_dir, steps)
        train_s = time.perf_counter() - begin
        with probing:
            if arm.data is None:
                cfg, model = untrained_model(load_config(CONFIG, [f"train.seed={seed}"]))
                row = evaluate(arm, model, cfg, labelled, None)
            else:
                cfg, model = load_for_eval(checkpoint)
                row = evaluate(arm, model, cfg, labelled, zeroshot_sets[arm.data])
            row = {"arm": name, "seed": seed, "steps": 0 if arm.data is None else steps or base.train.steps, **row,
                   "train_s": round(train_s, 1)}
            rows.append(row)
            with open(work / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, [(name, seed) for seed in seeds for name in arms]))
    order = {(name, seed): i for i, (name, seed) in enumerate((n, s) for n in arms for s in seeds)}
    return sorted(rows, key=lambda row: order[(row["arm"], row["seed"])])


def _cell(values: list[float], percent: bool) -> str:
    if not values:
        return "—"
    scale = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}" if percent or mean >= 1 else f"{mean:.3f} ± {spread:.3f}"


def results_table(rows: list[dict]) -> str:
    """Mean ± standard deviation over seeds, one row per arm."""
    header = ["arm", "seeds", *[label for _, label in METRICS], "paper (IN-1k probe)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, arm in ARMS.items():
        mine = [row for row in rows if row["arm"] == name]
        if not mine:
            continue
        cells = [_cell([row[key] for row in mine if key in row], key.endswith("_top1")) for key, _ in METRICS]
        lines.append(f"| {arm.label} | {len(mine)} | " + " | ".join(cells) + f" | {arm.paper} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lcl_megatron.utils import atomic_write

    names = [name for name in ARMS if any(row["arm"] == name for row in rows)]
    panels = [("linear_patch_top1", "linear probe (mean patch)"), ("attentive_top1", "attentive probe"),
              ("zeroshot_top1", "zero-shot")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(names) + 1.6), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for y, name in enumerate(names):
            values = [100 * row[key] for row in rows if row["arm"] == name and key in row]
            ax.scatter(values, [y] * len(values), color="C0", alpha=0.8)
            if values:
                ax.plot([statistics.fmean(values)] * 2, [y - 0.3, y + 0.3], color="C3")
        ax.axvline(10, color="grey", linestyle=":", linewidth=1)  # chance: ten digits
        ax.set_title(title)
        ax.set_xlabel("held-out top-1 (%)")
        ax.set_xlim(0, 100)
    axes[0].set_yticks(range(len(names)), [ARMS[name].label for name in names])
    axes[0].invert_yaxis()
    fig.suptitle("digit-scenes: one point per seed, red bar = mean, dotted = chance")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_results(rows: list[dict], doc: Path, plot: Path, wall_s: float | None, command: str) -> None:
    from lcl_megatron.utils import write_markdown_section

    steps = sorted({row["steps"] for row in rows if row["steps"]})
    wall = f", {wall_s / 60:.1f} minutes of wall time on this machine" if wall_s is not None else ""
    section = "\n".join([
        f"{RESULTS_HEADING}", "",
        f"Written by `{command}` ({', '.join(map(str, steps))} steps per run{wall}). Top-1 in %, "
        f"mean ± standard deviation over seeds, on the {rows[0]['num_test']} "
        f"held-out scenes (probes fitted on {rows[0]['num_train']} scenes of training scans).", "",
        results_table(rows), "",
        f"![probe accuracy per arm, one point per seed]({plot.name})", "",
        "Every run (one JSON object each):", "", "```",
        *[json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}) for row in rows],
        "```"])
    write_markdown_section(doc, RESULTS_HEADING, section)
    write_plot(rows, plot)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcl_megatron.ablation", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of: {', '.join(ARMS)}")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="training steps per run (default: configs/ablation.yaml)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time, one core each (default 2)")
    p.add_argument("--work", type=Path, default=WORK_ROOT, help="parent of this invocation's work directory")
    p.add_argument("--report", type=Path, help="train nothing: write the results section and plot of the runs "
                                               "in this results.jsonl (e.g. of a set stopped early) into docs/")
    args = p.parse_args(argv)
    if args.report:
        try:
            rows = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            print(f"ablation: cannot read --report {args.report}: {e}", file=sys.stderr)
            return 2
        if not rows:
            print(f"ablation: --report {args.report} holds no runs", file=sys.stderr)
            return 2
        write_results(rows, DOC, PLOT, None, f"python -m lcl_megatron.ablation --report {args.report}")
        print(results_table(rows))
        return 0
    try:
        arms = parse_list(args.arms, list(ARMS), "--arms")
        seeds = parse_list(args.seeds, None, "--seeds", int)
        if args.jobs <= 0:
            raise ConfigError(f"--jobs must be positive, got {args.jobs}")
        if args.steps is not None and args.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {args.steps}")
        load_config(CONFIG)
    except ConfigError as e:
        print(f"ablation: {e}", file=sys.stderr)
        return 2
    work = args.work / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    work.mkdir(parents=True)
    start = time.perf_counter()
    rows = run(arms, seeds, args.steps, work, args.jobs)
    wall_s = time.perf_counter() - start
    complete = arms == list(ARMS) and seeds == list(DEFAULT_SEEDS) and args.steps is None
    doc, plot = (DOC, PLOT) if complete else (work / DOC.name, work / PLOT.name)
    command = "make ablation" if complete else f"make ablation ARMS={','.join(arms)} SEEDS={','.join(map(str, seeds))}"
    write_results(rows, doc, plot, wall_s, command)
    print(results_table(rows))
    print(f"ablation: {len(rows)} runs in {wall_s / 60:.1f} minutes; results in {doc} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
