"""The embedded digits corpus built by two processes at once: both get the same files."""

import multiprocessing


from lcl_megatron.data import embedded
from lcl_megatron.data.embedded import ensure_corpus
from tests.support.paths import corpus_file_hashes


def test_concurrent_builds_agree(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]
    assert [p.name for p in (tmp_path / "embedded").iterdir()] == [f"digits-v{embedded.DIGITS_VERSION}"]


def _build_in_child(cache, queue):
    import os
    os.environ["LCL_CACHE_DIR"] = cache
    directory = ensure_corpus("digits")
    queue.put((str(directory), corpus_file_hashes(directory)))
