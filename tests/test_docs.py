"""The documentation runs: every code block of docs/*.md and README.md, the code links, the API
reference's coverage, the README's length and the generated benchmarks page.

Conventions the pages follow (and that these tests enforce):

- A ```python block runs; the blocks of one page run in order in one fresh interpreter, so a
  later block may use an earlier one's names. A ```text block right after it is what it prints
  (compared as doctest does, with ``...`` matching anything and whitespace normalised).
- A ```bash / ```sh block runs each line (``#`` comments and continuation lines aside) as a
  command that must exit 0; only cheap ones belong there, such as help texts.
- A ```python block preceded by ``<!-- docs-test: file NAME.py -->`` is also a file of the
  user's: it is written as NAME.py into the folder the page's blocks and commands run in, so
  later blocks and commands can import it. Functions named ``test_*`` that a block defines
  are called, as pytest would.
- A block that is too expensive to run here (training for many epochs, installing packages,
  several hosts) is preceded by ``<!-- docs-test: skip (why) -->``; the reason is required.
"""

import doctest
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
FENCE = re.compile(r"(?P<skip><!-- docs-test: skip \((?P<why>[^)]+)\) -->\n)?"
                   r"(?:<!-- docs-test: file (?P<file>[\w.-]+\.py) -->\n)?"
                   r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```\n"
                   r"(?:\n```text\n(?P<out>.*?)^```\n)?", re.MULTILINE | re.DOTALL)
SHELL = {"bash", "sh", "console", "shell"}
pytestmark = pytest.mark.xdist_group("docs")  # one test process: the docs' subprocess fixture, once


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


code_links = _load("code_links", ROOT / "docs/hooks/code_links.py")
gen_pages = _load("gen_pages", ROOT / "docs/hooks/gen_pages.py")


def blocks(page):
    """``(lang, body, expected output or None, skip reason or None)`` for each fenced block."""
    return [(m["lang"], m["body"], m["out"], m["why"]) for m in FENCE.finditer(page.read_text())]


def files(page):
    """``{name: source}`` of the blocks the page presents as the user's own files."""
    return {m["file"]: m["body"] for m in FENCE.finditer(page.read_text()) if m["file"]}


def _write_files(page, folder):
    for name, source in files(page).items():
        (folder / name).write_text(source)


def _id(page):
    return page.relative_to(ROOT).as_posix()


# The blocks run in one child process, each page in a fresh namespace: JAX starts clean (a
# block may configure it without affecting the other tests) and is imported once for all pages.
RUNNER = r"""
import contextlib, io, json, os, sys, traceback
results = {}
for page, (folder, sources) in json.loads(sys.stdin.read()).items():
    os.chdir(folder)
    sys.path.insert(0, folder)
    ns, out = {"__name__": "__main__"}, results.setdefault(page, [])
    for i, src in enumerate(sources):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                before = set(ns)
                exec(compile(src, f"<{page}, block {i}>", "exec"), ns)
                for name in sorted(set(ns) - before):  # a pytest block: run its tests
                    if name.startswith("test_") and callable(ns[name]):
                        ns[name]()
        except Exception:
            out.append({"stdout": buf.getvalue(), "error": traceback.format_exc()})
            break
        out.append({"stdout": buf.getvalue(), "error": None})
print(json.dumps(results))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _runnable(page):
    return [(body, out) for lang, body, out, why in blocks(page) if lang == "python" and why is None]


@pytest.fixture(scope="module")
def python_results(tmp_path_factory):
    sources = {}
    for p in PAGES:
        if _runnable(p):
            folder = tmp_path_factory.mktemp(p.stem)
            _write_files(p, folder)
            sources[_id(p)] = (str(folder), [body for body, _ in _runnable(p)])
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(sources),
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # every page's blocks run in one subprocess: ~40 s
@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=_id)
def test_python_blocks_run_and_print_what_the_page_says(page, python_results):
    runnable, results = _runnable(page), python_results[_id(page)]
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for (body, expected), result in zip(runnable, results):
        assert result["error"] is None, f"{_id(page)}: block\n{body}\nraised\n{result['error']}"
        if expected is not None:
            assert checker.check_output(expected, result["stdout"], flags), (
                f"{_id(page)}: block\n{body}\nprinted\n{result['stdout']}\nthe page says\n{expected}")
    assert len(results) == len(runnable)


def _commands(body):
    """The commands of a shell block: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", body)
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


SHELL_BLOCKS = [(p, body) for p in PAGES for lang, body, _, why in blocks(p)
                if lang in SHELL and why is None]


@pytest.mark.parametrize("page, body", SHELL_BLOCKS, ids=[_id(p) for p, _ in SHELL_BLOCKS])
def test_cheap_shell_blocks_run(page, body, tmp_path):
    _write_files(page, tmp_path)
    for command in _commands(body):
        argv = shlex.split(command)
        assert argv[0] == "python", f"{_id(page)}: {command!r}: only python commands are run here"
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              cwd=tmp_path, env=_env(), timeout=60)
        assert proc.returncode == 0, f"{_id(page)}: {command}\n{proc.stderr[-2000:]}"
        assert proc.stdout.strip(), f"{_id(page)}: {command} printed nothing"


def test_every_skipped_block_says_why_and_every_block_is_seen():
    for page in PAGES:
        text = page.read_text()
        assert text.count("<!-- docs-test: skip") == sum(why is not None for *_, why in blocks(page)), (
            f"{_id(page)}: a skip marker that is not right before a block, or has no (reason)")
        found = sum(1 + (out is not None) for _, _, out, _ in blocks(page))
        fences = len(re.findall(r"^```[a-z]*\n", text, re.MULTILINE))  # openings and closings
        assert 2 * found == fences, f"{_id(page)}: a fenced block the tests do not parse"


def test_source_links_resolve_to_one_line_each():
    directives = [(p, m) for p in ROOT.glob("docs/*.md")
                  for m in code_links.DIRECTIVE.finditer(p.read_text())]
    assert len(directives) >= 20  # the derivation's table alone has over twenty
    for page, m in directives:
        line = code_links.locate(m["path"], m["needle"].replace('\\"', '"'))
        text = (ROOT / m["path"]).read_text().splitlines()[line - 1]
        assert m["needle"].replace('\\"', '"') in text
        rendered = code_links.render(m, page.relative_to(ROOT / "docs").as_posix())
        assert f"source/{m['path']}.md#L-{line})" in rendered, rendered


def test_a_source_link_that_goes_stale_fails(tmp_path):
    (tmp_path / "m.py").write_text("a = 1\nb = a + 1\nc = a + 2\n")
    md = '[[src m.py "b = a"]] and [[src m.py "c = a" 2]]'
    out = code_links.expand(md, "derivation.md", root=tmp_path)
    assert "[`m.py:2`](source/m.py.md#L-2) `b = a + 1`" in out
    assert "[`m.py:3`](source/m.py.md#L-3)\n\n```python\nc = a + 2\n```" in out
    for needle, hits in (("d = ", 0), ("= a", 2)):  # gone, or ambiguous: the build must stop
        with pytest.raises(code_links.SourceLinkError, match=f"on {hits} lines"):
            code_links.expand(f'[[src m.py "{needle}"]]', "x.md", root=tmp_path)
    with pytest.raises(code_links.SourceLinkError, match="no file"):
        code_links.expand('[[src gone.py "a"]]', "x.md", root=tmp_path)


def test_every_export_and_public_module_has_a_reference_page():
    import handbackprop

    pages = gen_pages.reference_pages()
    index, nav = pages["reference/index.md"], pages["reference/SUMMARY.md"]
    for name in handbackprop.__all__:
        target = gen_pages.documented_at(name)
        assert f"[`hbp.{name}`][{target}]" in index, name
        module = target if target.count(".") == 1 else target.rsplit(".", 1)[0]
        page = f"reference/{module.split('.')[-1]}.md"
        assert pages.get(page, "").startswith(f"::: {module}\n"), (name, page)
    files = sorted(p.stem for p in (ROOT / "handbackprop").glob("*.py") if not p.stem.startswith("_"))
    assert [m.split(".")[-1] for m in gen_pages.public_modules()] == files
    for stem in files:
        assert f"]({stem}.md)" in nav and f"reference/{stem}.md" in pages, stem


def test_every_source_file_has_an_anchored_page():
    pages = gen_pages.source_pages()
    for file in gen_pages.source_files():
        rel = file.relative_to(ROOT).as_posix()
        n = len(file.read_text().splitlines())
        assert f'id="L-{n}"' in pages[f"source/{rel}.md"] and f'id="L-{n + 1}"' not in pages[
            f"source/{rel}.md"], rel


def test_readme_is_short_and_links_into_the_docs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    text = "\n".join(lines)
    assert "../shared" not in text and "python -m pytest" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_docs_do_not_point_outside_the_repository():
    for page in [*ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        assert "../shared" not in page.read_text() and "DESIGN.md" not in page.read_text(), _id(page)


def test_benchmarks_page_is_generated_from_the_published_results(monkeypatch):
    from benchmarks import readme_table

    monkeypatch.chdir(ROOT)  # the block names the folder as the command was given it
    page = (ROOT / "docs/benchmarks.md").read_text()
    block = readme_table.render("benchmarks/published/cpu", plots_relative_to=".")
    assert block.strip() in page, ("docs/benchmarks.md is stale: run python -m "
                                   "benchmarks.readme_table benchmarks/published/cpu --write "
                                   "docs/benchmarks.md --plots --plots-root .")
    for png in re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", page):
        assert (ROOT / png).is_file(), png


def test_the_defaults_are_the_published_search_winners():
    from handbackprop import train_command

    search = json.loads((ROOT / "benchmarks/published/cpu/defaults_search.json").read_text())
    assert search["quick"] is False
    for name, best in search["best"].items():
        chosen = train_command.defaults(name)
        assert {k: chosen[k] for k in best} == best, name


def _parsed(*argv):
    from handbackprop import cli, train_command

    args = cli._parser().parse_args(["train", *argv])
    return train_command._settings(args, {}), args.epochs


def test_each_data_set_starts_from_its_own_defaults():
    from handbackprop.train_command import DATASET_DEFAULTS, DEFAULTS, EPOCHS

    settings, epochs = _parsed()  # digits, the main job
    assert {**{k: settings[k] for k in DATASET_DEFAULTS["digits"] if k != "epochs"},
            "epochs": epochs} == DATASET_DEFAULTS["digits"]
    settings, epochs = _parsed("--dataset", "xor")  # no defaults of its own: the general ones
    assert (settings["lr"], settings["l2"], epochs) == (DEFAULTS["lr"], DEFAULTS["l2"], EPOCHS)
    settings, epochs = _parsed("--lr", "0.05", "--epochs", "3")  # an option overrides them
    assert (settings["lr"], settings["l2"], epochs) == (0.05, DATASET_DEFAULTS["digits"]["l2"], 3)


def test_the_plot_title_names_the_data_set_settings_and_epsilon():
    from handbackprop import train_command

    settings, epochs = _parsed("--momentum", "0.9", "--nesterov")
    settings = {**settings, "sizes": [64, 128, 128, 10], "loss": "softmax_cross_entropy"}
    title = train_command._title(settings, epochs, None)
    assert title.startswith("digits: 64-128-128-10 relu, softmax_cross_entropy\n")
    assert f"lr {settings['lr']:g}, Nesterov momentum 0.9, L2 {settings['l2']:g}, batch 32, " \
           f"{epochs} epochs, float32" in title
    privacy = {"clip_norm": 1.0, "noise_multiplier": 1.1, "poisson": True, "delta": 1e-5,
               "epsilon": 3.78}
    assert title + "\nDP-SGD clip 1, noise 1.1 (Poisson batches): epsilon 3.78 at delta 1e-05" \
        == train_command._title(settings, epochs, privacy)


def test_readme_equation_table_quotes_real_code():
    readme = (ROOT / "README.md").read_text()
    quotes = re.findall(r"\| \[`[^`]+`\]\(((?:handbackprop|reference)/[^)]+)\) `([^`]+)` \|", readme)
    assert len(quotes) == 6, quotes
    for path, code in quotes:
        assert code in (ROOT / path).read_text(), (path, code)


def test_training_page_shows_the_defaults_in_force():
    from handbackprop.train_command import DATASET_DEFAULTS, defaults

    page = (ROOT / "docs/training.md").read_text()
    for name in DATASET_DEFAULTS:
        d = defaults(name)
        row = f"| {name} | {d['lr']:g} | {d['momentum']:g} | {d['l2']:g} | {d['activation']} | {d['epochs']} |"
        assert row in page, row
    d = defaults("digits")  # what the main job trains with, as the getting-started page says
    assert (f"SGD with learning rate {d['lr']:g} and L2 {d['l2']:g}, batch {d['batch_size']}, "
            f"{d['epochs']} epochs") in (ROOT / "docs/getting-started.md").read_text()
