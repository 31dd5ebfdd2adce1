"""Checkpoints: the one owner of their format and of every read and write of them.

    format.py           file names, the COMPLETE manifest (SHA-256), the finder, safe loads and atomic saves
    consolidated.py     the whole model under its single-process names (read, write, gathered from an engine)
    deepspeed_files.py  DeepSpeed's per-rank files of any layout, read in one process
    training_state.py   the layout-free optimizer state: from DeepSpeed's files, into an engine of any layout
    manager.py          a training run's saves, resume and pruning

Training (`lcl train`) and the tools (`lcl convert`, `lcl eval`) import it; it
imports neither of them.
"""
