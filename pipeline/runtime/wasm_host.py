"""Run a WASI command module with wasmtime: ``python -m pipeline.runtime.wasm_host --module m.wasm -- args``.

The module sees stdio, its argv, the env it was given (never the host's) and the
project dir read-only at ``/``; nothing else. Its exit status is ours.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ato-wasm-host")
    parser.add_argument("--module", required=True)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--env-json", default="{}")
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args(argv)
    import wasmtime

    engine = wasmtime.Engine()
    try:
        module = wasmtime.Module.from_file(engine, ns.module)
    except (wasmtime.WasmtimeError, OSError) as exc:
        sys.stderr.write(f"error: cannot load wasm module {ns.module}: {exc}\n")
        return 126
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [ns.module.rsplit("/", 1)[-1], *ns.args]
    env = json.loads(ns.env_json)
    wasi.env = [[str(k), str(v)] for k, v in env.items()]
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    if ns.dir:
        wasi.preopen_dir(ns.dir, "/", fs_mutable=False)
    store.set_wasi(wasi)
    try:
        instance = linker.instantiate(store, module)
        start = instance.exports(store).get("_start")
        if start is None:
            sys.stderr.write("error: the module exports no _start (not a WASI command)\n")
            return 126
        start(store)
    except wasmtime.ExitTrap as exc:
        return exc.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        sys.stderr.write(f"error: wasm trap: {exc}\n")
        return 134
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main())
