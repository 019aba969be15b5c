"""Native delivery metadata: derived defaults, inline [artifact]/[finalize], the ato.delivery.toml sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from pipeline.errors import AtoError
from pipeline.manifest import DeliveryMeta, Manifest, load_manifest, parse_manifest
from pipeline.manifest.delivery import host_arch

PATH = Path("/proj/capsule.toml")

APP = """\
schema_version = "0.2"
name = "my-app"
version = "0.1.0"
type = "app"
default_target = "desktop"

[targets.desktop]
runtime = "source"
driver = "native"
entrypoint = "MyApp.app"
"""

COMMAND = """\
schema_version = "0.2"
name = "my-app"
version = "0.1.0"
default_target = "desktop"

[targets.desktop]
runtime = "source"
driver = "native"
entrypoint = "sh"
cmd = ["build-app.sh"]
"""

INLINE_LINUX = """
[artifact]
framework = "tauri"
stage = "unsigned"
target = "linux/x86_64"
input = "dist/my-app"

[finalize]
tool = "ato-sign"
args = ["dist/my-app"]
"""

APP_SIDECAR = """\
schema_version = "0.1"
[artifact]
framework = "tauri"
stage = "unsigned"
target = "darwin/arm64"
input = "MyApp.app"
[finalize]
tool = "codesign"
args = ["--deep", "--force", "--sign", "-", "MyApp.app"]
"""


def parse(text: str, sidecar: str | None = None) -> Manifest:
    return parse_manifest(text, PATH, sidecar=sidecar)


def error(text: str, sidecar: str | None = None) -> AtoError:
    with pytest.raises(AtoError) as info:
        parse(text, sidecar)
    assert "\n" not in info.value.message
    return info.value


def test_app_entrypoint_derives_the_poc_defaults() -> None:
    m = parse(APP)
    assert m.is_native()
    d = m.delivery
    assert d == DeliveryMeta("0.1", "tauri", "unsigned", "darwin/arm64", "MyApp.app", "codesign",
                             ("--deep", "--force", "--sign", "-", "MyApp.app"))
    assert d.origin == "derived" and (d.os, d.arch) == ("darwin", "arm64")
    assert d.to_toml_dict() == {
        "schema_version": "0.1",
        "artifact": {"framework": "tauri", "input": "MyApp.app", "stage": "unsigned", "target": "darwin/arm64"},
        "finalize": {"args": ["--deep", "--force", "--sign", "-", "MyApp.app"], "tool": "codesign"},
    }
    tomli_w.dumps(d.to_toml_dict())  # serializable as the staged ato.delivery.toml


def test_appimage_entrypoint_derives_a_linux_contract_with_ato_sign() -> None:
    m = parse(APP.replace("MyApp.app", "dist/MyApp.AppImage"))
    assert m.delivery.target == f"linux/{host_arch()}"
    assert (m.delivery.finalize_tool, m.delivery.finalize_args) == ("ato-sign", ("dist/MyApp.AppImage",))


def test_exe_entrypoint_derives_a_signtool_contract() -> None:
    m = parse(APP.replace("MyApp.app", "dist/MyApp.exe"))
    assert m.delivery.target.startswith("windows/")
    assert m.delivery.finalize_args == ("sign", "/fd", "SHA256", "dist/MyApp.exe")


def test_plain_native_program_has_no_delivery_contract() -> None:
    m = parse(APP.replace("MyApp.app", "run.sh"))
    assert m.is_native() and m.delivery is None


def test_non_native_targets_have_no_delivery() -> None:
    m = parse(APP.replace('driver = "native"', 'driver = "python"').replace("MyApp.app", "main.py"))
    assert not m.is_native() and m.delivery is None


def test_command_mode_without_metadata_is_not_a_delivery_build() -> None:
    assert parse(COMMAND).delivery is None


def test_command_mode_with_inline_tables() -> None:
    m = parse(COMMAND + INLINE_LINUX)
    assert m.delivery == DeliveryMeta("0.1", "tauri", "unsigned", "linux/x86_64", "dist/my-app", "ato-sign",
                                      ("dist/my-app",))
    assert m.delivery.origin == "inline"


def test_linux_finalize_defaults_to_ato_sign_with_the_input() -> None:
    text = COMMAND + '\n[artifact]\nframework = "tauri"\ntarget = "linux/aarch64"\ninput = "./dist//my-app/"\n\n[finalize]\n'
    d = parse(text).delivery
    assert (d.target, d.input, d.stage) == ("linux/arm64", "dist/my-app", "unsigned")
    assert (d.finalize_tool, d.finalize_args) == ("ato-sign", ("dist/my-app",))


def test_target_aliases_are_normalized() -> None:
    text = (COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"macOS/aarch64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "codesign"\nargs = ["--force", "--sign", "-", "dist/my-app"]')
    assert parse(text).delivery.target == "darwin/arm64"


INLINE_ERRORS = [
    (COMMAND + INLINE_LINUX.split("[finalize]")[0], "E002",
     "capsule.toml: finalize: [artifact] is declared without [finalize]; native delivery metadata needs both tables "
     "or neither"),
    (COMMAND + "\n[finalize]" + INLINE_LINUX.split("[finalize]")[1], "E002",
     "capsule.toml: artifact: [finalize] is declared without [artifact]; native delivery metadata needs both tables "
     "or neither"),
    ((COMMAND + INLINE_LINUX).replace('driver = "native"', 'driver = "python"').replace('entrypoint = "sh"', 'entrypoint = "a.py"'),
     "E002", 'capsule.toml: artifact: [artifact]/[finalize] describe native delivery; targets.desktop.driver must be '
             '"native"'),
    ((COMMAND + INLINE_LINUX).replace('input = "dist/my-app"', 'input = "../my-app"'), "E002",
     "capsule.toml: artifact.input: \"../my-app\" must not contain '..' (it would escape the project)"),
    ((COMMAND + INLINE_LINUX).replace('input = "dist/my-app"', 'input = "/opt/my-app"'), "E002",
     'capsule.toml: artifact.input: "/opt/my-app" must be a relative path inside the project, not an absolute path'),
    ((COMMAND + INLINE_LINUX).replace('input = "dist/my-app"\n', ""), "E003",
     "capsule.toml: artifact.input: required key is missing"),
    ((COMMAND + INLINE_LINUX).replace('stage = "unsigned"', 'stage = "signed"'), "E002",
     'capsule.toml: artifact.stage: expected "unsigned", got string "signed"'),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"solaris/x86_64"'), "E002",
     'capsule.toml: artifact.target: expected darwin|linux|windows with arm64|x86_64, got string "solaris/x86_64"'),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"linux"'), "E002",
     'capsule.toml: artifact.target: expected "<os>/<arch>" (e.g. "linux/x86_64"), got string "linux"'),
    ((COMMAND + INLINE_LINUX).replace('args = ["dist/my-app"]', 'args = ["other"]'), "E002",
     "capsule.toml: finalize.args: expected the artifact input \"dist/my-app\" among the ato-sign arguments"),
    ((COMMAND + INLINE_LINUX).replace('args = ["dist/my-app"]', 'args = ["dist/my-app", " "]'), "E002",
     "capsule.toml: finalize.args[1]: expected a non-empty argument"),
    ((COMMAND + INLINE_LINUX).replace('tool = "ato-sign"', 'tool = "/usr/bin/ato-sign"'), "E002",
     'capsule.toml: finalize.tool: expected a bare tool name (no path, spaces or control characters), got string '
     '"/usr/bin/ato-sign"'),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"darwin/arm64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "codesign"\nargs = ["--deep", "--rm", "dist/my-app"]'),
     "E002", "capsule.toml: finalize.args[1]: \"--rm\" is not an allowed codesign argument (allowed: --deep, "
             "--entitlements, --force, --identifier, --options, --prefix, --requirements, --sign, --strict, "
             "--timestamp, --verbose, and the artifact input)"),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"darwin/arm64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "codesign"\nargs = ["--sign", "dist/my-app"]'),
     "E002", "capsule.toml: finalize.args: expected the artifact input \"dist/my-app\" among the codesign arguments"),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"darwin/arm64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "codesign"\nargs = ["dist/my-app", "--sign"]'),
     "E002", "capsule.toml: finalize.args[1]: expected a value after \"--sign\""),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"windows/x86_64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "signtool"\nargs = ["verify", "dist/my-app"]'),
     "E002", 'capsule.toml: finalize.args[0]: expected the signtool subcommand "sign"'),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"windows/x86_64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]', 'tool = "signtool"\nargs = ["sign", "/bogus", "dist/my-app"]'),
     "E002", "capsule.toml: finalize.args[1]: \"/bogus\" is not an allowed signtool argument"),
    ((COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"darwin/arm64"').replace('tool = "ato-sign"\n', ""), "E003",
     "capsule.toml: finalize.tool: required key is missing"),
    ((COMMAND + INLINE_LINUX).replace('framework = "tauri"', "framework = 1"), "E002",
     "capsule.toml: artifact.framework: expected a string, got integer 1"),
    ((COMMAND + INLINE_LINUX).replace('framework = "tauri"', 'framework = "tauri"\nsigned = true'), "E002",
     "capsule.toml: artifact.signed: unknown key (expected one of: framework, input, stage, target)"),
    (APP + INLINE_LINUX, "E002",
     'capsule.toml: artifact.target: "linux/x86_64" does not match the contract derived from entrypoint '
     '"MyApp.app" ("darwin/arm64")'),
]


@pytest.mark.parametrize(("text", "code", "message"), INLINE_ERRORS, ids=[str(i) for i in range(len(INLINE_ERRORS))])
def test_inline_metadata_errors(text: str, code: str, message: str) -> None:
    err = error(text)
    assert (err.code, err.message) == (code, message)


def test_signtool_with_timestamp_server_is_accepted() -> None:
    text = (COMMAND + INLINE_LINUX).replace('"linux/x86_64"', '"windows/x86_64"').replace(
        'tool = "ato-sign"\nargs = ["dist/my-app"]',
        'tool = "signtool"\nargs = ["sign", "/fd", "SHA256", "/tr", "http://ts", "/td", "SHA256", "dist/my-app"]')
    assert parse(text).delivery.finalize_tool == "signtool"


def test_inline_tables_equal_to_the_app_defaults_are_accepted() -> None:
    inline = "\n" + APP_SIDECAR.replace('schema_version = "0.1"\n', "")
    m = parse(APP + inline)
    assert m.delivery == parse(APP).delivery and m.delivery.origin == "inline"


# --- the ato.delivery.toml sidecar --------------------------------------------------------------------


def test_matching_sidecar_is_accepted_and_capsule_toml_stays_the_source() -> None:
    m = parse(APP, sidecar=APP_SIDECAR)
    assert m.delivery == parse(APP).delivery and m.delivery.origin == "derived"
    legacy = APP_SIDECAR.replace('"0.1"', '"exp-0.1"')
    assert parse(APP, sidecar=legacy).delivery == m.delivery


def test_sidecar_alone_supplies_command_mode_metadata() -> None:
    sidecar = 'schema_version = "0.1"\n' + INLINE_LINUX
    m = parse(COMMAND, sidecar=sidecar)
    assert m.delivery == parse(COMMAND + INLINE_LINUX).delivery and m.delivery.origin == "sidecar"


SIDECAR_ERRORS = [
    (APP, APP_SIDECAR.replace('"darwin/arm64"', '"linux/arm64"'), "E002",
     'ato.delivery.toml: artifact.target: "linux/arm64" does not match the capsule.toml native target contract '
     '("darwin/arm64")'),
    (APP, APP_SIDECAR.replace('"--deep", ', ""), "E002",
     'ato.delivery.toml: finalize.args: ["--force", "--sign", "-", "MyApp.app"] does not match the capsule.toml '
     'native target contract (["--deep", "--force", "--sign", "-", "MyApp.app"])'),
    (COMMAND + INLINE_LINUX, 'schema_version = "0.1"\n' + INLINE_LINUX.replace('"dist/my-app"', '"dist/other"'), "E002",
     'ato.delivery.toml: artifact.input: "dist/other" does not match the capsule.toml native target contract '
     '("dist/my-app")'),
    (APP, APP_SIDECAR.replace('"0.1"', '"0.2"'), "E002",
     'ato.delivery.toml: schema_version: expected "0.1" (or legacy "exp-0.1"), got string "0.2"'),
    (APP, APP_SIDECAR.split("[finalize]")[0], "E003", "ato.delivery.toml: finalize: required table is missing"),
    (APP, APP_SIDECAR.replace('framework = "tauri"\n', ""), "E003",
     "ato.delivery.toml: artifact.framework: required key is missing"),
    (APP, "schema_version = \n", "E001", "ato.delivery.toml: line 1, column 18: invalid TOML: Invalid value"),
    (APP.replace('driver = "native"', 'driver = "python"').replace("MyApp.app", "main.py"), APP_SIDECAR, "E002",
     'ato.delivery.toml: native delivery metadata, but the capsule.toml target "desktop" is not driver "native"; '
     "remove the sidecar"),
]


@pytest.mark.parametrize(("text", "sidecar", "code", "message"), SIDECAR_ERRORS,
                         ids=[str(i) for i in range(len(SIDECAR_ERRORS))])
def test_sidecar_errors_name_the_differing_key(text: str, sidecar: str, code: str, message: str) -> None:
    err = error(text, sidecar)
    assert (err.code, err.message) == (code, message)


def test_load_manifest_reads_the_sidecar_next_to_capsule_toml(tmp_path: Path) -> None:
    (tmp_path / "capsule.toml").write_text(APP)
    (tmp_path / "ato.delivery.toml").write_text(APP_SIDECAR.replace('"darwin/arm64"', '"windows/arm64"'))
    with pytest.raises(AtoError) as info:
        load_manifest(tmp_path)
    assert info.value.code == "E002" and info.value.message.startswith("ato.delivery.toml: artifact.target:")
    (tmp_path / "ato.delivery.toml").write_text(APP_SIDECAR)
    assert load_manifest(tmp_path).delivery.target == "darwin/arm64"


def test_staged_delivery_file_round_trips() -> None:
    d = parse(COMMAND + INLINE_LINUX).delivery
    again = DeliveryMeta.from_toml_dict(d.to_toml_dict())
    assert again == d and again.origin == "artifact"


def test_v11_execution_can_be_native() -> None:
    text = """\
schema_version = "1.1"
name = "my-app"
version = "0.1.0"
type = "app"

[execution]
runtime = "source"
driver = "native"
entrypoint = "MyApp.app"
"""
    m = parse(text)
    assert m.is_native() and m.delivery.target == "darwin/arm64"
