"""`lcl prepare obelics` on small synthetic parquet files, with both image stores."""

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from lcl_megatron.data.prepare.commands import obelics_main
from lcl_megatron.data.shards import read_shard, write_shard


def png(color) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (12, 10), color).save(out, format="PNG")
    return out.getvalue()


URLS = [f"https://example.org/img/{n}.png" for n in range(6)]
ROWS = [  # (images, texts): exactly one non-null per position
    ([URLS[0], None, URLS[1]], [None, "a cat on a mat", None]),
    ([None, URLS[2], None], ["first paragraph", None, "second paragraph"]),
    ([None, URLS[5]], ["the image of this one is missing", None]),  # -> no usable image
    ([None], ["text only"]),  # -> no usable image
    ([URLS[3], "both"], [None, "both"]),  # -> malformed
    ([None, URLS[4]], ["a corrupt image follows", None]),  # -> no usable image (corrupt)
]


def write_parquet(path, rows, row_group_size=2):
    table = pa.table({"images": [r[0] for r in rows], "texts": [r[1] for r in rows],
                      "metadata": [json.dumps({"n": n}) for n in range(len(rows))]})
    pq.write_table(table, path, row_group_size=row_group_size)


def image_bytes():
    return {url: png((40 * n, 80, 120)) for n, url in enumerate(URLS[:4])} | {URLS[4]: b"\x89PNG broken"}


@pytest.fixture
def parquet(tmp_path):
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "part-0.parquet", ROWS)
    return tmp_path / "pq" / "*.parquet"


def run(parquet, images, out):
    assert obelics_main(["--parquet", str(parquet), "--images", str(images), "--out", str(out),
                         "--workers", "1", "--no-progress"]) == 0
    return json.loads((out / "report.json").read_text())["counts"]


def check_documents(out):
    docs = {s["__key__"]: s for s in read_shard(out / "part-0.tar")}
    assert sorted(docs) == ["r00000000", "r00000001"]
    items = json.loads(docs["r00000000"]["json"])["items"]
    assert items == [{"image": "img0.png"}, {"text": "a cat on a mat"}, {"image": "img1.png"}]
    assert docs["r00000000"]["img1.png"] == image_bytes()[URLS[1]]
    assert json.loads(docs["r00000001"]["json"])["items"][1] == {"image": "img0.png"}


EXPECTED = {"docs_in": 6, "docs_out": 2, "docs_dropped_no_usable_image": 3, "docs_dropped_malformed": 1,
            "images_in": 7, "images_out": 3, "images_dropped_missing": 1, "images_dropped_corrupt": 1,
            "images_dropped_malformed_doc": 2}


def test_hash_named_image_store(parquet, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for url, data in image_bytes().items():
        digest = hashlib.sha256(url.encode()).hexdigest()
        folder = store / digest[:2] if url.endswith("1.png") else store  # both layouts
        folder.mkdir(exist_ok=True)
        (folder / f"{digest}.png").write_bytes(data)
    counts = run(parquet, store, tmp_path / "out")
    assert {k: counts.get(k, 0) for k in EXPECTED} == EXPECTED
    check_documents(tmp_path / "out")


def test_img2dataset_tars_joined_by_url(parquet, tmp_path):
    (tmp_path / "tars").mkdir()
    samples = [(f"{n:09d}", {"png": data, "json": json.dumps({"url": url, "status": "success"}).encode()})
               for n, (url, data) in enumerate(image_bytes().items())]
    write_shard(tmp_path / "tars" / "00000.tar", samples[:3])
    write_shard(tmp_path / "tars" / "00001.tar", samples[3:])
    counts = run(parquet, tmp_path / "tars", tmp_path / "out")
    assert {k: counts.get(k, 0) for k in EXPECTED} == EXPECTED
    check_documents(tmp_path / "out")


def test_truncated_parquet_is_counted_and_other_files_convert(parquet, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for url, data in image_bytes().items():
        (store / f"{hashlib.sha256(url.encode()).hexdigest()}.png").write_bytes(data)
    broken = tmp_path / "pq" / "part-1.parquet"
    write_parquet(broken, ROWS)
    broken.write_bytes(broken.read_bytes()[:300])
    counts = run(parquet, store, tmp_path / "out")
    assert counts["files_unreadable"] == 1 and counts["docs_out"] == 2
    check_documents(tmp_path / "out")
