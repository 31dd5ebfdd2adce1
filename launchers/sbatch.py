"""The sbatch script of a run: the template's body under a header and settings block filled from a JobSpec.

Values reach the script in two ways, each quoted for the parser that reads it:
`#SBATCH` lines are read by sbatch (double quotes, backslash escapes; a newline
would end the directive, so it is refused), everything else by bash
(`shlex.quote`). No user value is ever placed where it is parsed as code.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

from lcl_megatron.errors import UserError

TEMPLATE = "lcl_slurm.sbatch"
BODY_MARKER = "# ---- end of settings "
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ScriptError(UserError, ValueError):
    """A value that cannot be written into the script safely: one line, exit code 2."""


@dataclass
class JobSpec:
    python: str
    workdir: str
    config: str
    run_dir: str
    job_name: str
    nodes: int
    procs_per_node: int
    gpus: bool  # request GPUs from Slurm; False: CPU-only nodes, the backend is gloo
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None  # weights to start from when the run has no checkpoint yet
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int = 1  # CPUs of the one task per node, shared by its training processes
    mem: str = "0"  # memory per node; 0 is all of it
    warning_s: int = 300  # Slurm's warning signal comes this long before the time limit
    max_restarts: int = 3
    rdzv_timeout_s: int = 600
    shutdown_timeout_s: int = 120
    env: dict[str, str] = field(default_factory=dict)
    sbatch_options: list[str] = field(default_factory=list)  # extra `#SBATCH` options, verbatim but quoted

    @property
    def log_pattern(self) -> str:
        """Slurm's batch output file; `%` in the run directory is escaped so Slurm keeps it literal."""
        return self.run_dir.replace("%", "%%") + "/logs/slurm-%j.out"

    @property
    def omp_threads(self) -> str:
        """Threads per training process: the task's CPUs per process."""
        return str(max(1, self.cpus_per_task // self.procs_per_node))


def sbatch_quote(value: str) -> str:
    """One value of an `#SBATCH` line, as sbatch's own parser reads it back."""
    if any(c in value for c in "\n\r\0"):
        raise ScriptError(f"{value!r} contains a line break, which cannot appear in an #SBATCH line")
    if value and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sbatch_line(option: str, value: str | int | None = None) -> str:
    return f"#SBATCH {option}" if value is None else f"#SBATCH {option}={sbatch_quote(str(value))}"


def header(spec: JobSpec) -> list[str]:
    lines = [
        _sbatch_line("--job-name", spec.job_name),
        _sbatch_line("--nodes", spec.nodes),
        _sbatch_line("--ntasks-per-node", 1),
    ]
    if spec.gpus:
        lines.append(_sbatch_line("--gpus-per-node", spec.procs_per_node))
    # Both always: a cluster's defaults are often one CPU and a little memory per task.
    lines.append(_sbatch_line("--cpus-per-task", spec.cpus_per_task))
    lines.append(_sbatch_line("--mem", spec.mem))
    for option, value in (("--time", spec.time), ("--partition", spec.partition), ("--account", spec.account)):
        if value:
            lines.append(_sbatch_line(option, value))
    lines += [
        _sbatch_line("--requeue"),
        _sbatch_line("--signal", f"USR1@{spec.warning_s}"),
        _sbatch_line("--open-mode", "append"),
        _sbatch_line("--output", spec.log_pattern),
    ]
    for option in spec.sbatch_options:
        name, sep, value = option.partition("=")
        if not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", name):
            raise ScriptError(f"--sbatch {option!r}: give an sbatch option such as --qos=high or --exclusive")
        lines.append(_sbatch_line(name, value if sep else None))
    return lines


def settings(spec: JobSpec) -> list[str]:
    q = shlex.quote
    lines = [
        f"LCL_PYTHON={q(spec.python)}",
        f"LCL_WORKDIR={q(spec.workdir)}",
        f"LCL_CONFIG={q(spec.config)}",
        f"LCL_RUN_DIR={q(spec.run_dir)}",
        "LCL_OVERRIDES=(" + " ".join(q(o) for o in spec.overrides) + ")",
        "LCL_TRAIN_ARGS=(" + (f"--init-from {q(spec.init_from)}" if spec.init_from else "") + ")",
        f"PROCS_PER_NODE={spec.procs_per_node}" + ("" if spec.gpus else "  # CPU-only nodes: processes, gloo"),
        f"MAX_RESTARTS={spec.max_restarts}",
        f"RDZV_TIMEOUT={spec.rdzv_timeout_s}",
        f"SHUTDOWN_TIMEOUT={spec.shutdown_timeout_s}",
        f"export OMP_NUM_THREADS={spec.omp_threads}  # CPU threads per training process",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or timed-out NCCL collective ends the process",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "# export NCCL_SOCKET_IFNAME=ib0  # network interface NCCL bootstraps over",
        "# export NCCL_IB_HCA=mlx5        # InfiniBand adapters NCCL may use",
    ]
    for name, value in spec.env.items():
        if not ENV_NAME.match(name):
            raise ScriptError(f"--env {name!r}: not a valid environment variable name")
        lines.append(f"export {name}={q(value)}")
    return lines


def template_text() -> str:
    return resources.files("launchers").joinpath("templates", TEMPLATE).read_text()


def template_body() -> str:
    """Everything from the end-of-settings marker on: the part no run changes."""
    text = template_text()
    start = text.index(BODY_MARKER)
    return text[start:]


def render(spec: JobSpec) -> str:
    if spec.nodes < 1 or spec.procs_per_node < 1:
        raise ScriptError("--nodes and --gpus-per-node must be at least 1")
    intro = [
        "#!/bin/bash",
        f"# Written by `lcl launch slurm` for run {spec.run_dir!r}; resubmit with `sbatch` on this file.",
        f"# Template and documentation: launchers/templates/{TEMPLATE}.",
    ]
    settings_open = "# ---- settings " + "-" * 63
    return "\n".join(intro + header(spec) + ["", settings_open] + settings(spec)) + "\n" + template_body()
