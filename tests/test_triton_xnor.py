"""Triton XNOR-popcount GEMM, proven in the Triton interpreter against float ±1 products.

No GPU is used here: the kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors. Triton fixes
its interpreter mode when it is imported, so the interpreted launches run in one child process
(the environment of this process is left alone); inputs and references are made here.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.pack import BACKENDS, pack_signs  # noqa: E402
from lowbit.kernels.triton_xnor import (  # noqa: E402
    interpreter_active,
    triton_xnor_gemm,
)
from lowbit.kernels.xnor import uses_triton  # noqa: E402

_CHILD = """
import sys, torch
from lowbit.kernels.triton_xnor import interpreter_active, triton_xnor_gemm
assert interpreter_active(), "TRITON_INTERPRET=1 did not take effect"
cases = torch.load(sys.argv[1])
results = {}
for name, (a, b, k, popcount) in cases.items():
    results[name] = triton_xnor_gemm(a, b, k, popcount=popcount)
try:
    a, b, k, _ = cases["tiny_1x1x1"]
    triton_xnor_gemm(a, b, k, popcount="hardware")
    results["hardware_error"] = ""
except ValueError as err:
    results["hardware_error"] = str(err)
torch.save(results, sys.argv[2])
"""


def pm1(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random ±1 float32 [m, k] matrix."""
    return torch.randint(0, 2, (m, k), generator=gen).float() * 2 - 1


def packed_rows(x: torch.Tensor) -> torch.Tensor:
    """Packed sign words of the rows of x (pure-torch packing; empty x gives empty words)."""
    if x.numel() == 0:  # lowbit's pack_signs rejects empty tensors
        return torch.zeros(x.shape[0], (x.shape[1] + 63) // 64, dtype=torch.int64)
    return pack_signs(x, backend="torch").words


def random_words(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Arbitrary int64 words (every bit pattern, padding bits included) for rows of length k."""
    w = (k + 63) // 64
    return torch.randint(0, 256, (rows, w * 8), generator=gen, dtype=torch.uint8).view(torch.int64)


def python_reference(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """K - 2 * popcount((a ^ b) restricted to the first k bits), with Python integers."""
    w = a.shape[1]
    masks = [(1 << max(0, min(64, k - 64 * i))) - 1 for i in range(w)]
    rows_a = [[int(x) & 0xFFFFFFFFFFFFFFFF for x in row] for row in a.tolist()]
    rows_b = [[int(x) & 0xFFFFFFFFFFFFFFFF for x in row] for row in b.tolist()]
    out = [[k - 2 * sum(bin((x ^ y) & mk).count("1") for x, y, mk in zip(ra, rb, masks))
            for rb in rows_b] for ra in rows_a]
    return torch.tensor(out, dtype=torch.int32).reshape(len(rows_a), len(rows_b))


def _sign_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """±1 matrices a [M, K], b [K, N]: tiny, word and block edges, and random sizes."""
    gen = torch.Generator().manual_seed(1234)
    sizes = {
        "tiny_1x1x1": (1, 1, 1),
        "k63": (1, 63, 2),
        "k64": (2, 64, 3),
        "k65": (3, 65, 1),
        "k0": (2, 0, 3),
        "m0": (0, 10, 4),
        "n0": (4, 10, 0),
        "block_w_edge": (5, 4 * 64 + 1, 6),  # one bit into the second 4-word reduction step
        "block_mn_edge": (33, 5 * 64, 32),  # M one past a 32-row tile
    }
    rng = random.Random(99)
    for i in range(10):
        k = rng.randrange(1, 400) | 1  # odd K: the last word is always partly padding
        sizes[f"random{i}"] = (rng.randrange(1, 70), k, rng.randrange(1, 70))
    out = {name: (pm1(m, k, gen), pm1(k, n, gen)) for name, (m, k, n) in sizes.items()}
    a = torch.ones(3, 130)
    a[1] = -1.0  # all words -1: the int64 sign bit set in every full word
    a[2, 63] = -1.0
    out["all_pm"] = (a, torch.cat([a.t(), -a.t()], 1))
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run every case through the interpreted kernel in a child process; return its outputs."""
    sign_cases = _sign_cases()
    cases = {}
    for name, (a, b) in sign_cases.items():
        k = a.shape[1]
        cases[name] = (packed_rows(a), packed_rows(b.t()), k, "auto")
    cases["random0_swar"] = (*cases["random0"][:3], "swar")
    gen = torch.Generator().manual_seed(7)
    word_cases = {}
    for name, (m, k, n) in {"words_k1": (3, 1, 4), "words_k100": (9, 100, 7),
                            "words_k129": (4, 129, 5), "words_k256": (2, 256, 3)}.items():
        word_cases[name] = (random_words(m, k, gen), random_words(n, k, gen), k)
        cases[name] = (*word_cases[name], "auto")
    tmp = tmp_path_factory.mktemp("triton_interp")
    src, dst = tmp / "cases.pt", tmp / "results.pt"
    torch.save(cases, src)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"sign": sign_cases, "words": word_cases, "out": torch.load(dst)}


def test_equals_float_pm1_product(interpreted: dict) -> None:
    for name, (a, b) in interpreted["sign"].items():
        got = interpreted["out"][name]
        ref = (a.double() @ b.double()).to(torch.int32)  # exact: |sums| far below 2^53
        assert got.dtype == torch.int32 and got.shape == ref.shape, name
        assert torch.equal(got, ref), name


def test_swar_popcount_requested_explicitly(interpreted: dict) -> None:
    a, b = interpreted["sign"]["random0"]
    ref = (a.double() @ b.double()).to(torch.int32)
    assert torch.equal(interpreted["out"]["random0_swar"], ref)


def test_padding_bits_never_count(interpreted: dict) -> None:
    """Arbitrary words, garbage in the padding: only the first K bits of each row count."""
    for name, (a, b, k) in interpreted["words"].items():
        got = interpreted["out"][name]
        assert torch.equal(got, python_reference(a, b, k)), name
        if k % 64:  # the reference really ignores bits a naive count would include
            naive = python_reference(a, b, a.shape[1] * 64) - (a.shape[1] * 64 - k)
            assert not torch.equal(naive, got), name


def test_hardware_popcount_refused_in_interpreter(interpreted: dict) -> None:
    msg = interpreted["out"]["hardware_error"]
    assert "popcount='hardware'" in msg and "swar" in msg


def test_python_reference_matches_float_product() -> None:
    """The integer reference used for raw words agrees with the float product on packed signs."""
    gen = torch.Generator().manual_seed(3)
    a, b = pm1(4, 77, gen), pm1(77, 5, gen)
    ref = python_reference(packed_rows(a), packed_rows(b.t()), 77)
    assert torch.equal(ref, (a.double() @ b.double()).to(torch.int32))


# ------------------------------------------------------------------------------ dispatch


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_picks_triton_only_for_cuda(backend: str) -> None:
    assert not uses_triton(torch.device("cpu"), backend)
    assert not uses_triton("meta", backend)
    assert uses_triton(torch.device("cuda"), backend) == (backend != "torch")
    assert uses_triton("cuda:1", backend) == (backend != "torch")


def test_dispatch_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        uses_triton("cuda", "triton")


# ------------------------------------------------------------------------------ argument checks


def test_argument_errors() -> None:
    a = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="a_words must be int64"):
        triton_xnor_gemm(a.int(), a, 100)
    with pytest.raises(TypeError, match="b_words must be a Tensor"):
        triton_xnor_gemm(a, [[0, 0]], 100)
    with pytest.raises(ValueError, match="needs 1 words per row"):
        triton_xnor_gemm(a, a, 64)
    with pytest.raises(ValueError, match="popcount must be one of"):
        triton_xnor_gemm(a, a, 100, popcount="fast")
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        triton_xnor_gemm(a, a, -1)
    with pytest.raises(ValueError, match="2-D"):
        triton_xnor_gemm(a[0], a, 100)


@pytest.mark.skipif(interpreter_active(), reason="this process runs the Triton interpreter")
def test_cpu_tensors_need_the_interpreter() -> None:
    a = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_xnor_gemm(a, a, 5)


# ------------------------------------------------------------------------------ GPU compilation


@pytest.mark.skipif(interpreter_active(), reason="this process runs the Triton interpreter")
@pytest.mark.parametrize("hardware", [True, False], ids=["hardware", "swar"])
def test_compiles_for_sm90_without_a_gpu(hardware: bool) -> None:
    """Ahead-of-time compile to an sm_90 cubin (no GPU needed); hardware popcount is popc.b64.

    This proves only that the compiled path builds, not that it runs correctly on a GPU.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowbit.kernels import triton_xnor

    signature = {"a_ptr": "*i64", "b_ptr": "*i64", "out_ptr": "*i32", "M": "i32", "N": "i32",
                 "W": "i32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_W": "constexpr", "HW_POPCOUNT": "constexpr"}
    consts = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_W": 4, "HW_POPCOUNT": hardware}
    src = ASTSource(triton_xnor._kernel(), signature, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    assert ("popc.b64" in compiled.asm["ptx"]) == hardware
