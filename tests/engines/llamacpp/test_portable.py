"""The llama.cpp build runs on the CPU it is on: checked from the libraries themselves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from tests.support import ROOT
from tokenwell import cpu
from tokenwell.engines.llamacpp import selftest
from tokenwell.errors import EngineUnusable

# Instructions by the ISA extension they need, as objdump (AT&T syntax) prints them.
ISA_PATTERNS: dict[str, re.Pattern[str]] = {
    "AMX": re.compile(r"\b(tile(loadd\w*|stored|zero|release)|tdp\w+|(ld|st)tilecfg)\b"),
    # Any 512-bit register or opmask register is AVX-512 (EVEX).
    "AVX512": re.compile(r"%zmm\d|%k[1-7]\b"),
    "AVX512_BF16": re.compile(r"\b(vdpbf16ps|vcvtne2ps2bf16)\b"),
    "AVX512_VBMI": re.compile(r"\b(vpermb|vpermi2b|vpermt2b|vpmultishiftqb)\b"),
    "AVX512_VNNI": re.compile(r"(?<!\{vex\} )\bvpdp(busd|bussd|wssd|wssds)\b"),
    "AVX_VNNI": re.compile(r"\{vex\} vpdp(busd|bussd|wssd|wssds)\b"),
    "FMA": re.compile(r"\bvfn?m(add|sub)\w*"),
    "F16C": re.compile(r"\bvcvt(ph2ps|ps2ph)\b"),
    # 256-bit integer vector instructions are AVX2 (AVX has only float ones on ymm).
    "AVX2": re.compile(r"\bvp(add|sub|mull|madd|maddubs|and|or|xor|shuf|perm)\w*\s[^#]*%ymm"),
}


def isas_used(disassembly: str) -> dict[str, str]:
    """ISA extension -> the first instruction that needs it."""
    found: dict[str, str] = {}
    for line in disassembly.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        insn = parts[-1]
        for isa, pattern in ISA_PATTERNS.items():
            if isa not in found and pattern.search(insn):
                found[isa] = line.strip()
    return found


def disassemble(path: Path) -> str:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def engine_libraries() -> list[Path]:
    lib = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted(p for p in lib.glob("lib*.so") if p.is_file())
    assert any(p.name == "libggml-cpu.so" for p in libs), libs
    return libs


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils")


@needs_objdump
def test_the_scanner_finds_amx_and_avx512_instructions(tmp_path: Path) -> None:
    # The check below can fail: a native AMX build has exactly these instructions.
    source = tmp_path / "amx.s"
    source.write_text(
        ".intel_syntax noprefix\n"
        "tileloadd tmm0, [rax+rbx*1]\n"
        "tdpbssd tmm0, tmm1, tmm2\n"
        "vpdpbusd zmm0, zmm1, zmm2\n"
        "vdpbf16ps zmm0, zmm1, zmm2\n"
        "{vex} vpdpbusd ymm0, ymm1, ymm2\n"
        "vpaddd ymm0, ymm1, ymm2\n"
    )
    obj = tmp_path / "amx.o"
    subprocess.run(["as", str(source), "-o", str(obj)], check=True)
    found = isas_used(disassemble(obj))
    assert {"AMX", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AVX2"} <= found.keys()


@needs_objdump
def test_every_engine_library_runs_on_this_cpu() -> None:
    """No instruction of an extension this CPU (or its OS) does not execute; AMX never."""
    executable = cpu.executable_features()
    forbidden = (set(ISA_PATTERNS) - executable) | set(cpu.NEVER)
    for library in engine_libraries():
        used = isas_used(disassemble(library))
        bad = {isa: insn for isa, insn in used.items() if isa in forbidden}
        assert not bad, f"{library.name} uses instructions this CPU cannot run: {bad}"


def test_the_build_says_what_it_was_compiled_for_and_it_runs_here() -> None:
    info = selftest.system_info()
    compiled = cpu.compiled_features(info)
    assert "AVX2" in compiled or "AVX2" not in cpu.executable_features(), info
    assert "AMX" not in compiled
    assert compiled <= cpu.executable_features()
    cpu.check_build(info)  # does not raise


def test_a_build_with_amx_or_missing_features_is_refused_with_the_fix() -> None:
    native_amx = (
        "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
        "AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 |"
    )
    everything = frozenset(cpu.FEATURES)
    with pytest.raises(cpu.UnsupportedCpu, match=r"AMX.*Rebuild it for this machine"):
        cpu.check_build(native_amx, executable=everything)
    with pytest.raises(cpu.UnsupportedCpu, match=r"AVX512, AVX512_VNNI"):
        cpu.check_build(native_amx.replace("AMX_INT8 = 1", ""), executable=frozenset({"AVX2"}))
    cpu.check_build(native_amx.replace("AMX_INT8 = 1", ""), executable=everything)


def test_the_cpu_probe_runs_what_the_cpu_reports_and_refuses_the_rest() -> None:
    flags = cpu.cpuinfo_flags()
    if "amx_tile" not in flags:
        assert not cpu.executes("AMX")
    if "avx2" in flags:
        assert cpu.executes("AVX2")
    # An instruction that does not exist anywhere: the child dies of SIGILL, we say False.
    cpu.FEATURES["UD2"] = ((), bytes.fromhex("0f0b"))
    try:
        assert not cpu.executes("UD2")
    finally:
        del cpu.FEATURES["UD2"]


def test_build_flags_are_the_projects_own_and_installed_here() -> None:
    shown = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_llama.py"), "--show"],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(shown.stdout)
    args = config["cmake_args"]
    assert "-DGGML_NATIVE=OFF" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DLLAVA_BUILD=OFF" in args
    # The wheel is kept under a name that carries the flags' hash, never in pip's cache.
    assert config["build_id"] in config["wheel_dir"]
    # The venv running these tests holds exactly that build (./dev installed it).
    stamp = Path(llama_cpp.__file__).parent.parent / "tokenwell-llama-build.json"
    installed = json.loads(stamp.read_text())
    assert installed["build_id"] == config["build_id"], (installed, config)


def test_self_test_reports_an_illegal_instruction_with_cause_and_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenwell.engines.llamacpp.model import builtin_model_path

    monkeypatch.setenv("TOKENWELL_FAULTS", "selftest")
    with pytest.raises(EngineUnusable) as caught:
        selftest.verify(builtin_model_path(), timeout=120)
    message = str(caught.value)
    assert "SIGILL" in message
    assert "illegal instruction" in message
    assert "./dev serve" in message


def test_self_test_passes_on_this_machine() -> None:
    from tokenwell.engines.llamacpp.model import builtin_model_path

    selftest.verify(builtin_model_path(), timeout=120)
