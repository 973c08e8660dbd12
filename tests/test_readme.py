"""The README's usage snippet runs as written (keeps the README true)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_snippet_runs(tmp_path, monkeypatch):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "diffcr.convert(" in b)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(snippet, "README.md", "exec"), ns)
    assert (tmp_path / "diffcr-ckpt" / "diffcr.safetensors").exists()
    assert ns["out"].shape == (2, 8, 8, 8)
