"""The `lcl` command: a thin dispatcher to the module that owns each subcommand.

Each entry point is `main(argv: list[str]) -> int` and parses its own flags, so
subcommands stay independent and importing one never pays for the others.
"""

import importlib
import os
import sys
import warnings

# Warnings raised inside megatron-core and DeepSpeed that a user can do nothing about: optional
# extensions a CPU or partial install lacks, and torch's renamed collectives (DeepSpeed calls the old
# names every step). `lcl --verbose` (or LCL_VERBOSE=1, which torchrun's workers inherit) shows them.
EXPECTED_WARNINGS = (
    ".*Transformer Engine and Apex are not installed.*",  # megatron-core, at import
    ".*(APEX|Apex|apex).*not (installed|found|available).*",
    ".*full scope is deprecated.*",
    ".*torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor). is deprecated.*",
)
VERBOSE_ENV = "LCL_VERBOSE"

COMMANDS = {
    ("train",): "lcl_megatron.training.train:main",
    ("eval", "zeroshot"): "lcl_megatron.eval.zeroshot:main",
    ("eval", "loss"): "lcl_megatron.eval.loss:main",
    ("eval", "retrieval"): "lcl_megatron.eval.retrieval:main",
    ("eval", "probe"): "lcl_megatron.eval.probe:main",
    ("data", "sample"): "lcl_megatron.data.sample:main",
    ("convert", "from-openclip"): "lcl_megatron.convert.openclip:from_openclip_main",
    ("convert", "to-openclip"): "lcl_megatron.convert.openclip:to_openclip_main",
    ("convert", "to-hf"): "lcl_megatron.convert.hf:main",
    ("convert", "to-megatron-vision"): "lcl_megatron.convert.megatron_vision:main",
    ("convert", "reshard"): "lcl_megatron.convert.reshard:main",
    ("convert", "inspect"): "lcl_megatron.convert.inspect:main",
    ("plan",): "lcl_megatron.plan.cli:main",
    ("profile",): "lcl_megatron.bench.profile:main",
    ("bench", "kernels"): "lcl_megatron.bench.kernels:main",
    ("bench", "data"): "lcl_megatron.data.bench:main",
    ("bench", "train"): "lcl_megatron.bench.train:main",
    ("bench", "resume"): "lcl_megatron.bench.resume:main",
    ("bench", "checkpoint"): "lcl_megatron.bench.checkpoint:main",
    ("prepare", "mmc4"): "lcl_megatron.data.prepare.commands:mmc4_main",
    ("prepare", "obelics"): "lcl_megatron.data.prepare.commands:obelics_main",
    ("launch", "slurm"): "launchers.slurm:main",
    ("launch", "local"): "launchers.local:main",
    ("config", "show"): "lcl_megatron.config_docs:show_main",
    ("config", "keys"): "lcl_megatron.config_docs:keys_main",
}

# The one line `lcl --help` shows for each command (every entry of COMMANDS has one);
# each command's own `--help` explains it in full, with an example.
SUMMARIES = {
    ("train",): "train a model (one process, or under torchrun / Slurm); --resume continues a run",
    ("eval", "zeroshot"): "zero-shot top-1 of a checkpoint with the reference's recipe",
    ("eval", "loss"): "the losses of one saved batch under a checkpoint, as one JSON line",
    ("eval", "retrieval"): "image-to-text and text-to-image recall@1/5/10 of a checkpoint on image-text pairs",
    ("eval", "probe"): "linear and attentive probes on a checkpoint's frozen features, and its latents' spread",
    ("data", "sample"): "write the batch a training step would see (for eval loss --batch, or as a picture)",
    ("convert", "from-openclip"): "import a reference (OpenCLIP-format) checkpoint",
    ("convert", "to-openclip"): "export a checkpoint in the reference's OpenCLIP format",
    ("convert", "to-hf"): "export the vision encoder as a Hugging Face CLIPVisionModel",
    ("convert", "to-megatron-vision"): "export the vision encoder for Megatron-LM's multimodal training",
    ("convert", "reshard"): "rewrite a checkpoint's training state for another parallel layout",
    ("convert", "inspect"): "what a checkpoint holds, with every file's checksum verified",
    ("plan",): "per-GPU memory, FLOPs and communication of a config's parallel layout",
    ("profile",): "profile a few training steps of a config and list the operators that dominate",
    ("bench", "kernels"): "benchmark the fused loss kernels against eager torch",
    ("bench", "data"): "benchmark the data pipeline (token utilisation, documents/s)",
    ("bench", "train"): "samples/s, tokens/s, MFU and peak memory of a config's training step",
    ("bench", "resume"): "seconds from a saved data position to the first resumed batch, near and far into the stream",
    ("bench", "checkpoint"): "seconds per rank to save a ZeRO-3 checkpoint of a ~1B-parameter model with 4 CPU ranks",
    ("prepare", "mmc4"): "convert MMC4 documents and images into training shards",
    ("prepare", "obelics"): "convert OBELICS parquet documents into training shards",
    ("launch", "slurm"): "submit a training run to Slurm (checkpoints, requeues and resumes itself)",
    ("launch", "local"): "train on this machine with N processes under torchrun, restarting failed ranks",
    ("config", "show"): "the resolved config as YAML, defaults marked",
    ("config", "keys"): "every config key with its type, default and meaning",
}


def _usage(group: str | None = None) -> str:
    """The command list; `group` (e.g. "convert") keeps that group's commands only."""
    names = {words: " ".join(words) for words in COMMANDS if group is None or words[0] == group}
    width = max(map(len, names.values()))
    lines = ["usage: lcl [--verbose] COMMAND [ARGS...]", "", "Latent Compression Learning at scale: train, evaluate, convert, launch.",
             "", "commands:"]
    lines += [f"  {names[words]:<{width}}  {SUMMARIES.get(words, '')}".rstrip() for words in names]
    lines += ["", "`lcl COMMAND --help` explains a command, with an example; docs/ explains the rest.",
              "--verbose (or LCL_VERBOSE=1) also shows megatron-core's and DeepSpeed's warnings about optional "
              "components and deprecated calls."]
    return "\n".join(lines)


def run(name: str, entry, argv: list[str]) -> int:
    """Run one subcommand: a user's mistake becomes one line and exit code 2, Ctrl-C exit code 130."""
    from lcl_megatron.errors import UserError

    try:
        return int(entry(argv) or 0)
    except UserError as e:
        print(f"lcl {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lcl {name}: interrupted", file=sys.stderr)
        return 130


def _quiet_expected_noise() -> None:
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        # DeepSpeed warns at every start that it "was unable to detect" a GPU when there is none; tell it.
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--verbose"]:
        argv = argv[1:]
        os.environ[VERBOSE_ENV] = "1"
    for words, target in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            module_name, func_name = target.split(":")
            if os.environ.get(VERBOSE_ENV) != "1" and words[0] != "config":
                _quiet_expected_noise()
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and module_name.startswith(e.name):
                    print(f"lcl: '{' '.join(words)}' is not available in this install", file=sys.stderr)
                    return 2
                raise
            return run(" ".join(words), getattr(module, func_name), argv[len(words):])
    asked = bool(argv) and argv[-1] in ("-h", "--help")
    group = argv[0] if len(argv) == 2 and any(words[0] == argv[0] for words in COMMANDS) else None
    print(_usage(group if asked else None), file=sys.stdout if asked else sys.stderr)
    return 0 if asked and (len(argv) == 1 or group) else 2


if __name__ == "__main__":
    sys.exit(main())
