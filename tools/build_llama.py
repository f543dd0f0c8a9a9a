"""Build and install llama-cpp-python for this machine, in the project's own configuration.

    python tools/build_llama.py --python .venv/bin/python [--force] [--show]

pip's default build of llama-cpp-python is native (-march=native): ggml then
compiles every kernel the build machine reports, AMX tiles included, and the
wheel dies with SIGILL on a machine that lacks them (or that reports AMX but
does not keep its state). pip's wheel cache keys wheels by version, not by
flags, so such a wheel comes back silently. Here instead:

- the flags are ours: GGML_NATIVE=OFF, every SIMD extension that one of its
  instructions *really runs* on this CPU (tokenwell/cpu.py), AMX never, and no
  multimodal library (LLAVA_BUILD=OFF: smaller and faster to build);
- the wheel is kept under a directory named by a hash of the version and the
  flags (never in pip's cache), so a build for other flags is never reused;
- the venv records which build it holds; a venv whose build does not match
  this machine (copied from another host, installed by hand) is reinstalled.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tokenwell import cpu  # noqa: E402  (stdlib-only module, importable before install)

STAMP = "tokenwell-llama-build.json"
EXTRA_CMAKE = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]


def pinned_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"llama-cpp-python==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(1)
    raise SystemExit("pyproject.toml must pin llama-cpp-python==X.Y.Z")


def configuration() -> dict:
    features = cpu.build_features(cpu.executable_features())
    args = cpu.cmake_args(features) + EXTRA_CMAKE
    version = pinned_version()
    build_id = hashlib.sha256(json.dumps([version, args]).encode()).hexdigest()[:16]
    return {
        "version": version,
        "build_id": build_id,
        "features": sorted(features),
        "cmake_args": args,
    }


def wheel_dir(config: dict) -> Path:
    base = os.environ.get("TOKENWELL_WHEEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenwell", "wheels"
    )
    return Path(base) / f"llama-cpp-python-{config['version']}-{config['build_id']}"


def site_packages(python: str) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def installed_build(python: str) -> dict | None:
    try:
        return json.loads((site_packages(python) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def log(msg: str) -> None:
    print(f"[llama.cpp build] {msg}", file=sys.stderr, flush=True)


def build_wheel(python: str, config: dict, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    partial = target / "partial"
    partial.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(config["cmake_args"])
    env["FORCE_CMAKE"] = "1"
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [
        python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
        "--no-binary", "llama-cpp-python", "-v",
        f"llama-cpp-python=={config['version']}", "-w", str(partial),
    ]  # fmt: skip
    log(
        f"compiling llama-cpp-python {config['version']} for this CPU "
        f"({', '.join(config['features']) or 'baseline x86-64'}; AMX off, no multimodal)"
    )
    log("this takes 3-8 minutes on 2 cores, once per machine and flag set; progress follows")
    start = time.monotonic()
    last_pct = -1
    log_path = target / "build.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            # ninja prints "[12/140] ...", make "[ 8%] ..."
            m = re.search(r"\[\s*(\d+)/(\d+)\]|\[\s*(\d+)%\]", line)
            if m:
                pct = int(m.group(3) or 100 * int(m.group(1)) // max(int(m.group(2)), 1))
                if pct >= last_pct + 10:
                    last_pct = pct
                    log(f"{pct:3d}% compiled after {time.monotonic() - start:4.0f} s")
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise SystemExit(
            "\n".join(tail) + f"\nllama-cpp-python failed to build (exit {rc}); "
            f"full log: {log_path}. It needs a C/C++ compiler and cmake."
        )
    wheels = list(partial.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {partial}, found {wheels}")
    final = target / wheels[0].name
    wheels[0].replace(final)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    log(f"built in {time.monotonic() - start:.0f} s: {final}")
    return final


def install(python: str, config: dict, wheel: Path) -> None:
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
         "--no-index", str(wheel)],
        check=True,
    )  # fmt: skip
    (site_packages(python) / STAMP).write_text(json.dumps(config, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="the venv's python")
    ap.add_argument("--force", action="store_true", help="rebuild even if a wheel is kept")
    ap.add_argument("--show", action="store_true", help="print the configuration and exit")
    opts = ap.parse_args()

    config = configuration()
    if opts.show:
        print(json.dumps({**config, "wheel_dir": str(wheel_dir(config))}, indent=2))
        return 0
    if not opts.force and installed_build(opts.python) == config:
        return 0
    target = wheel_dir(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per machine: a second `./dev` started meanwhile waits for
    # the first one's wheel instead of compiling it again beside it (and racing it).
    with open(target.parent / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another setup is building llama.cpp; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not opts.force and installed_build(opts.python) == config:
            return 0
        kept = sorted(target.glob("llama_cpp_python-*.whl"))
        wheel = kept[0] if kept and not opts.force else build_wheel(opts.python, config, target)
        log(f"installing {wheel.name} (build {config['build_id']})")
        install(opts.python, config, wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
