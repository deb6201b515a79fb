"""The benchmark scripts' tests: bench/ goes first on the path, since its scripts import each other (and
bench/tasks, bench/answers) as top-level modules, as `python bench/NAME.py` runs them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
