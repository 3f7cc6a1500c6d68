"""The CPU peak behind MFU (train/hardware.py): derived from the CPU's description."""
import pytest

from train.hardware import cpu_peak_flops, parse_cpuinfo


def cpuinfo(vendor, family, flags, mhz="2600.000", siblings=2, cores=2, model="X", number=49):
    return (f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {number}\nmodel name\t: {model}\n"
            f"cpu MHz\t\t: {mhz}\nsiblings\t: {siblings}\ncpu cores\t: {cores}\nflags\t\t: {flags}\n")


@pytest.mark.parametrize("vendor,family,flags,dtype,per_cycle", [
    ("AuthenticAMD", 23, "fma avx2", "float32", 32),                       # Zen 2 (model 49)
    ("AuthenticAMD", 25, "fma avx2", "float32", 32),                       # Zen 3
    ("AuthenticAMD", 25, "fma avx2 avx512f avx512_bf16", "float32", 32),   # Zen 4: 2 x 256-bit
    ("AuthenticAMD", 25, "fma avx2 avx512f avx512_bf16", "bfloat16", 64),
    ("AuthenticAMD", 26, "fma avx2 avx512f", "float32", 64),               # Zen 5
    ("GenuineIntel", 6, "fma avx2 avx512f", "float32", 64),
    ("GenuineIntel", 6, "fma avx2 avx512f avx512_bf16 amx_bf16", "bfloat16", 2048),
    ("GenuineIntel", 6, "fma avx2", "bfloat16", 32),                       # no bf16 units
    ("GenuineIntel", 6, "sse2", "float32", 8),
])
def test_peak_is_cores_times_clock_times_width(vendor, family, flags, dtype, per_cycle):
    info = parse_cpuinfo(cpuinfo(vendor, family, flags), cpus=2)
    peak, how = cpu_peak_flops(dtype, info)
    assert peak == pytest.approx(2 * 2.6e9 * per_cycle)
    assert f"{per_cycle} FLOPs/cycle" in how and "2 cores" in how


def test_zen1_has_128_bit_pipes():
    info = parse_cpuinfo(cpuinfo("AuthenticAMD", 23, "fma avx2", number=1), cpus=2)
    assert cpu_peak_flops("float32", info)[0] == pytest.approx(2 * 2.6e9 * 16)


def test_smt_threads_share_a_core_and_lscpu_max_clock_wins():
    # 4 logical CPUs, 2 threads per core -> 2 cores; lscpu's max clock over cpuinfo's current one
    info = parse_cpuinfo(cpuinfo("GenuineIntel", 6, "fma avx2", mhz="1200.0", siblings=4, cores=2),
                         cpus=4, lscpu="Thread(s) per core:  2\nCPU max MHz:  3000.0000\n")
    assert (info.cores, info.mhz, info.mhz_source) == (2, 3000.0, "lscpu max")
    assert cpu_peak_flops("float32", info)[0] == pytest.approx(2 * 3e9 * 32)


def test_no_clock_is_an_error_not_a_guess():
    info = parse_cpuinfo(cpuinfo("GenuineIntel", 6, "avx2", mhz="0"), cpus=2)
    with pytest.raises(RuntimeError, match="CPU peak"):
        cpu_peak_flops("float32", info)


def test_host_allocator_is_tuned_or_says_why_not(monkeypatch):
    from train import hardware
    monkeypatch.setenv("CHIMERA_HOST_ALLOCATOR", "default")
    assert hardware.tune_host_allocator() == hardware.HOST_ALLOCATOR
    assert "CHIMERA_HOST_ALLOCATOR=default" in hardware.HOST_ALLOCATOR
    monkeypatch.delenv("CHIMERA_HOST_ALLOCATOR")
    assert hardware.tune_host_allocator().startswith(("glibc tuned", "system default (not glibc"))
