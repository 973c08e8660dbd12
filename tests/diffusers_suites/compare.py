"""Run diffusers' own model test suites on the unconverted and on the converted models and
report every test that passes on the original but not after ``diffcr.convert``.

diffusers' test files are not in its wheel, so this needs a checkout of diffusers' source
(``tests/`` of the release range in ``[tool.diffcr] tested-diffusers``) and is run by hand,
not by CI::

    python tests/diffusers_suites/compare.py DIFFUSERS_SOURCE [--family flux ...] [--out DIR]

Each family's suite runs twice under pytest (``-n 2``; ``--workers``): as it is, then with
``convert_plugin`` (every model of the family that a test builds or loads is converted at
kept ratio 1). Writes ``DIR/<family>-{plain,converted}.xml`` (JUnit) and ``DIR/summary.md``,
and exits 1 when a test that passes unconverted fails or errors converted (the contract:
a converted model at kept ratio 1 is a drop-in for the original)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = {
    "pixart": "test_models_pixart_transformer2d.py",
    "dit": "test_models_dit_transformer2d.py",
    "sd3": "test_models_transformer_sd3.py",
    "flux": "test_models_transformer_flux.py",
    "wan": "test_models_transformer_wan.py",
    "qwenimage": "test_models_transformer_qwenimage.py",
    "hunyuanvideo": "test_models_transformer_hunyuan_video.py",
}


def outcomes(xml: Path) -> dict:
    """test id -> passed / failed / error / skipped, from a JUnit file."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[tid] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                    else "skipped" if "skipped" in kinds else "passed")
    return out


def run(source: Path, family: str, converted: bool, out: Path, workers: int = 2) -> dict:
    xml = out / f"{family}-{'converted' if converted else 'plain'}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
           f"--junitxml={xml}", f"tests/models/transformers/{SUITES[family]}"]
    env = None
    if converted:
        import os

        cmd[4:4] = ["-p", "convert_plugin"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    subprocess.run(cmd, cwd=source, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    if not xml.is_file():
        raise SystemExit(f"{family}: pytest wrote no report ({' '.join(cmd)})")
    return outcomes(xml)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a diffusers source checkout (holds tests/)")
    ap.add_argument("--family", action="append", choices=sorted(SUITES),
                    help="families to run (default: all seven)")
    ap.add_argument("--out", type=Path, default=Path("diffusers-suites"))
    ap.add_argument("--workers", type=int, default=2,
                    help="pytest-xdist workers per suite run (default 2)")
    a = ap.parse_args(argv)
    if not (a.source / "tests" / "models" / "transformers").is_dir():
        ap.error(f"{a.source} has no tests/models/transformers (a diffusers source checkout?)")
    a.out.mkdir(parents=True, exist_ok=True)
    import diffusers

    rows, broken = [], []
    for fam in a.family or list(SUITES):
        plain = run(a.source, fam, False, a.out, a.workers)
        conv = run(a.source, fam, True, a.out, a.workers)
        count = {k: sum(v == k for v in plain.values()) for k in ("passed", "skipped")}
        lost = sorted(t for t, v in plain.items() if v == "passed" and conv.get(t) != "passed")
        extra = sorted(t for t, v in conv.items() if plain.get(t) == "skipped" and v != "skipped")
        rows.append((fam, count["passed"], count["skipped"],
                     sum(conv.get(t) == "passed" for t, v in plain.items() if v == "passed"),
                     len(lost), [f"{t} ({conv.get(t)})" for t in extra]))
        broken += [f"{fam}: {t} ({conv.get(t, 'missing')})" for t in lost]
        print(f"{fam}: {count['passed']} pass unconverted, {len(lost)} of them not converted",
              flush=True)
    lines = [f"diffusers {diffusers.__version__}; suites from {a.source.name}/tests/models/"
             "transformers; kept ratio 1", "",
             "| family | pass unconverted | skipped unconverted | of those passing, pass "
             "converted | lost | skipped unconverted, run converted |",
             "|---|---|---|---|---|---|"]
    for fam, p, s, kept, lost, extra in rows:
        lines.append(f"| {fam} | {p} | {s} | {kept} | {lost} | {'; '.join(extra) or '-'} |")
    lines += ["", "Lost (pass unconverted, not converted):", ""] + \
        ([f"- {b}" for b in broken] or ["- none"])
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
