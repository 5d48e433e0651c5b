"""Every command in a script's docstring, a benchmark's docstring and the README's code blocks parses with that
script's own flags: a renamed or removed flag cannot leave a command behind that no longer runs."""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def commands_in(text):
    """Lines that start a `python X.py` or `torchrun ... X.py` command (joined over trailing backslashes), without
    a trailing comment."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        if re.match(r"^(OMP_NUM_THREADS=\d+ )?(python|torchrun) ", line):
            found.append(line.split("  #")[0].split(" # ")[0].strip())
        i += 1
    return found


def sources():
    """(where, command) for every command of every docstring and README code block."""
    out = []
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        doc = path.read_text().split('"""')[1]
        out += [(path.name, c) for c in commands_in(doc)]
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash)?\n(.*?)```", readme, re.S):
        out += [("README.md", c) for c in commands_in(block)]
    return out


def script_and_args(command):
    words = shlex.split(command)
    words = [w for w in words if not w.startswith("OMP_NUM_THREADS=")]
    script = next((w for w in words if w.endswith(".py")), None)
    return script, words[words.index(script) + 1:] if script else []


def parser_of(script):
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(path.stem + "_for_commands", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = [(where, c) for where, c in sources() if script_and_args(c)[0] and (ROOT / script_and_args(c)[0]).is_file()]


def test_the_docstrings_and_the_readme_have_commands():
    assert len(COMMANDS) > 20
    assert any("--preset cpu" in c for _, c in COMMANDS if "ddpm_mnist.py" in c)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_a_command_parses_with_its_scripts_flags(where, command):
    script, args = script_and_args(command)
    module = parser_of(script)
    if not hasattr(module, "build_parser"):  # ../shared's tools: every flag the command uses is in their --help
        shown = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        assert shown and all(re.search(rf"{re.escape(f)}\b", shown) for f in flags), (flags, shown)
        return
    if script.startswith("benchmarks/"):
        module.build_parser().parse_args(args)
    else:
        import plumbing
        plumbing.parse_with_preset(module.build_parser(), getattr(module, "PRESETS", {}), args)  # --preset X must exist


def test_the_cpu_command_of_ddpm_mnist_is_the_one_the_readme_measured():
    doc = [c for w, c in COMMANDS if w == "ddpm_mnist.py" and "--preset cpu" in c]
    readme = [c for w, c in COMMANDS if w == "README.md" and "ddpm_mnist.py --preset cpu" in c]
    assert doc and readme and any(c.split("--data-dir")[0].strip() == d for c in readme for d in doc)
