"""Calibration prompts that contain no benchmark text: built from the Python standard library's own source.

Defaults (hot sets, policy settings) and trained heads must never see Spec-Bench, MT-bench or HumanEval. This
module builds chat-style prompts from what every machine with Python has: the docstrings, signatures and code of
standard-library modules, plus small templated arithmetic problems. Families (so the calibration spreads over
the kinds of text a served model is asked for):

* ``code``: "Write a Python function ``sig`` that <first docstring sentence>."
* ``explain``: "Explain what this function does" + its source.
* ``complete``: "Complete this code" + the first lines of a function.
* ``summarize``: "Summarize this documentation" + a docstring paragraph.
* ``translate``: "Translate into <language>" + a docstring sentence (and the reverse instruction).
* ``qa``: a docstring as context, a question about it.
* ``math``: templated multi-step arithmetic word problems (numbers from the seeded generator).

Deterministic for a given ``seed`` and Python version (files are read in sorted order). Reads files only; no
network, no model.
"""

from __future__ import annotations

import ast
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FAMILIES", "CalibrationPrompt", "calibration_prompts"]

FAMILIES = ("code", "explain", "complete", "summarize", "translate", "qa", "math")
# Standard-library packages/modules whose source is read (stable, present everywhere, varied domains).
_STDLIB = ("argparse", "asyncio", "collections", "csv", "datetime", "email", "fractions", "functools", "heapq",
           "http", "json", "logging", "pathlib", "shutil", "statistics", "string", "textwrap", "urllib", "zipfile",
           "calendar", "difflib", "decimal", "ipaddress", "random", "tarfile", "configparser", "inspect", "typing")
_LANGS = ("French", "German", "Spanish", "Chinese", "Japanese", "Italian", "Portuguese", "Russian")


@dataclass(frozen=True)
class CalibrationPrompt:
    prompt: str
    family: str
    source: str  # module (and function) the text came from, or "template"


@dataclass(frozen=True)
class _Func:
    module: str
    name: str
    signature: str
    doc: str
    source: str


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    for name in _STDLIB:
        p = root / name
        if p.is_dir():
            out += sorted(x for x in p.rglob("*.py") if "test" not in x.parts)
        elif (root / f"{name}.py").is_file():
            out.append(root / f"{name}.py")
    return out


def _functions(path: Path) -> Iterator[_Func]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    module = path.stem
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node) or ""
        src = ast.get_source_segment(text, node) or ""
        if len(doc) < 40 or not (3 <= src.count("\n") <= 60):
            continue
        args = ast.unparse(node.args)
        yield _Func(module, node.name, f"{node.name}({args})", doc.strip(), src)


def _first_sentence(doc: str) -> str:
    para = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    s = para.split(". ", 1)[0].rstrip(".")
    return s[:1].lower() + s[1:] if s else s


def _paragraph(doc: str, rng: random.Random) -> str:
    paras = [p.replace("\n", " ").strip() for p in doc.split("\n\n") if len(p.strip()) > 60]
    return rng.choice(paras) if paras else doc.replace("\n", " ")


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 12)
    item = rng.choice(("apples", "books", "tickets", "boxes", "pencils", "bottles", "chairs", "coins"))
    who = rng.choice(("A shop", "A school", "A farmer", "A library", "A factory", "A club"))
    kind = rng.randrange(4)
    if kind == 0:
        return (f"{who} has {a} {item}. It buys {b} more every week for {c} weeks and then gives away half. "
                f"How many {item} are left? Explain step by step.")
    if kind == 1:
        return (f"A train travels {a * 5} km in {c} hours, then {b * 3} km in {c + 1} hours. "
                "What is its average speed over the whole trip? Show your reasoning.")
    if kind == 2:
        return f"Solve for x: {c}x + {a} = {b * c + a}. Then check your answer by substitution."
    return (f"The price of {item} rose by {b}% and then fell by {c}%. If the original price was {a} dollars, "
            "what is the final price? Give the calculation.")


def calibration_prompts(n: int, seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[CalibrationPrompt]:
    """``n`` prompts, families taken in turn (round robin), deterministic for ``seed``."""
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"unknown calibration families {bad} (allowed: {', '.join(FAMILIES)})")
    rng = random.Random(seed)
    funcs = [f for p in _stdlib_files() for f in _functions(p)]
    if not funcs and any(f != "math" for f in families):
        raise RuntimeError(f"no documented functions found in the standard library under {sysconfig.get_paths()['stdlib']}")
    rng.shuffle(funcs)
    out: list[CalibrationPrompt] = []
    i = 0
    while len(out) < n:
        fam = families[len(out) % len(families)]
        if fam == "math":
            out.append(CalibrationPrompt(_math(rng), fam, "template"))
            continue
        f = funcs[i % len(funcs)]
        i += 1
        src = f"{f.module}.{f.name}"
        if fam == "code":
            text = f"Write a Python function `{f.signature}` that {_first_sentence(f.doc)}. Include a docstring."
        elif fam == "explain":
            text = f"Explain what this Python function does and when you would use it:\n\n```python\n{f.source}\n```"
        elif fam == "complete":
            lines = f.source.splitlines()
            cut = max(2, len(lines) // 3)
            text = "Complete this Python code:\n\n```python\n" + "\n".join(lines[:cut]) + "\n```"
        elif fam == "summarize":
            text = f"Summarize the following documentation in two or three sentences:\n\n{_paragraph(f.doc, rng)}"
        elif fam == "translate":
            lang = rng.choice(_LANGS)
            text = f"Translate the following text into {lang}:\n\n{_paragraph(f.doc, rng)}"
        else:  # qa
            text = (f"Context:\n{_paragraph(f.doc, rng)}\n\nQuestion: according to this context, what does "
                    f"`{f.name}` do, and what should a caller watch out for?")
        out.append(CalibrationPrompt(text, fam, src))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m nanospec_vllm.tools.calibration [N] [--seed S] [--jsonl]``: show N prompts, or write them as
    ``{"prompt", "task"}`` rows (task = family) for ``nanospec bench e2e --prompts``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m nanospec_vllm.tools.calibration")
    ap.add_argument("n", type=int, nargs="?", default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", action="store_true", help="one JSON row per prompt on stdout")
    a = ap.parse_args(argv)
    for p in calibration_prompts(a.n, seed=a.seed):
        if a.jsonl:
            print(json.dumps({"prompt": p.prompt, "task": p.family}))
        else:
            print(f"--- {p.family} ({p.source})\n{p.prompt[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
