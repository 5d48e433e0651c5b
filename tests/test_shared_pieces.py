"""Pieces that several scripts need are copied, not imported, so that each script reads alone and
`diff ddpm_mnist.py cfg_afhq.py` shows exactly what a method adds. This test keeps the copies honest:
a top-level function or class that two scripts both define must have the same source in both, unless
a script names it in its module-level `DELIBERATELY_DIFFERENT = {"name": "reason"}`."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in ROOT.glob("*.py"))
ENTRY_POINTS = {"main", "parse_args"}  # each script's own flags and flow: different by design, never shared


def top_level_pieces(path):
    source = path.read_text()
    tree = ast.parse(source)
    pieces, different = {}, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            pieces[node.name] = ast.get_source_segment(source, node, padded=False)
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
