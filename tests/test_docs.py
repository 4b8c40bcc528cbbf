"""The README's two first commands are the ones CI and newcomers run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```sh"
    return lines[1:3]


def test_readme_starts_with_install_and_test_commands():
    run, test = readme_commands()
    assert run.endswith("pip install . && clickrelay run")
    assert test.endswith("pip install '.[test]' && python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
