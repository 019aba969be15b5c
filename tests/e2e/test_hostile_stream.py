"""What a compromised registry serves as a *skeleton plus frames* (the delta install path, where the
payload is scanned while it downloads) is refused like a whole download: every class of issue 12
whose frames are its chunks, a frame the registry's disk holds tampered, and a frame that decodes to
far more than its chunk. `ato install` and `ato run` against a real `ato registry serve` give the one
code, exit 1, one readable line; nothing is stored, indexed, fetched or unpacked, no temp file is left
in ATO_HOME, nothing outside it changes, and a bomb costs under 200 MB. The same releases served whole
are test_hostile_registry.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import httpx
import pytest
import zstandard

from cas.payload_manifest import ChunkRef, PayloadManifest
from pipeline import paths
from tests.e2e.hostile_cases import (
    BOMBS,
    CASES,
    MAIN,
    MAX_RSS,
    TRUST_ONLY,
    VERSION,
    assert_refused,
    run_ato,
    slug,
)
from tests.e2e.registry_support import Registry
from tests.hostile_support import (
    Entry,
    _parts,
    assemble,
    capsule,
    du,
    plant_release,
    spliced_layout,
    tar_bytes,
    tree_snapshot,
)

LYING_FRAME = "lying-frame-bomb"
TAMPERED_FRAME = "tampered-frame"
EXTRA = {LYING_FRAME: "E208", TAMPERED_FRAME: "E208"}


def _lying_frame_bomb(out: Path) -> Path:
    """One chunk, honestly listed (a small tar no other case holds), whose frame decodes to 256 MiB of zeros:
    the frame digest the skeleton names is right, the frame is not its chunk."""
    raw = tar_bytes([Entry("lying.py", b"print('lying')\n")])
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(256 << 20))
    payload = PayloadManifest([ChunkRef(blake3.blake3(raw).hexdigest(), len(raw), len(frame))])
    parts = _parts(out, "lying", VERSION, payload, iter([frame]), None)
    try:
        return assemble(parts, out)
    finally:
        parts.payload_path.unlink(missing_ok=True)


def _tampered_copy(art: Path, out: Path) -> Path:
    """``art`` with one byte of its payload's last frame flipped (framing and small members intact)."""
    layout = spliced_layout(art)
    assert layout is not None
    _manifest, pre, pay, _suf, _frames = layout
    data = bytearray(art.read_bytes())
    data[pre + pay - 10] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, hostile_artifacts: dict[str, Path]):
    """One real registry serving every spliceable class as a skeleton plus frames (publisher `evil`)."""
    root = tmp_path_factory.mktemp("registry")
    extra = root / "extra"
    extra.mkdir()
    arts = dict(hostile_artifacts)
    arts[LYING_FRAME] = _lying_frame_bomb(extra / "lying.capsule")
    good = capsule(extra / "good.capsule", slug(TAMPERED_FRAME), VERSION, [MAIN, Entry("blob.bin", os.urandom(300_000))])
    for case, art in arts.items():
        if spliced_layout(art) is not None:
            plant_release(root / "data", art, "evil", slug(case), VERSION, spliced=True)
    plant_release(root / "data", good, "evil", slug(TAMPERED_FRAME), VERSION, spliced=True,
                  served=_tampered_copy(good, extra / "tampered.capsule"))
    fine = capsule(extra / "fine.capsule", slug(TAMPERED_FRAME), VERSION, [MAIN, Entry("blob.bin", os.urandom(300_000))])
    plant_release(root / "data", fine, "fine", slug(TAMPERED_FRAME), VERSION, spliced=True)  # chunks of its own
    reg = Registry(root / "data", home=root / "home")
    yield reg, {c for c, a in arts.items() if spliced_layout(a) is not None} | {TAMPERED_FRAME}
    reg.stop()


def _leftovers() -> list[str]:
    """Temp files anywhere in ATO_HOME (a refused install must leave none)."""
    home = paths.ato_home()
    return [str(p) for p in home.rglob("*") if ".ato-tmp" in p.name] if home.exists() else []


def test_the_stream_path_installs_a_good_release(ato, registry) -> None:
    reg, _served = registry
    res = ato(["install", f"fine/{slug(TAMPERED_FRAME)}", "--registry", reg.url, "--allow-unsigned", "--json"])
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["transfer"]["mode"] == "delta" and doc["transfer"]["chunks_downloaded"] >= 1
    assert Path(doc["path"]).is_file()
    assert ato(["verify", doc["path"], "--allow-unsigned"]).code == 0
    assert not _leftovers()


STREAMED = sorted((set(CASES) - {"single-chunk-bomb", "truncated-outer-tar"}) | set(EXTRA))
# run installs on demand through the same code: one case of each kind keeps the suite short
RUN_CASES = ("dotdot", "symlink-chain-write", "many-chunk-bomb", "unknown-signer", LYING_FRAME, TAMPERED_FRAME)
CASES_POINTS = [(c, "install") for c in STREAMED] + [(c, "run") for c in RUN_CASES]


@pytest.mark.parametrize("case, point", CASES_POINTS)
def test_what_a_registry_streams_is_refused(case: str, point: str, registry, hostile_sentinel: Path,
                                           tmp_path: Path) -> None:
    reg, served = registry
    assert case in served, f"{case} is not served as a skeleton"
    ref = f"evil/{slug(case)}"
    base = reg.url.rstrip("/")
    assert httpx.get(f"{base}/v1/releases/evil/{slug(case)}/{VERSION}/skeleton").status_code == 200
    before = tree_snapshot(hostile_sentinel)
    args = ["install", ref] if point == "install" else ["run", ref, *([] if case in TRUST_ONLY else ["--yes"])]
    res, rss = run_ato([*args, "--registry", reg.url, "--allow-unsigned"], cwd=tmp_path)
    code = EXTRA.get(case) or CASES[case].code
    if point == "run" and case in TRUST_ONLY:
        assert_refused(res, "ATO_ERR_CONSENT_REQUIRED", f"{point} of {case}")
    else:
        assert_refused(res, code, f"{point} of {case}")
    assert tree_snapshot(hostile_sentinel) == before
    assert not paths.store_dir().exists() or not any(p.is_file() for p in paths.store_dir().rglob("*")), \
        "refused, yet stored"
    packs = paths.cas_root() / "packs"
    assert not packs.exists() or not any(p.suffix == ".capsule" for p in packs.rglob("*")), "refused, yet indexed"
    assert not _leftovers(), _leftovers()
    assert not paths.unpacked_dir().exists() or not any(paths.unpacked_dir().iterdir())
    if case in BOMBS or case == LYING_FRAME:
        assert rss < MAX_RSS, f"{point} of {case}: peak RSS {rss / 1e6:.0f} MB"
        assert du(paths.ato_home()) < 8 << 20, f"{point} of {case} wrote {du(paths.ato_home())} bytes"
