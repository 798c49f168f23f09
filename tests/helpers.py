"""Shared by the test modules: the tolerance rule and peak-memory measurement."""
import os
import subprocess
import sys

import torch


def ulps_floor(dtype):
    """The floor in units of eps·max|truth|: one for the 16-bit dtypes (bf16: 0.8%
    of the largest value; four let a 3% error through), four for fp32 and fp64,
    whose reference errors can be ~0 while a kernel's summation order differs."""
    return 1 if torch.finfo(dtype).bits == 16 else 4


def assert_rule(got, ref_lowp, truth, what):
    """DESIGN §4: error vs the float64 truth at most ~2x the reference's own error
    when run in that dtype (plus an ulp-sized floor for when that error is ~0)."""
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref_lowp.double() - truth).abs().max().item()
    floor = ulps_floor(got.dtype) * torch.finfo(got.dtype).eps * truth.abs().max().item()
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3g} vs reference-in-dtype {ref_err:.3g}"


def assert_each_within_rule(names, got, reference, dtype, device, what):
    """assert_rule for each result of one run (the forward, then every gradient),
    ``got`` computed on ``device``: the truth is reference(torch.float64, "cpu"), the
    reference in the dtype is reference(dtype, device). On CUDA that reference's
    error is cuBLAS's (its bf16/fp16 reductions included), the one a user gets
    there, not the CPU's. ``reference`` returns results in the order of ``names``;
    where the truth has None (a gradient not asked for), got must be None too."""
    truth, ref_lowp = reference(torch.float64, "cpu"), reference(dtype, device)
    for name, g, lo, t in zip(names, got, ref_lowp, truth, strict=True):
        if t is None:
            assert g is None, f"{name} {what}"
            continue
        assert g.device.type == torch.device(device).type, f"{name} {what}: on {g.device}"
        assert g.dtype == lo.dtype and g.shape == t.shape, f"{name} {what}: {g.dtype} {tuple(g.shape)}"
        if t.numel():
            assert_rule(g.cpu(), lo.cpu(), t, f"{name} {what}")


# Prepended to a peak-memory script: status() and reset_peak().
PEAK_MEMORY_PRELUDE = """
def status(key):  # kB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    return status("VmRSS")
"""


def peak_memory_growth(script: str, *args: str) -> int:
    """Bytes by which ``script`` (run in a fresh process, after PEAK_MEMORY_PRELUDE)
    raised peak resident memory: it prints (VmHWM - the VmRSS reset_peak() returned)
    in kB. glibc is told to mmap every allocation over 64 KiB, so freed buffers
    leave the resident set instead of being reused unseen."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # From tests/: `python -c` puts its working directory first on sys.path, and from
    # the repository root that is the in-tree build, not the one this pytest imported
    # (CI's CUDA venv installs its own; the in-tree one is built for the CPU torch).
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PRELUDE + script, *args], env=env,
                            capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, f"the peak-memory script failed:\n{result.stderr[-3000:]}"
    return int(result.stdout) * 1024


def check_gradient_subsets(fn, tensors, names, subsets):
    """fn(*tensors) (None for an absent optional argument): every argument given gets
    a gradient when all ask, and each subset of names asking for gradients gets
    exactly those, equal to the full set's (an absent argument shifts none of them).
    The upstream gradient is ones."""
    def grads(wanted):
        leaves = [None if t is None else t.detach().clone().requires_grad_(n in wanted)
                  for n, t in zip(names, tensors)]
        out = fn(*leaves)
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        return {n: None if t is None else t.grad for n, t in zip(names, leaves)}

    full = grads(set(names))
    for n, t in zip(names, tensors):
        assert (full[n] is None) == (t is None), n
    for wanted in subsets:
        got = grads(wanted)
        for n in names:
            if n in wanted and full[n] is not None:
                torch.testing.assert_close(got[n], full[n], rtol=0, atol=0, msg=f"{wanted} {n}")
            else:
                assert got[n] is None, (wanted, n)
