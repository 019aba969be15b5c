"""What a compromised registry serves cannot get past install, fetch or run: every class of issue 12,
planted as a release of a real `ato registry serve` (on disk, skipping the upload check, served
whole), is refused with its one code, exit 1, one readable line, no traceback; nothing is stored,
fetched or unpacked, nothing outside ATO_HOME changes, and bombs cost under 200 MB. The publishing
side is in test_hostile_publish.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import paths
from tests.e2e.hostile_cases import BOMBS, CASES, MAX_RSS, TRUST_ONLY, VERSION, assert_refused, run_ato, slug
from tests.e2e.registry_support import Registry
from tests.hostile_support import du, plant_release, tree_snapshot


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, hostile_artifacts: dict[str, Path]):
    """One real registry: every class planted as a release of publisher `evil`."""
    root = tmp_path_factory.mktemp("registry")
    for case, art in hostile_artifacts.items():
        plant_release(root / "data", art, "evil", slug(case), VERSION)
    reg = Registry(root / "data", home=root / "home")
    yield reg
    reg.stop()


ENTRY_POINTS = ("install", "fetch", "run")


@pytest.mark.parametrize("point", ENTRY_POINTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_what_a_compromised_registry_serves_is_refused(case: str, point: str, registry: Registry,
                                                       hostile_sentinel: Path, tmp_path: Path) -> None:
    ref = f"evil/{slug(case)}"
    before = tree_snapshot(hostile_sentinel)
    args = {"install": ["install", ref], "fetch": ["fetch", ref], "run": ["run", ref]}[point]
    if point == "run" and case not in TRUST_ONLY:
        args.append("--yes")  # consent to install-on-demand and to run, so that only the artifact can refuse
    res, rss = run_ato([*args, "--registry", registry.url, "--allow-unsigned"], cwd=tmp_path)
    if point == "run" and case in TRUST_ONLY:
        # without --yes, run asks before installing at all: ATO_ERR_CONSENT_REQUIRED, whose diagnostic is E301
        # (with --yes the same consent would pin the signer; the installed-artifact run refuses it with E301)
        assert_refused(res, "ATO_ERR_CONSENT_REQUIRED", f"{point} of {case}")
    else:
        assert_refused(res, CASES[case].code, f"{point} of {case}")
    assert tree_snapshot(hostile_sentinel) == before
    assert not paths.store_dir().exists() or not any(paths.store_dir().rglob("*.capsule")), "refused, yet stored"
    fetches = paths.fetches_dir()
    assert not fetches.exists() or not any(fetches.iterdir()), list(fetches.iterdir())
    assert not paths.unpacked_dir().exists() or not any(paths.unpacked_dir().iterdir())
    if case in BOMBS:
        assert rss < MAX_RSS, f"{point} of {case}: peak RSS {rss / 1e6:.0f} MB"
        assert du(paths.ato_home()) < 8 << 20, f"{point} of {case} wrote {du(paths.ato_home())} bytes"
