"""The docs say what the code does: the API table is current, and every README example runs."""

import importlib.util
import re
from pathlib import Path

from conftest import newest_tl_only

ROOT = Path(__file__).parent.parent


def test_api_table_is_current():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == build.render_doc(), (
        "docs/api.md is stale: run `python docs/build_api.py`"
    )


@newest_tl_only
def test_readme_examples_run_on_the_default_model(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace, on SmolLM2."""
    blocks = re.findall(
        r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S
    )
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)  # the examples write out.html and run.pt
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "out.html").stat().st_size > 100_000 and (tmp_path / "run.pt").exists()
    assert namespace["lcache"].reconstruction_error() <= 1e-5
