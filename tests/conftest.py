"""Puts tests/lib on the import path: every test module imports its helpers from
`sglang_testing` (never from a `conftest`, whose module name is shared by every folder)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
