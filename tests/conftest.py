import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # `tiny_towers`
sys.path.insert(0, str(TESTS.parent))  # the repository root, for `benchmarks`
