"""The README's two commands are what a newcomer runs; CI must run exactly the second one."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```bash")
    assert first_block < 100, "the two commands must come first"
    install_run, install_test = readme_commands()
    assert "pip install ." in install_run and "jreml fit --example" in install_run
    assert 'pip install ".[test]"' in install_test and "pytest" in install_test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci
