"""data.path as users write it: brace lists of shards and pipe: commands, with mixing weights."""

import shutil

import pytest

from lcl_megatron.config import ConfigError, load_config, parse_data_entry
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.stream import resolve_shards
from lcl_megatron.data.shards import ShardError, read_shard, write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three real pair shards (digits), named as img2dataset names them."""
    from lcl_megatron.data.embedded import ensure_corpus

    source = sorted(ensure_corpus("digits").glob("train-*.tar"))[0]
    samples = list(read_shard(source))
    out = tmp_path_factory.mktemp("laion")
    for i in range(3):
        write_shard(out / f"{i:05d}.tar", ((s["__key__"], {k: v for k, v in s.items() if k != "__key__"})
                                          for s in samples[i * 20:(i + 1) * 20]))
    return out


def test_brace_lists_and_pipes_name_shards(shards):
    assert resolve_shards(f"{shards}/{{00000..00001}}.tar") == [f"{shards}/00000.tar", f"{shards}/00001.tar"]
    assert resolve_shards(f"pipe:cat {shards}/{{00001,00002}}.tar") == [f"pipe:cat {shards}/00001.tar",
                                                                       f"pipe:cat {shards}/00002.tar"]
    assert parse_data_entry(f"pipe:cat {shards}/{{00000..00002}}.tar:0.5") == (f"pipe:cat {shards}/{{00000..00002}}.tar", 0.5)


def test_a_pipe_reads_what_the_file_holds_and_a_failing_command_is_a_shard_error(shards):
    assert list(read_shard(f"pipe:cat {shards}/00001.tar")) == list(read_shard(shards / "00001.tar"))
    with pytest.raises(ShardError, match="No such file"):
        list(read_shard(f"pipe:cat {shards}/missing.tar"))


def test_the_loader_gives_the_same_batches_from_files_braces_and_pipes(shards):
    cfg = load_config(None, ["data.heldout=", "data.shuffle_buffer=8", "data.augment=false"])

    def first_batches(path):
        cfg.data.path = [path]
        loader = build_train_loader(cfg.data, image_size=32, num_image_tokens=16, context_length=64,
                                    micro_batch_size=4, dp_rank=0, dp_size=1, seed=3)
        batches = iter(loader)
        return [next(batches) for _ in range(3)]

    by_directory = first_batches(str(shards))
    for path in (f"{shards}/{{00000..00002}}.tar", f"pipe:cat {shards}/{{00000..00002}}.tar"):
        for a, b in zip(by_directory, first_batches(path)):
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_brace_list_with_a_missing_shard_is_refused_in_one_line(shards, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(shards, partial)
    (partial / "00002.tar").unlink()
    with pytest.raises(ConfigError, match=r"00002\.tar' does not exist"):
        load_config(None, [f"data.path=['{partial}/{{00000..00002}}.tar']", "data.heldout="])
    load_config(None, [f"data.path=['{partial}/{{00000..00001}}.tar', 'pipe:cat {partial}/00000.tar:2']",
                       "data.heldout="])
