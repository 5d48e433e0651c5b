"""The shape of the project (CONVENTIONS.md): each homework script holds its method, plumbing.py the rest, once.
A method piece that two scripts share has the same name and the same source in both (so `diff` between two scripts
shows what a method adds), unless a script says why in DELIBERATELY_DIFFERENT; no script redefines a plumbing.py
name; scripts import only what a student has installed, plus plumbing and fid."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ddpm_mnist.py", "ddim.py", "cfg_afhq.py", "cond_iclevr.py", "gan_baseline.py"]
ENTRY_POINTS = {"main", "parse_args", "build_parser", "check_args"}  # each script's own flags and flow
ALLOWED = {"torch", "torchvision", "numpy", "PIL", "scipy", "plumbing", "fid"}


def top_level_pieces(path):
    """{name: source} of every top-level function and class, whole lines from the first decorator to the last line
    (a trailing comment counts), and the file's DELIBERATELY_DIFFERENT."""
    source = Path(path).read_text()
    lines = source.splitlines()
    pieces, different = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            pieces[node.name] = "\n".join(lines[first - 1:node.end_lineno])
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DELIBERATELY_DIFFERENT" for t in node.targets):
            different = ast.literal_eval(node.value)
    return pieces, different


def test_shared_method_pieces_are_identical():
    parsed = {name: top_level_pieces(ROOT / name) for name in SCRIPTS}
    owners = {}
    for name, (pieces, _) in parsed.items():
        for piece in pieces:
            owners.setdefault(piece, []).append(name)
    mismatches = []
    for piece, files in sorted(owners.items()):
        kept = [f for f in files if piece not in parsed[f][1]]
        if piece not in ENTRY_POINTS and len({parsed[f][0][piece] for f in kept}) > 1:
            mismatches.append(f"{piece}: differs between {', '.join(kept)}")
    assert not mismatches, "same-named pieces must be identical (or in DELIBERATELY_DIFFERENT):\n" + "\n".join(mismatches)


def test_the_comparison_sees_a_changed_line_and_a_trailing_comment(tmp_path):
    sources = ["def f(x):\n    return x + 1\n", "def f(x):\n    return x + 2\n", "def f(x):\n    return x + 1  # one\n"]
    for i, source in enumerate(sources):
        (tmp_path / f"{i}.py").write_text(source)
    assert len({top_level_pieces(tmp_path / f"{i}.py")[0]["f"] for i in range(3)}) == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_deliberate_differences_name_real_pieces_and_give_reasons(script):
    pieces, different = top_level_pieces(ROOT / script)
    for name, reason in different.items():
        assert name in pieces and len(reason.split()) >= 3, name


@pytest.mark.parametrize("script", SCRIPTS + ["fid.py"])
def test_no_script_defines_a_name_that_plumbing_defines(script):
    plumbing_names = set(top_level_pieces(ROOT / "plumbing.py")[0])
    assert not plumbing_names & set(top_level_pieces(ROOT / script)[0])


@pytest.mark.parametrize("script", SCRIPTS + ["plumbing.py", "fid.py"])
def test_imports_are_the_standard_library_torch_numpy_pil_scipy_plumbing_and_fid(script):
    allowed = ALLOWED | set(sys.stdlib_module_names) | ({"ddpm_mnist"} if script == "ddim.py" else set())
    if script in ("plumbing.py", "fid.py"):
        allowed -= {"plumbing"} if script == "plumbing.py" else {"plumbing", "fid"}
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert name.split(".")[0] in allowed, f"{script} imports {name}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_comes_last_and_is_called_only_as_a_program(script):
    body = ast.parse((ROOT / script).read_text()).body
    defs = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs[-1] == "main"
    assert isinstance(body[-1], ast.If) and "__main__" in ast.unparse(body[-1].test)
