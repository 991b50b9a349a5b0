"""Regenerate README.md's output excerpts from the code, so they cannot go stale.

Each excerpt sits between ``<!-- excerpt:NAME -->`` and ``<!-- /excerpt -->`` in README.md, as a fenced block:
- ``demo``: what ``autoquant demo`` prints (the sweep summary), the demo directory written as ``runs/demo``;
- ``compare``: the metrics table and the third prompt's generations of ``autoquant compare`` over three runs of the
  demo's tiny model (the commands are in ``compare_commands``).

    python scripts/readme_excerpts.py                 # run both, rewrite README.md
    python scripts/readme_excerpts.py --only demo     # the demo excerpt only (about a minute on 2 CPU cores)
    python scripts/readme_excerpts.py --check         # exit 1 if README.md differs from what the code prints

tests/test_sweep.py (``test_demo_command_is_a_sweep_with_analysis``) compares README.md's demo excerpt with the demo it
runs, wall-clock times aside (``normalized``), so a change that alters the demo's output fails until this script is
run again.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- excerpt:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /excerpt -->)", re.S)
DEMO_DIR = "runs/demo"
# Calibration of the compare excerpt's runs (README, "Inference and cross-scheme comparison").
COMPARE_CALIBRATION = ["--captions-path", "demo", "--max-calib-samples", "64", "--batch-size", "4",
                       "--calib-seq-len", "64"]
COMPARE_SCHEMES = ("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full")
# Wall-clock figures: the one part of an excerpt that differs from run to run.
_TIMES = re.compile(r"\b\d+(?:\.\d+)? s\b")


def excerpts(readme: str) -> dict[str, str]:
    """Excerpt name -> its text (the fenced block's content)."""
    out = {}
    for m in BLOCK.finditer(readme):
        body = m.group("body").strip("\n")
        lines = body.splitlines()
        if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].startswith("```"):
            lines = lines[1:-1]
        out[m.group("name")] = "\n".join(lines)
    return out


def replace_excerpts(readme: str, new: dict[str, str]) -> str:
    """``readme`` with the named excerpts' blocks replaced by ``new`` (others kept)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in new:
            return m.group(0)
        return f"{m.group(1)}```\n{new[name].strip()}\n```\n{m.group(4)}"

    return BLOCK.sub(sub, readme)


def normalized(text: str) -> list[str]:
    """An excerpt's lines with wall-clock times blanked, for comparing runs."""
    return [_TIMES.sub("<t> s", line.rstrip()) for line in text.strip().splitlines()]


def demo_excerpt(stdout: str, demo_dir: str | Path) -> str:
    """The sweep summary ``autoquant demo`` printed, from its title to the line that says how to ship a trial, with
    the demo directory written as ``runs/demo``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Sweep demo"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("Ship a trial"))
    return "\n".join(lines[start:end + 1]).replace(str(Path(demo_dir).resolve()), DEMO_DIR)


def compare_excerpt(comparison_md: str) -> str:
    """The metrics table and the third prompt's generations of a comparison.md."""
    lines = comparison_md.splitlines()
    table_start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    table_end = next(i for i in range(table_start, len(lines)) if not lines[i].startswith("|"))
    p3 = next(i for i, line in enumerate(lines) if line.startswith("**Prompt 3:**"))
    p3_end = next((i for i in range(p3 + 4, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([*lines[table_start:table_end], "", *lines[p3:p3_end]])


def _autoquant(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "auto_quantize_model.cli", *args], cwd=REPO, text=True,
                         capture_output=True)
    if res.returncode != 0:
        raise SystemExit(f"autoquant {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout


def compare_commands(work: Path) -> list[list[str]]:
    """The runs and the comparison behind the compare excerpt (autoquant arguments)."""
    model = str(work / "demo" / "tiny-model")
    runs = [["run", "--scheme-name", s, "--model-dir", model, *COMPARE_CALIBRATION, "--output-dir", str(work / s)]
            for s in COMPARE_SCHEMES]
    return [*runs, ["compare", *(str(work / s) for s in COMPARE_SCHEMES), "--model-dir", model,
                    "--eval-captions", "demo", "--output-dir", str(work / "compare")]]


def generate(work: Path, only: str | None) -> dict[str, str]:
    """Run the demo (and the comparison) under ``work``; returns the excerpts."""
    out = {}
    demo_dir = work / "demo"
    stdout = _autoquant("demo", "--output-dir", str(demo_dir))
    if only in (None, "demo"):
        out["demo"] = demo_excerpt(stdout, demo_dir)
    if only in (None, "compare"):
        for args in compare_commands(work):
            _autoquant(*args)
        out["compare"] = compare_excerpt((work / "compare" / "comparison.md").read_text(encoding="utf-8"))
    return out


def main(argv: list[str] | None = None) -> int:
    """Regenerate (or, with --check, verify) README.md's excerpts."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", help="where the demo and runs go (default: a temporary directory)")
    p.add_argument("--only", choices=("demo", "compare"), help="one excerpt only")
    p.add_argument("--check", action="store_true", help="compare with README.md (times aside); write nothing")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="readme-excerpts-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        new = generate(work, args.only)
    readme = README.read_text(encoding="utf-8")
    have = excerpts(readme)
    missing = sorted(set(new) - set(have))
    if missing:
        raise SystemExit(f"README.md has no <!-- excerpt:{missing[0]} --> block")
    if args.check:
        stale = [n for n in new if normalized(new[n]) != normalized(have[n])]
        print("stale: " + ", ".join(stale) if stale else "README excerpts match the code")
        return 1 if stale else 0
    README.write_text(replace_excerpts(readme, new), encoding="utf-8")
    print(f"rewrote {', '.join(sorted(new))} in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
