"""What this x86-64 CPU really executes, and what a ggml build was compiled to use.

Standard library only: the llama.cpp build script (tools/build_llama.py) imports
this before anything else is installed, and the engine imports it at start-up.

A feature counts as executable only if the kernel reports it in /proc/cpuinfo
(which it does only for state the OS saves) *and* one of its instructions runs
in a child process without SIGILL. The second half matters: virtual machines
report features (AMX tiles above all) whose state does not survive.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import platform
import re
import subprocess
import sys

# ggml's CMake option -> the cpuinfo flags it compiles for, and one instruction
# (machine code, then `ret`) that needs them. GGML_AVX512 adds -mavx512f/cd/vl/dq/bw.
FEATURES: dict[str, tuple[tuple[str, ...], bytes]] = {
    "SSE42": (("sse4_2",), bytes.fromhex("f20f38f1c0")),  # crc32 eax, eax
    "AVX": (("avx",), bytes.fromhex("c5f9efc0")),  # vpxor xmm0, xmm0, xmm0
    "AVX2": (("avx2",), bytes.fromhex("c5fdfec0")),  # vpaddd ymm0, ymm0, ymm0
    "FMA": (("fma",), bytes.fromhex("c4e279b8c0")),  # vfmadd231ps xmm0, xmm0, xmm0
    "F16C": (("f16c",), bytes.fromhex("c4e27913c0")),  # vcvtph2ps xmm0, xmm0
    "BMI2": (("bmi2",), bytes.fromhex("c4e27bf5c0")),  # pdep eax, eax, eax
    "AVX_VNNI": (("avx_vnni",), bytes.fromhex("c4e27d50c0")),  # {vex} vpdpbusd ymm0
    "AVX512": (
        ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
        # vpxord zmm0; vplzcntd zmm0; vpxord ymm16 (VL); vpmullq zmm0 (DQ); vpaddb zmm0 (BW)
        bytes.fromhex("62f17d48efc062f27d4844c062a17d20efc062f2fd4840c062f17d48fcc0"),
    ),
    "AVX512_VBMI": (("avx512vbmi",), bytes.fromhex("62f27d488dc0")),  # vpermb zmm0
    "AVX512_VNNI": (("avx512_vnni",), bytes.fromhex("62f27d4850c0")),  # vpdpbusd zmm0
    "AVX512_BF16": (("avx512_bf16",), bytes.fromhex("62f27e4852c0")),  # vdpbf16ps zmm0
    "AMX": (("amx_tile", "amx_int8"), bytes.fromhex("c4e27849c0")),  # tilerelease
}

# Never compiled, whatever the CPU says: AMX kernels fault on machines that
# report the feature but do not keep the tile state (llama.cpp #28328, #28756),
# and a tiny model gains nothing from them.
NEVER = frozenset({"AMX"})

# Features in llama.cpp's system-info string -> our names above.
_SYSTEM_INFO_NAMES = {
    "SSE3": None,
    "SSSE3": None,
    "AVX": "AVX",
    "AVX_VNNI": "AVX_VNNI",
    "AVX2": "AVX2",
    "F16C": "F16C",
    "FMA": "FMA",
    "BMI2": "BMI2",
    "AVX512": "AVX512",
    "AVX512_VBMI": "AVX512_VBMI",
    "AVX512_VNNI": "AVX512_VNNI",
    "AVX512_BF16": "AVX512_BF16",
    "AMX_INT8": "AMX",
}


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _run_code(code: bytes) -> None:  # pragma: no cover - runs in a child process
    import ctypes

    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code + b"\xc3")  # ret
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if "AMX" in sys.argv[2:]:
        # Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM = 0x1023,
        # XFEATURE_XTILEDATA = 18), as ggml does before using it.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(158, 0x1023, 18) != 0:
            sys.exit(3)
    ctypes.CFUNCTYPE(None)(address)()


def executes(feature: str, timeout: float = 20.0) -> bool:
    """Run one instruction of `feature` in a child process; False on SIGILL or any failure."""
    _, code = FEATURES[feature]
    probe = (
        f"import sys; from tokenwell.cpu import _run_code; _run_code(bytes.fromhex({code.hex()!r}))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH")) if p
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe, "--", feature],
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def executable_features(flags: frozenset[str] | None = None) -> frozenset[str]:
    """Every feature above that the kernel reports and that really runs here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    flags = cpuinfo_flags() if flags is None else flags
    reported = [name for name, (needs, _) in FEATURES.items() if set(needs) <= flags]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        ran = list(pool.map(executes, reported))
    return frozenset(name for name, ok in zip(reported, ran, strict=True) if ok)


def build_features(executable: frozenset[str]) -> frozenset[str]:
    """What the project's llama.cpp build compiles for on a CPU that executes `executable`.

    Every SIMD extension that runs here (AVX-512 and its extensions included),
    none that does not, and AMX never.
    """
    return frozenset(f for f in executable if f not in NEVER)


def cmake_args(features: frozenset[str]) -> list[str]:
    args = ["-DGGML_NATIVE=OFF"]
    for name in FEATURES:
        cmake_names = ["AMX_TILE", "AMX_INT8", "AMX_BF16"] if name == "AMX" else [name]
        on = "ON" if name in features else "OFF"
        args += [f"-DGGML_{n}={on}" for n in cmake_names]
    return args


def compiled_features(system_info: str) -> frozenset[str]:
    """Parse llama.cpp's `llama_print_system_info()`: which CPU features the build uses."""
    found = set()
    for key, value in re.findall(r"\b([A-Z0-9_]+) = (\d+)", system_info):
        ours = _SYSTEM_INFO_NAMES.get(key)
        if ours and value != "0":
            found.add(ours)
    return frozenset(found)


class UnsupportedCpu(RuntimeError):
    """The llama.cpp build uses instructions this CPU (or its OS) does not execute."""


def check_build(system_info: str, executable: frozenset[str] | None = None) -> None:
    """Raise UnsupportedCpu, naming the features and the fix, if the build cannot run here."""
    compiled = compiled_features(system_info)
    if executable is None:
        executable = executable_features()
    missing = sorted((compiled - executable) | (compiled & NEVER))
    if missing:
        raise UnsupportedCpu(
            "the installed llama.cpp build uses "
            + ", ".join(missing)
            + " instructions that this CPU or its OS does not execute"
            + (
                " (AMX is never safe to use: it faults on machines that report it)"
                if "AMX" in missing
                else ""
            )
            + ". It was built for another machine or with other flags. "
            "Rebuild it for this machine: `./dev serve` (or `python3 tools/build_llama.py "
            "--python .venv/bin/python --force`) builds the project's portable configuration."
        )


def describe() -> str:
    """One line for logs: what runs here."""
    feats = executable_features()
    return ", ".join(sorted(feats)) if feats else "no SIMD features probed"


if __name__ == "__main__":  # pragma: no cover - a command-line convenience
    ex = executable_features()
    print("executes:", " ".join(sorted(ex)))
    print("builds:", " ".join(cmake_args(build_features(ex))))
    sys.exit(0)
