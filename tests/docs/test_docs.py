"""The docs' code is real: the README example runs, the plugin guide embeds the tested plugin."""

from __future__ import annotations

import re
from pathlib import Path

import peftreg

ROOT = Path(__file__).resolve().parents[2]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = _python_blocks(ROOT / "README.md")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    reloaded, model = namespace["reloaded"], namespace["model"]
    assert (tmp_path / "my-adapter" / "adapter.json").is_file()
    assert reloaded.active_adapters == ["default"]
    # two layers, rank 8, q_proj 64->64 and v_proj 64->32 (two key/value heads of width 16)
    assert model.summary().rows[0].adapter_params == 2 * 8 * ((64 + 64) + (64 + 32))


def test_plugin_guide_embeds_the_tested_plugin_verbatim():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    toy = ROOT / "tests" / "plugin_dists" / "peftreg-toy"
    for source in (toy / "pyproject.toml", toy / "peftreg_toy" / "offset.py",
                   toy / "peftreg_toy" / "soft_prompt.py"):
        assert source.read_text() in guide, f"docs/plugins.md is out of date with {source.name}"


def test_methods_guide_examples_run():
    blocks = _python_blocks(ROOT / "docs" / "methods.md")
    assert len(blocks) >= 5
    for index, block in enumerate(blocks):
        namespace: dict = {}
        exec(compile(block, f"docs/methods.md[{index}]", "exec"), namespace)
        adapted = [v for v in namespace.values() if isinstance(v, peftreg.AdaptedModel)]
        assert adapted, f"docs/methods.md example {index} adapts no model"
        assert all(a.summary().rows for a in adapted)


def test_plugin_guide_custom_op_example_passes_opcheck_and_gradcheck():
    import torch

    blocks = [b for b in _python_blocks(ROOT / "docs" / "plugins.md") if "custom_op" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/plugins.md[custom_op]", "exec"), namespace)
    row_scale = namespace["row_scale"]
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(row_scale, (x, scale))
    assert torch.autograd.gradcheck(row_scale, (x, scale))
    compiled = torch.compile(row_scale, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, scale), x * scale)
