"""Publish phase selection and flag rules (stages.publish), without any network."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import AtoError
from stages.publish import (
    PublishRequest,
    check_flags,
    check_route_flags,
    default_publisher,
    prepare_command,
    resolve_registry,
    select_phases,
)


def req(**kw) -> PublishRequest:
    return PublishRequest(project_dir=Path("/nonexistent"), **kw)


def selected(r: PublishRequest, official: bool) -> list[str]:
    return [p.name for p in select_phases(r, official) if p.selected]


@pytest.mark.parametrize("kw, official, want", [
    ({}, False, ["prepare", "build", "deploy"]),
    ({}, True, ["deploy"]),
    ({"legacy_full_publish": True}, True, ["prepare", "build", "deploy"]),
    ({"build": True}, True, ["build"]),
    ({"prepare": True, "build": True}, True, ["prepare", "build"]),
    ({"build": True, "deploy": True}, True, ["build", "deploy"]),
    ({"deploy": True}, False, ["deploy"]),
    ({"prepare": True}, False, ["prepare"]),
    ({"artifact": Path("x.capsule")}, False, ["deploy"]),
    ({"artifact": Path("x.capsule"), "deploy": True, "build": True}, False, ["deploy"]),
    ({"artifact": Path("x.capsule")}, True, ["deploy"]),
])
def test_phase_selection(kw: dict, official: bool, want: list[str]) -> None:
    assert selected(req(**kw), official) == want


def test_artifact_skips_build_with_a_reason_and_needs_deploy() -> None:
    phases = select_phases(req(artifact=Path("x.capsule")), False)
    assert [(p.name, p.skipped_reason) for p in phases[:2]] == [("prepare", "--artifact"), ("build", "--artifact")]
    with pytest.raises(AtoError, match="needs the deploy phase"):
        select_phases(req(artifact=Path("x.capsule"), build=True), False)


@pytest.mark.parametrize("kw, message", [
    ({"ci": True, "dry_run": True}, "--ci cannot be combined with --dry-run"),
    ({"ci": True, "prepare": True}, "--ci cannot be combined with --prepare/--build/--deploy"),
    ({"dry_run": True, "deploy": True}, "--dry-run cannot be combined with --prepare/--build/--deploy"),
    ({"dry_run": True, "allow_existing": True}, "--dry-run cannot be combined with --allow-existing"),
    ({"ci": True, "legacy_full_publish": True}, "--ci cannot be combined with --allow-existing"),
    ({"legacy_full_publish": True, "deploy": True}, "--legacy-full-publish cannot be combined"),
    ({"scoped_id": "nope"}, "--scoped-id must be publisher/slug"),
    ({"scoped_id": "a/B"}, "--scoped-id must be publisher/slug"),
])
def test_flag_conflicts(kw: dict, message: str) -> None:
    with pytest.raises(AtoError, match=message):
        check_flags(req(**kw))


@pytest.mark.parametrize("kw, official, message", [
    ({"allow_existing": True}, True, "only available for private registry deploy phase"),
    ({"allow_existing": True, "build": True}, False, "only available for private registry deploy phase"),
    ({"legacy_full_publish": True}, False, "only available for official registry publish"),
    ({"fix": True}, False, "--fix is only available"),
    ({"fix": True, "build": True}, True, "--fix is only available"),
])
def test_route_rules(kw: dict, official: bool, message: str) -> None:
    r = req(**kw)
    with pytest.raises(AtoError, match=message):
        check_route_flags(r, official, select_phases(r, official))


def test_route_rules_accept_the_documented_combinations() -> None:
    for kw, official in (({"allow_existing": True}, False), ({"allow_existing": True, "deploy": True}, False),
                         ({"fix": True}, True), ({"legacy_full_publish": True}, True)):
        r = req(**kw)
        check_route_flags(r, official, select_phases(r, official))


def test_registry_resolution(tmp_path: Path) -> None:
    assert resolve_registry(req(registry="127.0.0.1:18787/")) == "http://127.0.0.1:18787"
    with pytest.raises(AtoError, match="No default publish target"):
        resolve_registry(PublishRequest(project_dir=tmp_path))
    (tmp_path / "capsule.toml").write_text('name = "x"\n[store]\nregistry = "http://127.0.0.1:9999"\n')
    assert resolve_registry(PublishRequest(project_dir=tmp_path)) == "http://127.0.0.1:9999"
    with pytest.raises(AtoError, match="not a registry"):
        resolve_registry(req(registry="https://store.ato.run/d/someone"))
    with pytest.raises(AtoError, match="http or https"):
        resolve_registry(req(registry="ftp://x"))


def test_default_publisher_comes_from_the_repository_owner() -> None:
    assert default_publisher({}) == "local"
    assert default_publisher({"repository": "https://github.com/Koh0920/file2api"}) == "koh0920"
    assert default_publisher({"metadata": {"repository": "git@github.com:Team_X/app.git"},
                              "repository": "https://github.com/other/x"}) == "team-x"
    assert default_publisher({"repository": "not a url"}) == "local"


def test_prepare_hook_discovery(tmp_path: Path) -> None:
    assert prepare_command(tmp_path) is None
    (tmp_path / "package.json").write_text('{"scripts": {"capsule:prepare": "next build"}}')
    assert prepare_command(tmp_path) == ["npm", "run", "capsule:prepare"]
    (tmp_path / "capsule.toml").write_text('[build.lifecycle]\nprepare = "make dist"\n')
    assert prepare_command(tmp_path) == ["sh", "-c", "make dist"]
