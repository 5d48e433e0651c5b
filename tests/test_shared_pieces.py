"""Pieces that several scripts need are copied, not imported, so that each script reads alone and
`diff ddpm_mnist.py cfg_afhq.py` shows exactly what a method adds. This test keeps the copies honest:
a top-level function or class that two scripts both define must have the same source in both, compared as
whole lines (decorators and comments included), unless a script names it in its module-level
`DELIBERATELY_DIFFERENT = {"name": "reason"}`. The same role has the same name everywhere (`train`, `main`,
`build_model`), so twins are compared by name."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in ROOT.glob("*.py"))
ENTRY_POINTS = {"main", "parse_args", "build_parser"}  # each script's own flags and flow: different by design
APPENDIX_MARKER = "# APPENDIX: plumbing."


def top_level_pieces(path):
    """{name: source} of every top-level function and class, as the whole lines from its first decorator to its
    last line (so a comment at the end of that line counts), and the file's DELIBERATELY_DIFFERENT."""
    source = path.read_text()
    lines = source.splitlines()
    pieces, different = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            pieces[node.name] = "\n".join(lines[first - 1:node.end_lineno])
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DELIBERATELY_DIFFERENT" for t in node.targets):
            different = ast.literal_eval(node.value)
    return pieces, different


def test_shared_pieces_are_identical():
    parsed = {p.name: top_level_pieces(p) for p in SCRIPTS}
    owners = {}
    for name, (pieces, _) in parsed.items():
        for piece in pieces:
            owners.setdefault(piece, []).append(name)
    mismatches = []
    for piece, files in sorted(owners.items()):
        if piece in ENTRY_POINTS or len(files) < 2:
            continue
        kept = [f for f in files if piece not in parsed[f][1]]
        sources = {f: parsed[f][0][piece] for f in kept}
        if len(set(sources.values())) > 1:
            mismatches.append(f"{piece}: differs between {', '.join(kept)}")
    assert not mismatches, "same-named pieces must be identical (or listed in DELIBERATELY_DIFFERENT):\n" + "\n".join(mismatches)


def test_deliberate_differences_give_reasons():
    for path in SCRIPTS:
        pieces, different = top_level_pieces(path)
        for name, reason in different.items():
            assert name in pieces, f"{path.name} declares {name} different but does not define it"
            assert isinstance(reason, str) and len(reason.split()) >= 3, f"{path.name}: give a reason for {name}"


def test_the_check_catches_a_difference(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f(x):\n    return x + 1\n")
    b.write_text("def f(x):\n    return x + 2\n")
    assert top_level_pieces(a)[0]["f"] != top_level_pieces(b)[0]["f"]


def test_the_check_catches_a_trailing_comment_and_a_decorator(tmp_path):
    """ast.get_source_segment stops at the last token, so a comment after it used to go unseen."""
    one, two, three = tmp_path / "one.py", tmp_path / "two.py", tmp_path / "three.py"
    one.write_text("def f(x):\n    return x  # the input\n")
    two.write_text("def f(x):\n    return x  # something else\n")
    three.write_text("@staticmethod\ndef f(x):\n    return x  # the input\n")
    pieces = [top_level_pieces(p)[0]["f"] for p in (one, two, three)]
    assert len(set(pieces)) == 3


def test_every_training_script_reads_in_the_readers_order():
    """Flags, then the method (main() last of it), then the marked appendix of plumbing; main() is called only
    from the very end, after every function it needs is defined, and then only leave_distributed()."""
    for name in ("ddpm_mnist.py", "cfg_afhq.py", "cond_iclevr.py", "ddim.py", "gan_baseline.py"):
        source = (ROOT / name).read_text()
        lines = source.splitlines()
        marker = next(i for i, line in enumerate(lines) if line.startswith(APPENDIX_MARKER))
        tree = ast.parse(source)
        where = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert where["build_parser"] < where["make_betas" if "make_betas" in where else "build_gan"] < where["main"] < marker, name
        for plumbing in ("check_args", "fail", "save_checkpoint", "load_checkpoint", "CtrlC", "plot_loss", "write_metrics"):
            assert where[plumbing] > marker, f"{name}: {plumbing} belongs in the appendix"
        assert lines[-3].startswith('if __name__ == "__main__":') and lines[-2].strip() == "main()", name
        assert lines[-1].strip() == "leave_distributed()", name  # under torchrun the processes leave together
