"""`ato init`'s detection and rendering, in process: every template renders a manifest that validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import AtoError
from pipeline.manifest import parse_manifest
from stages.scaffold import TEMPLATES, _make_binary, detect, plan_init, sanitize_name, write_init


def files(root: Path, spec: dict[str, str]) -> Path:
    for name, text in spec.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("spec", "template", "evidence"), [
    ({"deno.jsonc": "{}", "package.json": "{}"}, "deno", ["deno.jsonc"]),
    ({"package.json": "{}", "index.html": ""}, "node", ["package.json"]),
    ({"package.json": json.dumps({"bin": "cli.js"})}, "tool", ["package.json"]),
    ({"uv.lock": "", "Makefile": ""}, "python", ["uv.lock"]),
    ({"tool.py": ""}, "python", ["tool.py"]),
    ({"Makefile": "x:\n"}, "native", ["Makefile"]),
    ({"main.c": ""}, "native", ["main.c"]),
    ({"dist/index.html": ""}, "static", ["dist/index.html"]),
    ({"index.html": ""}, "static", ["index.html"]),
    ({"README.md": ""}, None, []),
])
def test_detect(tmp_path, spec, template, evidence):
    assert detect(files(tmp_path, spec)) == (template, evidence)


@pytest.mark.parametrize(("raw", "name"), [
    ("@acme/My_Tool", "my-tool"), ("Hello World!", "hello-world"), ("--", "my-capsule"), ("a" * 80, "a" * 64),
    ("ünïcode", "n-code"), ("x", "x"),
])
def test_sanitize_name(raw, name):
    assert sanitize_name(raw) == name


@pytest.mark.parametrize(("makefile", "binary"), [
    ("CC=cc\n.PHONY: all\nall: prog other\n\nprog: a.c\n", "prog"),
    ("# comment\nhello: hello.c\n\t$(CC) -o $@ $<\n", "hello"),
    ("%.o: %.c\n\tcc\nbin/tool: x.o\n", "bin/tool"),
    ("VAR := 1\n", None),
])
def test_make_binary(tmp_path, makefile, binary):
    assert _make_binary(files(tmp_path, {"Makefile": makefile}) / "Makefile") == binary


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_renders_a_valid_deterministic_manifest_in_an_empty_dir(tmp_path, template):
    plan = plan_init(tmp_path / "proj", template=template)
    manifest = parse_manifest(plan.manifest_text, tmp_path / "proj" / "capsule.toml")
    assert manifest.schema_version == "0.2" and manifest.name == "proj"
    assert plan_init(tmp_path / "proj", template=template).manifest_text == plan.manifest_text
    assert plan.spec.starters, "an empty dir gets a runnable starter"
    assert all(line.startswith("#") or line == "" or "=" in line or line.startswith("[")
               for line in plan.manifest_text.splitlines())


def test_web_detection_and_ports(tmp_path):
    project = files(tmp_path, {"package.json": json.dumps({"dependencies": {"express": "4"}}),
                               "index.js": "require('express')().listen(process.env.PORT)\n"})
    spec = plan_init(project).spec
    assert (spec.runtime, spec.port, spec.label) == ("web", 3000, "web")
    assert plan_init(project, port=4100).spec.port == 4100
    with pytest.raises(AtoError) as err:
        plan_init(project, port=70000)
    assert err.value.code == "E100"


def test_values_from_the_project_are_quoted_safely(tmp_path):
    project = files(tmp_path, {"package.json": json.dumps({"name": "x", "description": 'say "hi"\n\\ [x]',
                                                           "main": "src/index.js"}),
                               "src/index.js": ""})
    plan = plan_init(project)
    manifest = parse_manifest(plan.manifest_text, project / "capsule.toml")
    assert manifest.metadata["description"] == 'say "hi"\n\\ [x]'
    assert manifest.primary_target().entrypoint == "src/index.js"


def test_write_never_replaces_an_existing_file_and_rolls_back(tmp_path):
    project = files(tmp_path / "p", {"main.py": "print('mine')\n"})
    plan = plan_init(project, template="python")
    assert "main.py" not in plan.spec.starters and "pyproject.toml" in plan.spec.starters
    written = write_init(plan)
    assert (project / "main.py").read_text() == "print('mine')\n"
    assert sorted(p.name for p in written.created) == ["capsule.toml", "pyproject.toml"]
    written.rollback()
    assert sorted(p.name for p in project.iterdir()) == ["main.py"]
