"""The documentation is executable: every ```python block in docs/**/*.md
and README.md runs (a page's blocks in order, sharing one namespace, in a
temporary directory); ```bash lines that call advtrain are parsed by its
argument parser (and run when they ask for --help); ```toml blocks are
checked as `advtrain train --config` files; links between pages resolve;
every public name is documented in api.md with its real signature; and the
method pages' default tables match the presets.

Markers, as a comment in a python block or as an HTML comment on the line
just above it (``<!-- doctest: no-run -->``):

* ``# doctest: needs-cifar`` — runs with ``./data`` pointing at the CIFAR-10
  directory of ``ADVTRAIN_CIFAR10_DIR`` (skipped when unset), in a copy of the
  page's namespace so later blocks cannot depend on it;
* ``# doctest: needs-matplotlib`` / ``needs-timm`` — skipped without them;
* ``# doctest: no-run`` — full-size runs (hours on a GPU): compiled, and
  every advtrain name it imports must exist and every call of one must bind
  to its signature.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import io
import itertools
import math
import operator
import os
import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

import advtrain
from advtrain import cli
from advtrain.config import normalize_keys, resolve_config
from advtrain.methods import METHODS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"#\s*doctest:\s*([\w-]+)")
HTML_MARKER = re.compile(r"<!--\s*doctest:\s*([\w-]+)")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    before: str = ""  # the line just above the fence (for an HTML-comment marker)

    @property
    def markers(self) -> List[str]:
        return MARKER.findall(self.code) + HTML_MARKER.findall(self.before)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path, lang: str) -> List[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) == lang:
            above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            before = above if above.strip().startswith("<!--") else ""
            found.append(Block(path, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), before))
    return found


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_docs_exist():
    names = {page_id(p) for p in PAGES}
    for page in ("docs/index.md", "docs/getting_started.md", "docs/concepts.md", "docs/api.md", "docs/cli.md"):
        assert page in names
    assert (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_has_its_docs_page(name):
    method = METHODS[name]
    page = ROOT / method.doc
    assert page.is_file(), f"{name}: the registry's docs page {method.doc} does not exist"
    assert f"`{method.trainer.__name__}`" in page.read_text(), f"{method.doc} does not name the preset"
    if method.doc.startswith("docs/methods/"):
        index = (ROOT / "docs" / "index.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
        assert f"(methods/{Path(method.doc).name})" in index, f"docs/index.md's methods table has no row for {name}"


# ---------------------------------------------------------- python snippets
def _static_check(block: Block) -> None:
    """A no-run block: it compiles, its advtrain imports exist and its calls
    of imported advtrain callables bind to their signatures."""
    tree = ast.parse(block.code, filename=block.where)
    imported: Dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "advtrain":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            target = imported[node.func.id]
            if not callable(target) or any(isinstance(a, ast.Starred) for a in node.args) or \
                    any(k.arg is None for k in node.keywords):
                continue
            try:
                inspect.signature(target).bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
            except TypeError as exc:
                pytest.fail(f"{block.where}: {node.func.id}(...) does not match its signature: {exc}")


def _run(block: Block, namespace: Dict[str, Any]) -> None:
    code = compile(block.code, block.where, "exec")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
    except Exception:
        pytest.fail(f"snippet at {block.where} failed:\n{block.code}\n{traceback.format_exc()}")


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p, "python")], ids=page_id)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace: Dict[str, Any] = {"__name__": "__doc_snippet__"}
    skipped = []
    for block in blocks(path, "python"):
        markers = block.markers
        if "no-run" in markers:
            _static_check(block)
            continue
        if "needs-matplotlib" in markers and importlib.util.find_spec("matplotlib") is None:
            skipped.append(f"{block.where} (no matplotlib)")
            continue
        if "needs-timm" in markers and importlib.util.find_spec("timm") is None:
            skipped.append(f"{block.where} (no timm)")
            continue
        if "needs-cifar" in markers:
            cifar = os.environ.get("ADVTRAIN_CIFAR10_DIR")
            if not cifar:
                skipped.append(f"{block.where} (ADVTRAIN_CIFAR10_DIR unset)")
                continue
            if not (tmp_path / "data").exists():
                (tmp_path / "data").symlink_to(Path(cifar).resolve(), target_is_directory=True)
            _run(block, dict(namespace))
            continue
        _run(block, namespace)
    if skipped:
        pytest.skip("skipped snippets: " + "; ".join(skipped))


# ------------------------------------------------------------ shell snippets
def _commands(block: Block) -> List[List[str]]:
    text = re.sub(r"\\\n", " ", block.code)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        out.append(shlex.split(line, comments=True))
    return out


def _check_command(block: Block, argv: List[str]) -> None:
    where = f"{block.where}: {' '.join(argv)}"
    if "advtrain" in argv and (argv[0] == "advtrain" or "-m" in argv):
        args = argv[argv.index("advtrain") + 1:]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                cli.make_parser().parse_args(args)
            except SystemExit as exc:
                assert exc.code == 0, f"{where}: {err.getvalue().strip()}"
    elif argv[:2] == ["pip", "install"]:
        extras = set(re.findall(r"\[([\w,]+)\]", " ".join(argv)))
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        known = set(pyproject["project"]["optional-dependencies"])
        for group in extras:
            assert set(group.split(",")) <= known, f"{where}: unknown extra {group}"
    elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("examples/"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{where}: no such example"
        source = script.read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: the example has no {flag} option"


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p, "bash")], ids=page_id)
def test_shell_snippets_parse(path):
    for block in blocks(path, "bash"):
        for argv in _commands(block):
            _check_command(block, argv)


def test_readme_keeps_its_three_commands():
    text = (ROOT / "README.md").read_text()
    commands = [argv for b in blocks(ROOT / "README.md", "bash") for argv in _commands(b)]
    assert any(argv[:3] == ["pip", "install", "-e"] and "test" in argv[3].strip(".[]").split(",")
               for argv in commands if len(argv) == 4)
    assert any(argv[:2] == ["advtrain", "train"] for argv in commands)
    assert ["python", "-m", "pytest", "-q"] in commands
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert "docs/" in text


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p, "toml")], ids=page_id)
def test_toml_snippets_are_valid_train_configs(path):
    sub = cli._subparser(cli.make_parser(), "train")
    for block in blocks(path, "toml"):
        resolve_config(sub, normalize_keys(tomllib.loads(block.code), block.where), source=block.where)


# --------------------------------------------------------------------- links
@pytest.mark.parametrize("path", PAGES + [ROOT / "CHANGELOG.md"], ids=page_id)
def test_relative_links_resolve(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{page_id(path)}: broken link {target}"


# ----------------------------------------------------------------------- api
def _safe_eval(node: ast.AST, names: Dict[str, Any]) -> Any:
    """Numbers, strings, booleans, None, tuples, + - * / and given names."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_safe_eval(e, names) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_safe_eval(node.operand, names)
    if isinstance(node, ast.BinOp):
        ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
        return ops[type(node.op)](_safe_eval(node.left, names), _safe_eval(node.right, names))
    raise ValueError(f"not a literal: {ast.dump(node)}")


def _same(documented: Any, actual: Any) -> bool:
    if isinstance(actual, torch.dtype):
        return documented == str(actual).replace("torch.", "")
    if isinstance(documented, float) or isinstance(actual, float):
        return isinstance(actual, (int, float)) and math.isclose(documented, actual, rel_tol=1e-9)
    return documented == actual and type(documented) is type(actual)


def _documented_signatures() -> Dict[str, str]:
    text = (ROOT / "docs" / "api.md").read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    found = {}
    for section in sections:
        name = section.split("\n", 1)[0].strip().strip("`")
        sig = next((b.group(2).strip() for b in FENCE.finditer(section) if b.group(1) == "text"), None)
        found[name] = sig
    return found


def test_every_public_name_is_documented_in_api_md():
    documented = _documented_signatures()
    missing = [n for n in advtrain.__all__ if n not in documented]
    assert not missing, f"docs/api.md has no '### `NAME`' section for {missing}"


@pytest.mark.parametrize("name", advtrain.__all__)
def test_api_md_signatures_match_the_code(name):
    sig = _documented_signatures().get(name)
    obj = getattr(advtrain, name)
    if sig is None:
        pytest.fail(f"docs/api.md: no signature block (```text) for {name}")
    assert sig.startswith(f"{name}("), f"docs/api.md: the signature of {name} should start with {name}("
    tree = ast.parse(f"def f{sig[len(name):]}: pass").body[0].args  # type: ignore[attr-defined]
    actual = inspect.signature(obj).parameters
    doc_params = [a.arg for a in tree.posonlyargs + tree.args] + ([tree.vararg.arg] if tree.vararg else []) + \
        [a.arg for a in tree.kwonlyargs] + ([tree.kwarg.arg] if tree.kwarg else [])
    assert doc_params == list(actual), f"docs/api.md: {name} parameters {doc_params} != code {list(actual)}"
    positional = tree.posonlyargs + tree.args
    defaults = dict(zip([a.arg for a in positional][len(positional) - len(tree.defaults):], tree.defaults))
    defaults.update({a.arg: d for a, d in zip(tree.kwonlyargs, tree.kw_defaults) if d is not None})
    for param in actual.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        has_default = param.default is not inspect.Parameter.empty
        assert (param.name in defaults) == has_default, f"docs/api.md: {name}({param.name}) default presence differs"
        if not has_default:
            continue
        node, where = defaults[param.name], f"docs/api.md: {name}({param.name}={ast.unparse(defaults[param.name])})"
        if isinstance(node, ast.Call) or type(param.default).__name__ == "_HAS_DEFAULT_FACTORY_CLASS":
            continue  # an object (eval_attack=pgd20()) or a dataclass field's factory: shown, not compared
        if isinstance(node, ast.Attribute):  # torch.float32
            assert ast.unparse(node) == str(param.default), f"{where}, code has {param.default!r}"
            continue
        assert _same(_safe_eval(node, {}), param.default), f"{where}, code has {param.default!r}"


# ------------------------------------------------------------ method defaults
def _tiny_model():
    from advtrain.models import SmallCNN

    return SmallCNN(width=4)


def _schedule_is_cyclic(t) -> bool:
    return t.lr_schedule(0) == 0 and math.isclose(t.lr_schedule(t.epochs / 2), t.lr) and t.lr_schedule(t.epochs) == 0


#: Defaults that are not one attribute of the same name on the Trainer, its
#: policy or the policy's attack (those are looked up by name).
SPECIAL_FIELDS: Dict[str, Callable[[Any], Any]] = {
    "schedule": lambda t: "cyclic" if _schedule_is_cyclic(t) else "other",
    "noise": lambda t: t.policy.attack.init_radius if t.policy.attack.init_radius is not None else t.policy.attack.eps,
    "step_lr": lambda t: t.policy.lr, "step_weight_decay": lambda t: t.policy.weight_decay,
    "step_momentum": lambda t: t.policy.momentum,
    "momentum_schedule": lambda t: (t.momentum_schedule(0), t.momentum_schedule(t.epochs / 2),
                                    t.momentum_schedule(t.epochs)),
}
TRAINER_KEYWORDS = frozenset(inspect.signature(advtrain.Trainer).parameters)
_MISSING = object()


def _default(trainer: Any, key: str) -> Any:
    """The value of the documented default ``key`` in a preset: a Trainer
    keyword from the Trainer, anything else from its policy or the policy's
    attack, by name."""
    if key in SPECIAL_FIELDS:
        return SPECIAL_FIELDS[key](trainer)
    owners = [trainer] if key in TRAINER_KEYWORDS else [trainer.policy, getattr(trainer.policy, "attack", None)]
    for owner in owners:
        value = getattr(owner, key, _MISSING)
        if value is not _MISSING:
            return value
    return _MISSING


METHOD_PAGES = [name for name, m in METHODS.items() if m.doc.startswith("docs/methods/")]


def _table_after(text: str, heading: str) -> Dict[str, str]:
    """First column (a backticked name) → second column, of the first table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    return dict(m.groups() for line in table for m in [re.match(r"\|\s*`([\w-]+)`\s*\|\s*([^|]*?)\s*\|", line)] if m)


def test_concepts_lists_which_registered_methods_compile():
    documented = _table_after((ROOT / "docs" / "concepts.md").read_text(), "### Compiled training")
    expected = {name: "yes" if m.compiles else "no" for name, m in METHODS.items()}
    rows = "\n".join(f"| `{name}` | {value} |" for name, value in expected.items())
    assert documented == expected and list(documented) == list(expected), \
        f"docs/concepts.md, 'Compiled training': the table should read\n{rows}"


def test_cli_md_lists_the_registered_methods_and_a_flag_per_option():
    from advtrain.cli_methods import flag, options

    text = (ROOT / "docs" / "cli.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `--method` |"))
    listed = re.findall(r"`([\w-]+)`", row.split("|")[3])
    assert listed == list(METHODS), f"docs/cli.md: the --method row should list {', '.join(METHODS)}"
    for option in options():
        assert re.search(rf"^\| `{flag(option)}[ `]", text, flags=re.M), f"docs/cli.md: no row for {flag(option)}"


@pytest.mark.parametrize("name", METHOD_PAGES)
def test_method_page_defaults_match_the_preset(name):
    method = METHODS[name]
    preset = method.trainer.__name__
    page = ROOT / method.doc
    assert page.is_file(), f"{name}: the registry's docs page {method.doc} does not exist"
    text = page.read_text()
    assert f"`{preset}`" in text and "## Defaults" in text, f"{page_id(page)}: no ## Defaults table of {preset}"
    table = text.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`(\w+)`\s*\|\s*`([^`]+)`\s*\|", table, flags=re.M)
    assert len(rows) >= 5, f"{page_id(page)}: the Defaults table has too few `name` | `value` rows"
    trainer = method.build(_tiny_model(), progress=False, device="cpu")
    eps = _default(trainer, "eps")
    for key, literal in rows:
        actual = _default(trainer, key)
        assert actual is not _MISSING, (f"{page_id(page)}: {preset} has no attribute {key!r} on the Trainer, its policy "
                                        "or its attack; name the default after one, or teach SPECIAL_FIELDS to read it")
        documented = _safe_eval(ast.parse(literal, mode="eval").body, {"eps": eps})
        if isinstance(actual, tuple):
            ok = len(actual) == len(documented) and all(math.isclose(a, d) for a, d in zip(actual, documented))
        else:
            ok = _same(documented, actual)
        assert ok, f"{page_id(page)}: default {key} = {literal} but {preset} has {actual!r}"
