"""Print pip constraints that pin every dependency of pyproject.toml (and the given extras) to the lowest
version its range admits, for the compatibility workflow's "lowest" job.

    python scripts/lowest_constraints.py dev rtx > lowest.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra]]
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[[^]]*\])?\s*.*?(?:>=|==)\s*([0-9][^,;\s]*)", requirement)
    if match:
        print(f"{match[1]}=={match[2]}")
