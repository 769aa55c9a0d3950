"""The docs say what the code does: the API table is current and matches ``lens_linear.__all__``,
the README's keyword-only statement holds for every documented signature, and every README
example runs."""

import importlib
import importlib.util
import inspect
import re
import types
from pathlib import Path

from conftest import newest_tl_only

import lens_linear as ll

ROOT = Path(__file__).parent.parent
API = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def build_api():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def documented_callables():
    """``(where, callable)`` for every function and public method docs/api.md lists."""
    out = []
    for section, objs in build_api().PUBLIC.items():
        for obj in objs:
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            if not inspect.isclass(obj):
                out.append((f"{section}: {obj.__name__}", obj))
                continue
            for name, member in inspect.getmembers(obj):
                static = inspect.getattr_static(obj, name)
                if not name.startswith("_") and callable(member) and not isinstance(static, type):
                    out.append((f"{section}: {obj.__name__}.{name}", member))
    return out


def test_api_table_is_current():
    assert API == build_api().render_doc(), "docs/api.md is stale: run `python docs/build_api.py`"


def test_all_is_what_lens_linear_exports_and_the_api_table_lists():
    assert len(set(ll.__all__)) == len(ll.__all__) and all(hasattr(ll, n) for n in ll.__all__)
    public = {
        n
        for n, v in vars(ll).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert public == set(ll.__all__), "a public name of lens_linear is missing from __all__"
    namespace: dict = {}
    exec("from lens_linear import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(ll.__all__)
    undocumented = [n for n in ll.__all__ if f"| `{n}` |" not in API]
    assert not undocumented, f"in __all__ but without a row in docs/api.md: {undocumented}"
    # a section named after a module lists that module's own names
    for section, objs in build_api().PUBLIC.items():
        if section == "lens_linear" or section.startswith("lens_linear."):
            module = importlib.import_module(section)
            for obj in objs:
                assert getattr(module, obj.__name__, None) is obj, (section, obj.__name__)
                if section == "lens_linear":
                    assert obj.__name__ in ll.__all__, obj.__name__


def test_readme_keyword_only_statement_holds():
    """The README names the vocabulary arguments that are keyword-only wherever they appear:
    every documented function and method keeps them so."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    statement = re.search(r"\(tokens shown\)\. (.*?) are keyword-only", readme, re.S)
    assert statement, "the README's keyword-only statement moved: update this test with it"
    names = re.findall(r"`(\w+)`", statement.group(1))
    assert names == ["pos", "input_hook", "input_pos", "head", "detached"], names
    checked, positional = 0, []
    for where, fn in documented_callables():
        for p in inspect.signature(fn).parameters.values():
            if p.name in names:
                checked += 1
                if p.kind is not p.KEYWORD_ONLY:
                    positional.append(f"{where}({p.name})")
    assert checked >= 40 and not positional, positional


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
