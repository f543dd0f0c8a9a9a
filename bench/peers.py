"""Set up the peers the benchmarks compare against (never committed).

- llama.cpp's ``llama-server``, built from the ``vendor/llama.cpp`` sources
  that the llama-cpp-python sdist carries (the same llama.cpp tokenwell runs),
  into ``bench/.build/``.
- ``python -m llama_cpp.server``: llama-cpp-python's own server (its
  ``[server]`` extra, installed into the benchmark's virtualenv).
- the LiteLLM proxy (``litellm[proxy]``), for the gateway benchmark.
- a *native* llama-cpp-python (``-march=native``, pip's default build) in a
  folder of its own, put ahead of tokenwell's portable build on PYTHONPATH:
  what the portable build is compared with (never installed into .venv).

llama-server is built with the same ggml flags as tokenwell's own build
(tools/build_llama.py), so the two compare serving, not compilers.

    python -m bench.peers llama-server | llama-cpp-server | litellm | native
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path

BUILD = Path(__file__).resolve().parent / ".build"


def venv(name: str, *requirements: str) -> Path:
    """A virtualenv of the peer's own: its pins never touch tokenwell's environment."""
    home = BUILD / f"venv-{name}"
    python = home / "bin" / "python"
    stamp = home / ".requirements"
    wanted = "\n".join(requirements)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
        stamp.write_text(wanted)
    return python


def _project_flags() -> tuple[list[str], str]:
    """tokenwell's own ggml flags for this machine and their build id."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import build_llama

    config = build_llama.configuration()
    return [a for a in config["cmake_args"] if a.startswith("-DGGML_")], config["build_id"]


def llama_server() -> Path:
    flags, build_id = _project_flags()
    build_dir = BUILD / "llama.cpp" / f"build-{build_id}"
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    version = importlib.metadata.version("llama-cpp-python")
    BUILD.mkdir(parents=True, exist_ok=True)
    sdist_dir = BUILD / "sdist"
    sdist = next(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"), None)
    if sdist is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(sdist_dir),
            ],
            check=True,
        )
        sdist = next(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    source = BUILD / "llama.cpp"
    if not source.exists():
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    jobs = str(os.cpu_count() or 1)
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build_dir),
            *flags,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_OPENSSL=OFF",
        ],
        check=True,
    )
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
        check=True,
    )
    return binary


def native_site() -> Path:
    """A folder holding llama-cpp-python built natively (-march=native, AMX as the CPU
    reports it): put it first on PYTHONPATH to run tokenwell on that build."""
    version = importlib.metadata.version("llama-cpp-python")
    site = BUILD / f"native-{version}"
    if (site / "llama_cpp" / "lib" / "libggml-cpu.so").exists():
        return site
    wheels = BUILD / f"native-wheel-{version}"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
            "--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}", "-w", str(wheels),
        ],
        env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"},
        check=True,
    )  # fmt: skip
    wheel = next(wheels.glob("llama_cpp_python-*.whl"))
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
            "--target", str(site), str(wheel),
        ],
        check=True,
    )  # fmt: skip
    return site


def llama_cpp_server() -> Path:
    """The python that runs ``-m llama_cpp.server``."""
    version = importlib.metadata.version("llama-cpp-python")
    return venv("llama-cpp-server", f"llama-cpp-python[server]=={version}")


def litellm() -> Path:
    """The ``litellm`` proxy command."""
    return venv("litellm", "litellm[proxy]").parent / "litellm"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("llama-server", "all"):
        print(llama_server())
    if what in ("llama-cpp-server", "all"):
        print(llama_cpp_server())
    if what in ("litellm", "all"):
        print(litellm())
    if what in ("native", "all"):
        print(native_site())
