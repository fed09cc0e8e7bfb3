import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPERS = TESTS / "helpers"
sys.path.insert(0, str(HELPERS))  # the shared builders, imported by module name: `import tiny_towers`
sys.path.insert(0, str(TESTS.parent))  # the repository root, for `benchmarks`
