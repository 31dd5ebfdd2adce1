"""Test session settings: Triton kernels run in its interpreter on CPU (set
before anything imports triton)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
