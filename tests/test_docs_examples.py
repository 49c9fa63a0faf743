"""Every code block of the documentation site runs, so the guides cannot rot.

Each page of ``docs/`` (the API pages aside, which hold only mkdocstrings directives) is run
like a notebook: its blocks in order, in one namespace, in a fresh working folder.

- ``python`` blocks are executed; what one prints must match a ``text`` block that follows it
  directly (only blank lines between; ``...`` stands for any text); ``pycon`` blocks are
  doctests;
- ``console`` blocks are ``$ emakit ...`` commands, run through ``emakit.cli.main``, whose
  output must match the lines shown (``...`` stands for any text, as in doctests);
- ``text``, ``json``, ``yaml`` and ``toml`` blocks are shown, not run (outputs, diagrams, files);
- a block that cannot run here is preceded by ``<!-- not run: REASON: why -->``, and
  :func:`test_marks_are_needed` checks that the reason holds for that block:

  ``gpu``            it uses CUDA (and it runs where CUDA is available);
  ``multi-process``  it needs several processes (``torchrun``, a process group, FSDP2, DCP);
  ``not-installed``  it imports a library that is not installed here (TRL, Ultralytics);
  ``install``        it installs packages (``pip install``);
  ``minutes``        it runs a benchmark or the full test suite (``emakit bench``,
                     ``python benchmarks/...``, ``pytest``).

Any other block (a ``bash`` block without a mark, a block without a language) fails the test.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib.util
import io
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # as tests/integrations/conftest.py
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in ("api", "_ext"))
SHOWN = {"text", "json", "yaml", "toml"}
REASONS = {"gpu", "multi-process", "not-installed", "install", "minutes"}
MARK = re.compile(r"<!--\s*not run:\s*(?P<reason>[a-z-]+)\s*:\s*(?P<why>\S.*?)\s*-->")
OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})\s*(?P<lang>[\w+-]*)(?P<rest>.*)$")
# Framework messages the examples cannot avoid on a CPU machine (see tests/integrations/conftest.py).
FRAMEWORK_NOISE = (
    ("The '\\w+_dataloader' does not have many workers", UserWarning),
    ("The number of training batches .* is smaller than the logging interval", UserWarning),
    ("`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning),
    ("__array__ implementation doesn't accept a copy keyword", DeprecationWarning),
)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    reason: str | None = None
    why: str = ""
    follows: bool = False  # only blank lines since the previous block's closing fence

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, dedented (blocks inside admonitions too)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found: list[Block] = []
    i = 0
    last_close = -2
    while i < len(lines):
        start = OPEN.match(lines[i])
        if start is None:
            i += 1
            continue
        indent, fence = start["indent"], start["fence"]
        close = re.compile(rf"^{re.escape(indent)}{fence}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:j]]
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.search(before)
        follows = all(not line.strip() for line in lines[last_close + 1:i]) and last_close >= 0
        found.append(Block(page, i + 1, start["lang"], "\n".join(body) + "\n",
                           mark["reason"] if mark else None, mark["why"] if mark else "",
                           follows))
        last_close = j
        i = j + 1
    return found


def cuda() -> bool:
    torch = pytest.importorskip("torch")
    return bool(torch.cuda.is_available())


def runs(block: Block) -> bool:
    """Whether the test executes ``block`` on this machine."""
    if block.lang in SHOWN:
        return False
    if block.reason == "gpu":
        return cuda()
    return block.reason is None


def imported_modules(code: str) -> set[str]:
    tree = ast.parse(code)
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    return {name.split(".")[0] for name in names}


def mark_problem(block: Block) -> str | None:
    """Why ``block``'s mark is not justified (None when it is, or when there is none)."""
    code, reason = block.code, block.reason
    if reason is None:
        if block.lang in SHOWN or block.lang in ("python", "pycon", "console"):
            return None
        if not block.lang:
            return "a block without a language: say python, pycon, console, bash or text"
        return f"a {block.lang!r} block runs nowhere: mark it (<!-- not run: REASON: why -->)"
    if reason not in REASONS:
        return f"unknown reason {reason!r}; valid: {sorted(REASONS)}"
    if block.lang in SHOWN:
        return f"a {block.lang!r} block is never run: it needs no mark"
    checks = {
        "gpu": "cuda" in code,
        "multi-process": any(k in code for k in (
            "torchrun", "init_process_group", "fully_shard", "dcp.", "DistributedDataParallel",
            "device_mesh", "accelerate launch", "strategy=\"ddp\"")),
        "install": "pip install" in code,
        "minutes": any(k in code for k in ("emakit bench", "benchmarks/", "pytest")),
        "not-installed": False,
    }
    if reason == "not-installed":
        try:
            modules = imported_modules(code)
        except SyntaxError:
            return "a not-installed block must be Python"
        checks[reason] = any(importlib.util.find_spec(m) is None for m in modules)
    if not checks[reason]:
        return f"the mark {reason!r} does not hold for this block"
    return None


ALL = [block for page in PAGES for block in blocks(page)]


def test_pages_have_blocks_to_run():
    assert len(PAGES) >= 15, PAGES
    assert sum(runs(b) for b in ALL) >= 60


def test_marks_are_needed():
    problems = [f"{b.where()}: {p}" for b in ALL if (p := mark_problem(b)) is not None]
    assert not problems, "\n".join(problems)


def test_marks_parse():
    page = DOCS / "x.md"
    text = "<!-- not run: gpu: needs CUDA -->\n```python\nmodel.cuda()\n```\n"
    block = Block(page, 2, "python", "model.cuda()\n", "gpu", "needs CUDA")
    assert MARK.search(text.split("\n")[0])["reason"] == "gpu"
    assert mark_problem(block) is None
    assert mark_problem(Block(page, 2, "python", "x = 1\n", "gpu")) is not None
    assert mark_problem(Block(page, 2, "python", "import numpy\n", "not-installed")) is not None
    assert mark_problem(Block(page, 2, "python", "import trl_not_here\n", "not-installed")) is None
    assert mark_problem(Block(page, 2, "bash", "ls\n")) is not None
    assert mark_problem(Block(page, 2, "", "x\n")) is not None


def run_console(block: Block) -> None:
    from emakit.cli import main

    commands: list[tuple[str, list[str]]] = []
    for line in block.code.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"{block.where()}: a console block starts with '$ emakit ...'"
            commands[-1][1].append(line)
    for command, expected in commands:
        argv = shlex.split(command)
        assert argv[0] == "emakit", f"{block.where()}: only emakit commands run here: {command}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(argv[1:])
        assert status == 0, f"{block.where()}: {command} exited with {status}"
        want = "\n".join(expected).strip() + "\n"
        got = out.getvalue()
        if expected:
            assert same_output(want, got), (
                f"{block.where()}: {command}\n--- shown ---\n{want}--- printed ---\n{got}")


def same_output(want: str, got: str) -> bool:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(want, got, flags)


def run_page(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed: tuple[Block, str] | None = None
    for block in blocks(page):
        if block.lang == "text" and block.follows and printed is not None:
            source, got = printed
            assert same_output(block.code, got), (
                f"{source.where()} prints what {block.where()} does not show:\n--- shown ---\n"
                f"{block.code}--- printed ---\n{got!r}")
        printed = None
        if not runs(block):
            continue
        if block.lang == "python":
            code = compile(block.code, block.where(), "exec")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            printed = (block, out.getvalue())
        elif block.lang == "pycon":
            test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where(),
                                                       str(page), block.line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                           | doctest.NORMALIZE_WHITESPACE)
            out = io.StringIO()
            runner.run(test, out=out.write, clear_globs=False)
            assert runner.failures == 0, out.getvalue()
        elif block.lang == "console":
            run_console(block)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working folder, one torch thread (restored after), torch's RNG seeded."""
    monkeypatch.chdir(tmp_path)
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield tmp_path
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)


@pytest.mark.parametrize("page", [p for p in PAGES if any(runs(b) for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs(page, sandbox):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for message, category in FRAMEWORK_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        run_page(page)
