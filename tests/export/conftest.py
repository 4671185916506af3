"""Make the hand-built runs in synthetic_circuits.py importable from every test folder."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
