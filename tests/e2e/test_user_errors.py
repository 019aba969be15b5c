"""Failures the user can fix get their own documented code and exit 1, never E999 (issue 12).

A full disk (a small tmpfs as ATO_HOME), TOML nested 2,000 deep, a 3,000-service ``depends_on``
chain, a payload member name the filesystem cannot hold, a truncated ``.capsule``, a registry
that is not there or not a registry, malformed registry parameters, and control characters in
echoed values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import blake3
import httpx
import pytest

from cas import tempfiles
from tests.conftest import Result, cli_path, home_env
from tests.e2e.registry_support import TOKEN, Registry, forge_capsule, install_flags

MANIFEST_HEAD = """\
schema_version = "0.2"
name = "{name}"
version = "0.1.0"
type = "app"
default_target = "t"

[targets.t]
runtime = "source"
driver = "python"
entrypoint = "main.py"
"""


def one_line_failure(res: Result, code: str, exit_code: int = 1) -> str:
    """The failure is ``error[code]`` on one stderr line, the documented exit status, no traceback."""
    assert res.code == exit_code, (res.code, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error[")]
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), res.stderr
    assert "Traceback" not in res.stderr and "E999" not in res.stderr
    return lines[0]


def project(root: Path, name: str, body: str = "", files: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "capsule.toml").write_text(MANIFEST_HEAD.format(name=name) + body)
    (root / "main.py").write_text("print('hi')\n")
    for rel, data in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ------------------------------------------------------------------ a full disk


class SmallDisk:
    """A tmpfs of its own; ``fill(leave)`` takes all but ``leave`` bytes of it."""

    def __init__(self, root: Path, size_mb: int) -> None:
        self.root = root
        root.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {proc.stderr.strip()}")
        self.filler = root / "filler.bin"

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(0, self.free() - leave))

    def leftovers(self) -> list[Path]:
        return list(tempfiles.find(self.root, recursive=True))

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    disk = SmallDisk(tmp_path / "disk", 32)
    yield disk
    disk.unmount()


def big_files() -> dict[str, bytes]:
    return {f"assets/blob{i}.bin": os.urandom(1 << 20) for i in range(4)}  # 4 MiB that do not compress


def test_disk_full_during_build_is_e211(ato, tmp_path: Path, small_disk: SmallDisk) -> None:
    src = project(tmp_path / "src", "full", files=big_files())
    env = home_env(small_disk.root / "home")
    small_disk.fill(leave=1 << 20)
    line = one_line_failure(ato(["build", ".", "--out", str(small_disk.root / "full.capsule")], cwd=src, env=env),
                            "E211")
    assert "no space left" in line
    assert small_disk.leftovers() == [] and not (small_disk.root / "full.capsule").exists()
    res = ato(["build", ".", "--json"], cwd=src, env=env)
    assert json.loads(one_line_failure_json(res))["error"]["code"] == "E211"


def one_line_failure_json(res: Result) -> str:
    assert res.code == 1 and res.stdout == "", res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_disk_full_during_install_fetch_and_run_is_e211(ato, tmp_path: Path, small_disk: SmallDisk) -> None:
    src = project(tmp_path / "src", "full", files=big_files())
    env = home_env(small_disk.root / "home")
    # built in the small disk's home, so `run` trusts it as a local build; the artifact itself lies outside
    artifact = tmp_path / "full.capsule"
    res = ato(["build", ".", "--out", str(artifact), "--json"], cwd=src, env=env)
    assert res.code == 0, res.stderr
    reg = Registry(tmp_path / "data", token=TOKEN)
    try:
        pub = ato(["publish", "--artifact", str(artifact), "--registry", reg.url, "--json"], cwd=src,
                  env={**home_env(tmp_path / "publisher"), "ATO_TOKEN": TOKEN})
        assert pub.code == 0, pub.stderr
        consumer = home_env(small_disk.root / "consumer")
        small_disk.fill(leave=1 << 20)
        one_line_failure(ato(["install", "local/full", "--registry", reg.url, *install_flags()], env=consumer),
                         "E211")
    finally:
        reg.stop()
    one_line_failure(ato(["fetch", str(artifact)], env=env), "E211")
    one_line_failure(ato(["run", str(artifact), "--yes"], env=env), "E211")
    assert small_disk.leftovers() == []
    assert not list((small_disk.root / "consumer" / ".ato" / "store").rglob("*.capsule"))


def test_disk_full_on_the_registry_is_507_not_500(ato, tmp_path: Path, small_disk: SmallDisk) -> None:
    src = project(tmp_path / "src", "full", files=big_files())
    res = ato(["build", ".", "--json"], cwd=src, env=home_env(tmp_path / "publisher"))
    assert res.code == 0, res.stderr
    reg = Registry(small_disk.root / "data", token=TOKEN)
    try:
        small_disk.fill(leave=1 << 20)
        pub = ato(["publish", "--artifact", res.json()["artifact"], "--registry", reg.url],
                  cwd=src, env={**home_env(tmp_path / "publisher"), "ATO_TOKEN": TOKEN})
        line = one_line_failure(pub, "E901", 3)  # the server's disk, not the user's: a server error
        assert "507" in line and "disk is full" in line
        assert small_disk.leftovers() == []
    finally:
        reg.stop()


def limited(args: list[str], cwd: Path, env: dict[str, str], max_file: int) -> Result:
    """``ato args`` with ``ulimit -f`` at ``max_file`` bytes: every write past it fails with EFBIG, as a
    full disk fails with ENOSPC, and this needs no privilege (the tmpfs tests above need root)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))
    proc = subprocess.run([cli_path("ato"), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_a_write_past_the_file_size_limit_is_e211_and_leaves_nothing(ato, tmp_path: Path) -> None:
    src = project(tmp_path / "src", "fsize", files=big_files())
    env = home_env(tmp_path / "home")
    line = one_line_failure(limited(["build", ".", "--out", str(tmp_path / "a.capsule")], src, env, 1 << 20), "E211")
    assert "file size limit" in line
    assert list(tempfiles.find(tmp_path, recursive=True)) == [] and not (tmp_path / "a.capsule").exists()
    # the same build without the limit works, and so does an install the limit stops halfway
    res = ato(["build", ".", "--out", str(tmp_path / "a.capsule"), "--json"], cwd=src, env=env)
    assert res.code == 0, res.stderr
    reg = Registry(tmp_path / "data", token=TOKEN)
    try:
        pub = ato(["publish", "--artifact", str(tmp_path / "a.capsule"), "--registry", reg.url], cwd=src,
                  env={**env, "ATO_TOKEN": TOKEN})
        assert pub.code == 0, pub.stderr
        consumer = home_env(tmp_path / "consumer")
        args = ["install", "local/fsize", "--registry", reg.url, *install_flags()]
        one_line_failure(limited(args, tmp_path, consumer, 1 << 20), "E211")
        assert list(tempfiles.find(tmp_path / "consumer", recursive=True)) == []
        assert not list((tmp_path / "consumer").rglob("*.capsule"))
        res = ato(args, env=consumer)
        assert res.code == 0, res.stderr
    finally:
        reg.stop()


# ------------------------------------------------------------------ too deep, too long


@pytest.mark.parametrize("opening,closing", [("[", "]"), ("{a=", "}")])
def test_toml_nested_2000_deep_is_e004(ato, tmp_path: Path, opening: str, closing: str) -> None:
    src = project(tmp_path / "p", "deep", f"\n[metadata]\nx = {opening * 2000}{closing * 2000}\n")
    line = one_line_failure(ato(["build", "."], cwd=src), "E004")
    assert "nested more than 64 levels" in line


def test_nesting_up_to_the_limit_is_read(ato, tmp_path: Path) -> None:
    src = project(tmp_path / "p", "shallow", f"\n[metadata]\nx = {'[' * 60}1{']' * 60}\n")
    res = ato(["build", "."], cwd=src)
    assert res.code == 0, res.stderr


DEEP_JSON = '{"name": ' + "[" * 5000 + "]" * 5000 + "}"


def test_json_nested_5000_deep_is_e004(ato, tmp_path: Path) -> None:
    """User JSON files (a capability.json, the trust store) nested too deep: E004 naming the file."""
    (tmp_path / "capability.json").write_text(DEEP_JSON)
    res = subprocess.run([cli_path("cap"), "preview"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    line = one_line_failure(Result(res.returncode, res.stdout, res.stderr), "E004")
    assert "capability.json: nested more than 64 levels" in line
    env = home_env(tmp_path / "home")
    store = tmp_path / "home" / ".capsule" / "trust_store.json"
    store.parent.mkdir(parents=True)
    store.write_text(DEEP_JSON)
    line = one_line_failure(ato(["trust", "ls"], env=env), "E004")
    assert "trust_store.json: nested more than 64 levels" in line


def chain(count: int) -> str:
    out = []
    for i in range(count):
        name = "main" if i == count - 1 else f"s{i}"
        out += [f"[services.{name}]", 'command = "python3 main.py"']
        if i:
            out.append(f'depends_on = ["s{i - 1}"]')
    return "\n" + "\n".join(out) + "\n"


def test_a_3000_service_depends_on_chain_is_e005(ato, tmp_path: Path) -> None:
    line = one_line_failure(ato(["build", "."], cwd=project(tmp_path / "p", "chain", chain(3000))), "E005")
    assert "3000" in line and "256" in line


def test_a_256_service_chain_is_accepted(ato, tmp_path: Path) -> None:
    res = ato(["build", ".", "--json"], cwd=project(tmp_path / "p", "chain", chain(256)))
    assert res.code == 0, res.stderr


def test_a_300_character_member_name_is_e108(ato, tmp_path: Path) -> None:
    artifact = forge_capsule(tmp_path / "long.capsule", "long", "0.1.0",
                             members=[("main.py", b"print(1)\n"), ("d/" + "n" * 300 + ".txt", b"x")])
    line = one_line_failure(ato(["fetch", str(artifact)]), "E108")
    assert "over 255 bytes" in line and ".ato-tmp" not in line  # names the member, not a temp path
    one_line_failure(ato(["verify", str(artifact)]), "E108")
    one_line_failure(ato(["run", str(artifact), "--yes", "--allow-unsigned"]), "E108")
    assert list(tempfiles.find(Path(os.environ["ATO_HOME"]), recursive=True)) == []


def deep_tree(root: Path, levels: int) -> None:
    """``d/d/.../d/leaf.txt``, ``levels`` directories deep (built with relative steps: no long paths)."""
    here = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=here)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
            os.close(here)
            here = below
        fd = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here)
        os.write(fd, b"x")
        os.close(fd)
    finally:
        os.close(here)


def remove_deep_tree(root: Path) -> None:
    """Undo :func:`deep_tree` bottom-up, however far it got (``shutil.rmtree``, and so pytest's clean-up of
    old temp dirs, recurses once per level: a tree left 2,200 deep would break every later session)."""
    here = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    levels = 0
    while True:
        try:
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=here)
        except FileNotFoundError:
            break
        os.close(here)
        here, levels = below, levels + 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink("leaf.txt", dir_fd=here)
    for _ in range(levels):
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
        os.close(here)
        here = parent
        os.rmdir("d", dir_fd=here)
    os.close(here)


@pytest.mark.parametrize("levels", [300, 2200])  # 2,200: deeper than Python's recursion limit
def test_a_directory_tree_too_deep_for_a_capsule_is_e108_everywhere(ato, tmp_path: Path, levels: int,
                                                                     request: pytest.FixtureRequest) -> None:
    src = project(tmp_path / "p", "deep")
    request.addfinalizer(lambda: remove_deep_tree(src))
    deep_tree(src, levels)
    line = one_line_failure(ato(["build", "."], cwd=src), "E108")
    assert "257 levels deep, over the 256" in line
    (src / "capsule.toml").write_text((src / "capsule.toml").read_text() + '\n[pack]\nexclude = ["d/**"]\n')
    res = ato(["build", ".", "--json"], cwd=src)  # excluded, it is no obstacle
    assert res.code == 0, res.stderr
    # an artifact that holds one (made by another tool) is refused the same way by every reader
    artifact = forge_capsule(tmp_path / "deep.capsule", "deep", "0.1.0",
                             members=[("main.py", b"print(1)\n"), ("d/" * 257 + "leaf.txt", b"x")])
    for args in (["verify", str(artifact)], ["fetch", str(artifact)],
                 ["run", str(artifact), "--yes", "--allow-unsigned"]):
        assert "directories deep" in one_line_failure(ato(args), "E108"), args


def test_a_tree_256_levels_deep_is_packed_and_unpacked(ato, tmp_path: Path) -> None:
    src = project(tmp_path / "p", "deepok")
    deep_tree(src, 255)  # 255 directories and the file: 256 components
    res = ato(["build", ".", "--json"], cwd=src)
    assert res.code == 0, res.stderr
    res = ato(["fetch", res.json()["artifact"], "--json"])
    assert res.code == 0, res.stderr


def test_a_300_character_output_name_is_e108_naming_it(ato, tmp_path: Path) -> None:
    """The final rename fails, not the temp file: the message names the user's name, not ato's temp."""
    src = project(tmp_path / "p", "longout")
    out = tmp_path / ("o" * 300 + ".capsule")
    line = one_line_failure(ato(["build", ".", "--out", str(out)], cwd=src), "E108")
    assert "oooooooo.capsule (308 bytes)" in line and "ato-tmp" not in line
    assert list(tempfiles.find(tmp_path, recursive=True)) == []


@pytest.fixture(scope="module")
def whole_artifact(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("cut")
    src = project(root / "p", "cut", files={"blob.bin": os.urandom(300_000)})
    proc = subprocess.run([cli_path("ato"), "build", ".", "--json"], cwd=src, capture_output=True, text=True,
                          env={**os.environ, **home_env(root / "home")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(json.loads(proc.stdout)["artifact"]).read_bytes()


@pytest.mark.parametrize("keep", [0, 100, 5000, 5120, 200_000, -512])
def test_a_truncated_capsule_is_e213_everywhere(ato, tmp_path: Path, whole_artifact: bytes, keep: int) -> None:
    """Cut in a header, between members, inside the payload, in the end-of-archive padding."""
    cut = tmp_path / "cut.capsule"
    cut.write_bytes(whole_artifact[:keep])
    one_line_failure(ato(["fetch", str(cut)]), "E213")
    one_line_failure(ato(["verify", str(cut)]), "E213")
    one_line_failure(ato(["run", str(cut), "--yes"]), "E213")
    one_line_failure(ato(["publish", "--artifact", str(cut), "--registry", "http://127.0.0.1:9"]), "E213")


# ------------------------------------------------------------------ the network


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_unreachable_host_is_e900_exit_3(ato, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    artifact = forge_capsule(tmp_path / "x.capsule", "x", "0.1.0", members=[("main.py", b"print(1)\n")])
    src = project(tmp_path / "p", "x")  # gen-ci writes into a project
    for args in (["install", "local/x", "--registry", url, "--yes"], ["search", "x", "--registry", url],
                 ["fetch", "local/x", "--registry", url], ["inspect", "requirements", "local/x", "--registry", url],
                 ["publish", "--artifact", str(artifact), "--registry", url],
                 ["trust", "revoke", "--from", url + "/revoked.json"],
                 ["gen-ci", "--index-url", url + "/simple"]):
        res = ato(args, cwd=src, env={"ATO_RELEASE_BASE_URL": url, "ATO_TOKEN": TOKEN})
        line = one_line_failure(res, "E900", 3)
        assert "network error: cannot " in line, (args, line)


class _NotARegistry(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        body = b"<html>not a registry</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


def test_a_server_that_is_not_a_registry_is_e901(ato) -> None:
    server = HTTPServer(("127.0.0.1", 0), _NotARegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_line_failure(ato(["install", "acme/app", "--registry", url, "--yes"]), "E901", 3)
        assert "not JSON" in line
    finally:
        server.shutdown()


# ------------------------------------------------------------------ the registry's parameters


@pytest.fixture
def registry(tmp_path: Path):
    reg = Registry(tmp_path / "data", token=TOKEN)
    yield reg
    reg.stop()


def test_malformed_registry_parameters_are_400_never_500(ato, tmp_path: Path, registry: Registry) -> None:
    src = project(tmp_path / "p", "params")
    res = ato(["build", ".", "--json"], cwd=src)
    assert res.code == 0, res.stderr
    data = Path(res.json()["artifact"]).read_bytes()
    auth = {"authorization": f"Bearer {TOKEN}"}
    upload = {**auth, "x-ato-sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
              "x-ato-blake3": "blake3:" + blake3.blake3(data).hexdigest()}
    put = f"{registry.url}/v1/local/capsules/local/params/0.1.0"
    cases = [
        ("PUT", put + "?file_name=a%00.capsule", upload, data, 400, "invalid_file_name"),
        ("PUT", put + "?file_name=%ff%fe.capsule", upload, data, 400, "invalid_file_name"),
        ("PUT", put + "?file_name=a%1b%5b2J.capsule", upload, data, 400, "invalid_file_name"),
        ("PUT", put + "?file_name=" + "a" * 300 + ".capsule", upload, data, 400, "invalid_file_name"),
        ("PUT", put + "?allow_existing=maybe", upload, data, 400, "invalid_parameter"),
        ("PUT", f"{registry.url}/v1/local/capsules/lo%00cal/params/0.1.0", upload, data, 400, "invalid_parameter"),
        ("GET", f"{registry.url}/v1/artifacts/local/params/0.1.0/a%00.capsule", {}, None, 400, "invalid_parameter"),
        ("GET", f"{registry.url}/v1/capsules?limit=abc", {}, None, 400, "invalid_parameter"),
        ("POST", f"{registry.url}/v1/sync/negotiate", auth, b"[" * 100_000, 400, "too_deep"),
        ("POST", f"{registry.url}/v1/sync/commit", auth,
         json.dumps({"publisher": "local", "slug": "params", "version": "9.9.9", "sha256": upload["x-ato-sha256"],
                     "blake3": upload["x-ato-blake3"], "prefix": "", "suffix": "",
                     "chunks": [{"raw_hash": "blake3:" + "0" * 64, "raw_size": 1e400}]}).encode(),
         400, "invalid_request"),
        ("PUT", f"{registry.url}/v1/chunks/blake3:{'0' * 64}", {**auth, "x-raw-size": "10"}, b"junk", 422,
         "chunk_validation_failed"),
        ("DELETE", f"{registry.url}/v1/local/capsules/by/local/params?confirmed=perhaps", auth, None, 400,
         "invalid_parameter"),
    ]
    for method, url, headers, body, status, error in cases:
        resp = httpx.request(method, url, headers=headers, content=body, timeout=60)
        assert (resp.status_code, resp.json()["error"]) == (status, error), (method, url[:90], resp.text[:300])
    # the error body escapes what it echoes
    resp = httpx.put(f"{registry.url}/v1/local/capsules/local/a%1b%5b2Jb/0.1.0", headers=upload, content=data)
    assert resp.status_code == 400 and "\x1b" not in resp.text and "\\\\x1b" in resp.text
    # and a well-formed upload still works
    assert httpx.put(put, headers=upload, content=data, timeout=60).status_code == 201


def registry_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the registry serves, read from the app itself, so a route
    added later is covered without editing this test."""
    from pipeline.registry.server import create_app
    from pipeline.registry.storage import RegistryStore

    with tempfile.TemporaryDirectory() as data:
        app = create_app(RegistryStore(Path(data)), TOKEN, "http://127.0.0.1:1")
        out = []
        for route in app.routes:
            path = getattr(route, "path", "")
            if "{" in path:
                methods = sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD"})
                out += [(method, path) for method in methods]
        return out


ROUTES = registry_routes()
# NUL, ESC, DEL, a C1 control, a lone byte that is not UTF-8, a newline
UNFIT = ["a%00b", "%1b%5b2J", "x%7f", "%c2%9b", "%ff", "a%0ab"]


def test_every_route_refuses_control_bytes_in_path_parameters_with_400_json(registry: Registry) -> None:
    """``%00`` and friends in any path parameter of any route: 400 with a JSON error, never a 500 or a page."""
    assert len(ROUTES) >= 20, ROUTES
    good = {"publisher": "local", "slug": "app", "version": "0.1.0", "file_name": "app.capsule",
            "raw_hash": "blake3:" + "0" * 64, "source_id": "src_abc", "run_id": "run_abc", "handle": "local",
            "path": "index.html", "rest": "anything"}
    headers = {"authorization": f"Bearer {TOKEN}"}
    tried = 0
    for method, template in ROUTES:
        params = re.findall(r"{(\w+)(?::\w+)?}", template)
        for param in params:
            for bad in UNFIT:
                fill = {**good, param: bad}
                path = re.sub(r"{(\w+)(?::\w+)?}", lambda m, fill=fill: fill[m.group(1)], template)
                resp = httpx.request(method, registry.url + path, headers=headers, content=b"{}", timeout=60)
                where = (method, path, resp.status_code, resp.text[:200])
                assert resp.status_code == 400 and resp.headers["content-type"] == "application/json", where
                body = resp.json()
                assert body["error"] == "invalid_parameter", where
                assert not re.search(r"[\x00-\x1f\x7f-\x9f]", body["message"]), where
                tried += 1
    assert tried >= 200
    assert registry.proc.poll() is None
    # the same names without the bad bytes reach their routes
    assert httpx.get(f"{registry.url}/v1/capsules/by/local/app", timeout=60).status_code == 404


# ------------------------------------------------------------------ echoed control characters


def test_control_characters_in_echoed_values_are_escaped(ato, tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.mkdir()
    (src / "capsule.toml").write_text(MANIFEST_HEAD.format(name="bad\\u001b[2Jname\\u0000x\\u009b") +
                                      '\n[services.main]\ncommand = "python3 main.py"\n"k\\u001b]0;pwned\\u0007" = 1\n')
    (src / "main.py").write_text("print(1)\n")
    res = ato(["build", "."], cwd=src)
    assert res.code == 1
    for raw in ("\x1b", "\x00", "\x9b", "\x07"):
        assert raw not in res.stderr, repr(res.stderr)
    assert "\\x1b[2Jname\\x00x\\x9b" in res.stderr
    res = ato(["build", ".", "--json"], cwd=src)
    assert res.code == 1 and "\x9b" not in res.stderr and "\x1b" not in res.stderr
    doc = json.loads(res.stderr.strip().splitlines()[-1])  # JSON keeps the value, written as \u escapes
    assert "\x1b[2Jname\x00x\x9b" in doc["error"]["message"]
