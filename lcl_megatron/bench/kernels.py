"""`lcl bench kernels`: the fused losses against eager torch (the measurements: kernels/bench.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernels import bench
from lcl_megatron.utils import write_markdown_section


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lcl bench kernels", description=bench.__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl bench kernels --quick\n"
                                            "  lcl bench kernels  # full run, writes BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="small shapes; print only unless --output is given")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3 quick, 2 full)")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file for the Kernels section (default BENCHMARKS.md for a full run)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="which rows to run (default all: CPU rows, and GPU rows when CUDA is available)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 2)
    if repeats < 1:
        print("lcl bench kernels: --repeats must be at least 1", file=sys.stderr)
        return 2
    rows, notes = bench.run_all(args.quick, repeats, args.device)
    table = bench.format_table(rows)
    targets = bench.target_lines(rows, notes, args.quick)
    print(table)
    print("\n".join(targets))
    output = args.output or (None if args.quick else Path("BENCHMARKS.md"))
    if output is not None and not args.no_write:
        write_markdown_section(output, bench.SECTION, bench.render_section(table, targets, args.quick))
        print(f"wrote the {bench.SECTION[3:]} section of {output}")
    return 0
