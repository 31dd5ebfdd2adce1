"""`make test`'s schedule: the files named as the longest exist, so that they really run first."""

from tests.conftest import LONGEST_FIRST, TESTS


def test_longest_files_exist():
    missing = [name for name in LONGEST_FIRST if not (TESTS / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that are gone: {missing}"
