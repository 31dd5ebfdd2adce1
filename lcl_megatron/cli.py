"""The `lcl` command: a thin dispatcher to the module that owns each subcommand.

Each entry point is `main(argv: list[str]) -> int` and parses its own flags, so
subcommands stay independent and importing one never pays for the others.
"""

import importlib
import sys
import warnings

# megatron-core warns at import that optional GPU extensions are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(APEX|Apex|apex).*not (installed|found|available).*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

COMMANDS = {
    ("train",): "lcl_megatron.training.train:main",
    ("eval", "zeroshot"): "lcl_megatron.eval.zeroshot:main",
    ("eval", "loss"): "lcl_megatron.eval.loss:main",
    ("eval", "probe"): "lcl_megatron.eval.probe:main",
    ("convert", "from-openclip"): "lcl_megatron.convert.openclip:from_openclip_main",
    ("convert", "to-openclip"): "lcl_megatron.convert.openclip:to_openclip_main",
    ("convert", "to-hf"): "lcl_megatron.convert.hf:main",
    ("convert", "reshard"): "lcl_megatron.convert.reshard:main",
    ("convert", "inspect"): "lcl_megatron.convert.inspect:main",
    ("plan",): "lcl_megatron.plan:main",
    ("bench", "kernels"): "kernels.bench:main",
    ("bench", "data"): "lcl_megatron.data.bench:main",
    ("prepare", "mmc4"): "lcl_megatron.data.prepare:mmc4_main",
    ("prepare", "obelics"): "lcl_megatron.data.prepare:obelics_main",
    ("launch", "slurm"): "launchers.slurm:main",
    ("launch", "local"): "launchers.local:main",
}


def _usage() -> str:
    lines = ["usage: lcl COMMAND [ARGS...]", "", "commands:"]
    lines += ["  " + " ".join(words) for words in COMMANDS]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, target in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            module_name, func_name = target.split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and module_name.startswith(e.name):
                    print(f"lcl: '{' '.join(words)}' is not available in this install", file=sys.stderr)
                    return 2
                raise
            return int(getattr(module, func_name)(argv[len(words):]) or 0)
    print(_usage(), file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
