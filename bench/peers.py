"""Set up the peers the benchmarks compare against (never committed).

- llama.cpp's ``llama-server``, built from the ``vendor/llama.cpp`` sources
  that the llama-cpp-python sdist carries (the same llama.cpp tokenwell runs),
  into ``bench/.build/``.
- ``python -m llama_cpp.server``: llama-cpp-python's own server (its
  ``[server]`` extra, installed into the benchmark's virtualenv).
- the LiteLLM proxy (``litellm[proxy]``), for the gateway benchmark.

    python -m bench.peers llama-server | llama-cpp-server | litellm
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


def llama_server() -> Path:
    binary = BUILD / "llama.cpp" / "build" / "bin" / "llama-server"
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
            str(source / "build"),
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
        ["cmake", "--build", str(source / "build"), "--target", "llama-server", "-j", jobs],
        check=True,
    )
    return binary


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
