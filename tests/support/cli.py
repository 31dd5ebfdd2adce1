"""`lcl` in the test process: exit code and captured output, for commands that need no process group."""

from lcl_megatron import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
