"""The one benchmark tree: ~10,000 files, ~150 MB, generated the same way on every machine.

A project-like mix: mostly source-like text files (lines drawn from a fixed pool of
generated code lines, so the text compresses about as well as real source does), a few
hundred incompressible blobs (media, archives), spread over nested directories. Every
byte comes from ``random.Random(SEED)``, so the tree is identical on any machine and any
run; it is generated once into ``bench/work/tree`` and reused while its stamp (beside it) matches.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

SEED = 13
FILES = 10_000
BLOBS = 300  # of FILES: incompressible
BLOB_BYTES = 36 * 1024 * 1024  # total size of the blobs
TEXT_BYTES = 114 * 1024 * 1024  # total size of the text files
LINE_POOL = 60_000
VERSION = 1  # bump when the generator changes what it writes

MANIFEST = """\
schema_version = "0.2"
name = "bench-tree"
version = "{version}"
type = "app"
default_target = "default"

[targets.default]
runtime = "source"
driver = "python"
entrypoint = "src/main.py"
"""

_WORDS = ("value", "index", "count", "buffer", "name", "path", "result", "config", "item", "state", "node",
          "token", "parse", "render", "update", "load", "store", "check", "build", "fetch", "handle",
          "event", "queue", "cache", "digest", "chunk", "frame", "stream", "reader", "writer", "size",
          "offset", "limit", "total", "error", "status", "module", "record", "entry", "table")
_TEMPLATES = (
    "    {a}_{b} = {c}_{d}({a}, {n})\n",
    "    if {a}_{b} > {n}:\n        return {c}_{d}\n",
    "def {a}_{b}({c}, {d}={n}):\n",
    "    # {a} the {b} before {c} ({n})\n",
    "    for {a} in {b}_{c}[{n}:]:\n",
    "        self.{a}_{b}.append({c}.{d}({n}))\n",
    '    log.debug("{a} {b} %s", {c}_{d})\n',
    "class {A}{B}({C}{D}):\n",
    "    {a}_{b}: dict[str, int] = {{'{c}': {n}, '{d}': {m}}}\n",
    "    raise {A}Error(f'{b} {{{c}}} is not {d}')\n",
    "\n",
)
_EXTENSIONS = (".py", ".py", ".py", ".js", ".ts", ".json", ".md", ".toml", ".txt", ".css")


def _line_pool(rng: random.Random) -> list[str]:
    words = [f"{w}{i}" if i else w for i in range(25) for w in _WORDS]
    out = []
    for _ in range(LINE_POOL):
        a, b, c, d = rng.choices(words, k=4)
        out.append(rng.choice(_TEMPLATES).format(a=a, b=b, c=c, d=d, A=a.title(), B=b.title(), C=c.title(),
                                                  D=d.title(), n=rng.randrange(10_000), m=rng.randrange(100)))
    return out


def _sizes(rng: random.Random, count: int, total: int, sigma: float, cap: int) -> list[int]:
    """``count`` log-normal sizes scaled to sum to about ``total``, each at most ``cap``."""
    raw = [rng.lognormvariate(0, sigma) for _ in range(count)]
    scale = total / sum(raw)
    return [max(16, min(cap, int(r * scale))) for r in raw]


def stamp() -> dict[str, int]:
    return {"version": VERSION, "seed": SEED, "files": FILES, "blobs": BLOBS, "blob_bytes": BLOB_BYTES,
            "text_bytes": TEXT_BYTES}


def relpaths(rng: random.Random) -> list[str]:
    """FILES - 1 distinct paths in nested package directories (plus src/main.py, added by make_tree)."""
    out = []
    for i in range(FILES - 1):
        pkg, mod = divmod(i, 100)
        depth = rng.random()
        sub = f"pkg{pkg:02d}/mod{mod % 10}" if depth < 0.6 else f"pkg{pkg:02d}/mod{mod % 10}/inner{mod % 3}"
        out.append(f"src/{sub}/file{i:05d}")
    return out


def make_tree(dest: Path) -> dict[str, int]:
    """Generate the tree into ``dest`` unless it is already there with the same stamp."""
    stamp_file = dest.with_name(dest.name + ".stamp.json")  # outside the tree: not packed
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp():
        return stamp()
    if dest.exists():
        shutil.rmtree(dest)
    rng = random.Random(SEED)
    pool = _line_pool(rng)
    paths = relpaths(rng)
    blob_at = set(rng.sample(range(len(paths)), BLOBS))
    blob_sizes = iter(_sizes(rng, BLOBS, BLOB_BYTES, 1.0, 4 << 20))
    text_sizes = iter(_sizes(rng, len(paths) - BLOBS, TEXT_BYTES, 1.2, 1 << 20))
    for i, rel in enumerate(paths):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in blob_at:
            path.with_suffix(rng.choice((".png", ".woff2", ".gz", ".bin"))).write_bytes(rng.randbytes(next(blob_sizes)))
            continue
        size = next(text_sizes)
        lines = rng.choices(pool, k=size // 40 + 1)
        text = "".join(lines)[:size]
        path.with_suffix(rng.choice(_EXTENSIONS)).write_text(text)
    (dest / "src" / "main.py").write_text("print('bench tree')\n")
    (dest / "capsule.toml").write_text(MANIFEST.format(version="1.0.0"))
    stamp_file.write_text(json.dumps(stamp()))
    return stamp()


def victim(dest: Path) -> Path:
    """The one text file a one-file change edits: the same one on every machine."""
    candidates = sorted(p for p in (dest / "src").rglob("*.py") if p.name != "main.py")
    return candidates[len(candidates) // 2]
