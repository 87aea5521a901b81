"""The documentation that is generated from code, and the README's budget."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_is_current():
    r = subprocess.run([sys.executable, ROOT / "scripts" / "recipe_docs.py", "--check"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, "docs/recipes.md is out of date: run python scripts/recipe_docs.py"


def test_every_recipe_field_is_documented():
    from trtglm.core.recipe import Recipe

    text = (ROOT / "docs" / "recipes.md").read_text()
    for section, field in Recipe.model_fields.items():
        assert f"### `{section}`" in text
        for name, sub in field.annotation.model_fields.items():
            assert f"| `{name}" in text, f"{section}.{name}"
            assert sub.description or hasattr(sub.annotation, "model_fields"), f"{section}.{name} has no description"


def test_readme_fits_its_budget_and_its_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.startswith("# trtglm\n\n```bash\nmake demo")
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (ROOT / link).exists(), link
