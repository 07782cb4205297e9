"""The test tree itself: pytest imports test files by basename (no __init__.py in tests/unit or
tests/integration), so two files with one name make collection fail on a clean checkout."""

from collections import Counter
from pathlib import Path


def test_test_file_basenames_are_unique():
    root = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in root.rglob("test_*.py"))
    dup = sorted(n for n, c in names.items() if c > 1)
    assert not dup, f"rename one of each: {dup}"
