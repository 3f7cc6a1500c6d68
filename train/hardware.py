"""What the CPU can do: its description and its peak FLOP/s, derived from /proc/cpuinfo.

MFU on CPU is tokens/s x FLOPs/token over the hardware's peak, never over a measured matmul:
a measurement taken at start-up on a shared machine is as slow as the moment it was taken, and
MFU then says more about the neighbours than about the model. The peak is

    physical cores x clock x FLOPs per cycle per core,
    FLOPs per cycle = FMA pipes x lanes per pipe x 2 (an FMA is a multiply and an add)

with the pipes and their width by vendor and vector extension (the figures of the vendors'
optimisation manuals; the table is `_fp32_per_cycle`):

    Intel, AVX-512:     2 x 512-bit FMA pipes -> 2 x 16 x 2 = 64 fp32 FLOPs/cycle
                        (Xeon Gold / Platinum and later; some Silver / Bronze parts have one)
    AMD Zen 1 (fam 23, model < 0x30): 2 x 128-bit pipes -> 16
    AMD Zen 2-4:        2 x 256-bit pipes (Zen 4 runs AVX-512 on them in two halves) -> 32
    AMD Zen 5 (fam 26): 2 x 512-bit pipes -> 64
    any other AVX2+FMA: 2 x 256-bit -> 32;  SSE only: 2 x 128-bit multiply + add -> 8

bf16: AVX512_BF16's dot product (vdpbf16ps) does twice fp32's FLOPs per instruction; AMX
(amx_bf16, Intel Sapphire Rapids on) does 1024 bf16 multiply-adds per cycle per core. Without
either, bf16 runs at fp32's rate (converted). The clock is "CPU max MHz" from lscpu where the
kernel knows it, else /proc/cpuinfo's "cpu MHz" (in a VM the nominal clock; turbo can exceed
it, so MFU can read a little high). SMT threads share their core's pipes: cores are counted as
the CPUs this process may use divided by the threads per core.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str          # "AMD EPYC 9B14", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    vendor: str         # "AuthenticAMD", "GenuineIntel", ""
    family: int         # the x86 family (AMD 23 = Zen 1/2, 25 = Zen 3/4, 26 = Zen 5); 0 if unknown
    model_number: int   # the x86 model within the family; 0 if unknown
    flags: frozenset    # cpuinfo flags
    cpus: int           # logical CPUs this process may run on
    threads_per_core: int
    mhz: float          # the clock used for the peak
    mhz_source: str     # "lscpu max" or "cpuinfo"

    @property
    def cores(self) -> int:
        return max(1, self.cpus // max(1, self.threads_per_core))

    @property
    def isa(self) -> str:
        """The vector extensions that decide the peak, e.g. "AVX-512, AVX512_BF16, AMX"."""
        f = self.flags
        out = ["AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else "no AVX2"]
        out += [name for flag, name in (("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX")) if flag in f]
        return ", ".join(out)

    def describe(self) -> str:
        fam = f"family {self.family} model {self.model_number}; " if self.family else ""
        return (f"{self.model} ({fam}{self.isa}; {self.cpus} CPUs, {self.cores} cores; "
                f"{self.mhz / 1e3:.2f} GHz {self.mhz_source})")


def _field(text: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def parse_cpuinfo(cpuinfo: str, cpus: int, lscpu: str = "") -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (and optionally `lscpu`'s output)."""
    flags = frozenset((_field(cpuinfo, "flags") or "").split())
    siblings, cores = _field(cpuinfo, "siblings"), _field(cpuinfo, "cpu cores")
    tpc = _field(lscpu, "Thread(s) per core")
    if tpc is None and siblings and cores and int(cores):
        tpc = str(max(1, int(siblings) // int(cores)))
    max_mhz = _field(lscpu, "CPU max MHz")
    if max_mhz:
        mhz, src = float(max_mhz), "lscpu max"
    else:
        mhz, src = float(_field(cpuinfo, "cpu MHz") or 0.0), "cpuinfo"
    return CpuInfo(model=_field(cpuinfo, "model name") or platform.processor() or platform.machine(),
                   vendor=_field(cpuinfo, "vendor_id") or "", family=int(_field(cpuinfo, "cpu family") or 0),
                   model_number=int(_field(cpuinfo, "model") or 0),
                   flags=flags, cpus=cpus, threads_per_core=int(tpc or 1), mhz=mhz, mhz_source=src)


def cpu_info() -> CpuInfo | None:
    """This machine's CpuInfo, or None where /proc/cpuinfo does not exist (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return parse_cpuinfo(text, cpus, lscpu)


def _fp32_per_cycle(info: CpuInfo) -> tuple[int, str]:
    """(fp32 FLOPs per cycle per core, the pipes that give it)."""
    f = info.flags
    if info.vendor == "AuthenticAMD" and info.family >= 26 and "avx512f" in f:
        return 64, "2 x 512-bit FMA pipes (AMD Zen 5)"
    if info.vendor == "AuthenticAMD" and info.family == 23 and info.model_number < 0x30:
        return 16, "2 x 128-bit FMA pipes (AMD Zen 1)"
    if info.vendor == "AuthenticAMD" and ("avx2" in f or "avx512f" in f):
        return 32, "2 x 256-bit FMA pipes (AMD Zen 2-4; AVX-512 runs in two halves)"
    if "avx512f" in f:
        return 64, "2 x 512-bit FMA pipes (Intel AVX-512)"
    if "avx2" in f and "fma" in f:
        return 32, "2 x 256-bit FMA pipes (AVX2)"
    return 8, "SSE: 128-bit multiply + add"


def flops_per_cycle(info: CpuInfo, dtype: str) -> tuple[int, str]:
    """(FLOPs per cycle per core for `dtype` ("float32" / "bfloat16"), how it is derived)."""
    fp32, how = _fp32_per_cycle(info)
    if dtype == "bfloat16":
        if "amx_bf16" in info.flags:
            return 2048, "AMX: 1024 bf16 multiply-adds per cycle"
        if "avx512_bf16" in info.flags:
            return 2 * fp32, f"AVX512_BF16 dot products: 2 x fp32's {fp32} ({how})"
        return fp32, f"no bf16 units, fp32's rate ({how})"
    return fp32, how


def cpu_peak_flops(dtype: str, info: CpuInfo | None = None) -> tuple[float, str]:
    """(peak FLOP/s of the CPUs this process may use, the derivation as one line). Raises
    RuntimeError when the CPU cannot be described (no /proc/cpuinfo or no clock)."""
    info = info or cpu_info()
    if info is None or info.mhz <= 0:
        raise RuntimeError("cannot derive the CPU peak: /proc/cpuinfo is missing or has no clock")
    per_cycle, how = flops_per_cycle(info, dtype)
    peak = info.cores * info.mhz * 1e6 * per_cycle
    return peak, (f"{dtype} hardware peak {peak / 1e9:.0f} GFLOP/s = {info.cores} cores x "
                  f"{info.mhz / 1e3:.2f} GHz ({info.mhz_source}) x {per_cycle} FLOPs/cycle [{how}]; "
                  f"{info.model}")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_ALLOCATOR = "system default (tune_host_allocator not called)"


def tune_host_allocator() -> str:
    """Make glibc keep freed memory for reuse instead of returning it to the OS; call it before
    jax starts its threads. Returns (and stores in HOST_ALLOCATOR) what was done.

    Why: XLA:CPU allocates each execution's temporaries as one block (about 300 MB for a
    3M-parameter model at B8 x T256) and frees it after the step. glibc serves blocks that large
    from a fresh mmap (always, from a non-main thread's arena), so every step page-faults all of
    it anew: 78k minor faults and 0.14-0.18 s of kernel time per step here, 15-20% of the step
    (benchmarks/README.md). One arena, no mmap and a high trim threshold make the freed block
    stay mapped and be reused by the next step, as a caching allocator would. The cost: the
    process keeps its peak heap. Off with CHIMERA_HOST_ALLOCATOR=default; a no-op off glibc.
    """
    global HOST_ALLOCATOR
    if os.environ.get("CHIMERA_HOST_ALLOCATOR", "") == "default":
        HOST_ALLOCATOR = "system default (CHIMERA_HOST_ALLOCATOR=default)"
        return HOST_ALLOCATOR
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                       (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    except (OSError, AttributeError):
        ok = False
    HOST_ALLOCATOR = ("glibc tuned: one arena, no mmap, trim threshold 2 GiB (freed step buffers are reused, "
                      "not page-faulted anew)" if ok else "system default (not glibc: mallopt unavailable)")
    return HOST_ALLOCATOR
