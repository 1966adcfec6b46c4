"""The fused sign op (irconvert.fused) against the unfused code it replaces and against EDE's formula."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
from irconvert.methods.ede import EDESign
from irconvert.errors import IRConvertError
from irconvert.fused import binary_sign, grad_torch, sign_torch
from irconvert.methods import libra
from irconvert.methods.libra_pb import libra_pb, libra_pb_op
from irconvert.fused.sign import ENV, binary_sign_op, kernel
from irconvert.methods.quantizers import SurrogateSign, clipped_identity, triangle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan")]


def probe(dtype=torch.float32, n=4099):
    """Random values (an odd count, so the kernels' tails run) around the kinks, and the special values."""
    torch.manual_seed(0)
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(n) * 1.5])
    return x.to(dtype)


def reference(x, g, mode, t=0.3, k=1 / 0.3):
    """The gradient of the unfused autograd functions of ede.py and quantizers.py (the code before the op)."""
    x = x.detach().clone().requires_grad_()
    if mode == "ede":
        y = EDESign.apply(x, t, k)
    else:
        y = SurrogateSign.apply(x, clipped_identity if mode == "ste" else triangle)
    y.backward(g)
    return y.detach(), x.grad


def fused(x, g, mode, t=0.3, k=1 / 0.3):
    x = x.detach().clone().requires_grad_()
    y = binary_sign(x, mode, torch.tensor([t, k]))
    y.backward(g)
    return y.detach(), x.grad


def test_the_fused_kernel_is_the_default_on_cpu():
    assert kernel(torch.zeros(1)) is not None, "the C++ kernel did not build; irconvert.fused falls back"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ede", "ste", "approx"])
def test_forward_bit_identical_and_gradient_equal_to_the_unfused_code(mode, dtype):
    x = probe(dtype)
    g = torch.randn(x.shape).to(dtype)
    y_ref, gx_ref = reference(x, g, mode)
    y, gx = fused(x, g, mode)
    assert y.dtype == dtype and torch.equal(y, y_ref)  # sign(0) = sign(-0) = +1, sign(NaN) = -1 in both
    assert y[:2].tolist() == [1.0, 1.0] and y[10].item() == -1.0
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]
    torch.testing.assert_close(gx, gx_ref, rtol=tol[0], atol=tol[1], equal_nan=True)
    if mode == "ste":  # a mask: exactly g or 0
        assert torch.equal(gx, torch.where(x.abs() <= 1, g, torch.zeros_like(g)))


@pytest.mark.parametrize("t", [1e-3, 0.05, 1.0, 10.0])
def test_ede_gradient_is_the_formula(t):
    """k t (1 - tanh^2(t x)) is the derivative of k tanh(t x): autograd of that, in float64, is the truth."""
    k = max(1 / t, 1)
    x = probe(n=2000)[11:]  # finite values only
    g = torch.randn(x.shape)
    x64 = x.double().requires_grad_()
    (k * torch.tanh(t * x64)).backward(g.double())
    _, gx = fused(x, g, "ede", t, k)
    torch.testing.assert_close(gx.double(), x64.grad, rtol=2e-6, atol=1e-6)
    # hand values at x = 0: k t, and for t = 1, x = 1: k (1 - tanh(1)^2) = 0.41997434...
    one = torch.ones(1)
    assert fused(torch.zeros(1), one, "ede", t, k)[1].item() == pytest.approx(k * t, rel=1e-6)
    assert fused(torch.ones(1), one, "ede", 1.0, 1.0)[1].item() == pytest.approx(0.41997434161402614, rel=1e-6)


def test_surrogates_by_hand():
    x = torch.tensor([-1.5, -1.0, -0.25, 0.0, 0.75, 1.0, 1.01])
    g = torch.full_like(x, 2.0)
    assert fused(x, g, "ste")[1].tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]
    assert fused(x, g, "approx")[1].tolist() == pytest.approx([0.0, 0.0, 3.0, 4.0, 1.0, 0.0, 0.0])


def test_channels_last_and_strided_inputs():
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 5, 5)  # a different layout from x
    y_ref, gx_ref = reference(x, g, "ede")
    y, gx = fused(x, g, "ede")
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    xt = torch.randn(6, 4).t()  # not dense in any standard format
    assert torch.equal(binary_sign(xt, "ste"), sign_torch(xt))


def test_fallback_gives_the_same_numbers_and_bad_setting_is_an_error(monkeypatch):
    x, g = probe(), torch.randn(4110)
    y, gx = fused(x, g, "ede")
    monkeypatch.setenv(ENV, "python")
    assert kernel(x) is None
    y_py, gx_py = fused(x, g, "ede")
    assert torch.equal(y, y_py)
    torch.testing.assert_close(gx, gx_py, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gx_py, grad_torch(g, x, torch.tensor([0.3, 1 / 0.3]), "ede"), equal_nan=True)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(IRConvertError, match=ENV):
        binary_sign(x, "ste")


def test_opcheck_fake_and_autograd_registration():
    x = torch.randn(3, 5, requires_grad=True)
    for mode, tk in (("ede", torch.tensor([0.5, 2.0])), ("ste", None), ("approx", None)):
        torch.library.opcheck(binary_sign_op, (x, tk, mode))
        torch.library.opcheck(binary_sign_op, (x * 2, tk, mode, True))


def hardtanh_then_sign(x, g, mode, clip, t=0.3, k=1 / 0.3):
    """sign(hardtanh(x)) as the layers computed it before the fusion (clip=False), or the fused op (clip=True)."""
    x = x.detach().clone().requires_grad_()
    tk = torch.tensor([t, k])
    y = binary_sign(x, mode, tk, clip=True) if clip else binary_sign(F.hardtanh(x), mode, tk)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("python", [False, True], ids=["kernel", "fallback"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ede", "ste", "approx"])
def test_clip_is_hardtanh_then_sign_bit_for_bit(mode, dtype, python, monkeypatch):
    if python:
        monkeypatch.setenv(ENV, "python")
    x = probe(dtype)
    x[20:24] = torch.tensor([1.0000001, -1.0000001, 0.99999994, -0.99999994]).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    g[2] = float("nan")  # at x = 1: Hardtanh passes nothing, NaN included
    y_ref, gx_ref = hardtanh_then_sign(x, g, mode, clip=False)
    y, gx = hardtanh_then_sign(x, g, mode, clip=True)
    assert torch.equal(y, y_ref) and torch.equal(y, sign_torch(x))
    finite = ~x.isnan()  # PyTorch's own hardtanh_backward gives NaN inputs 0 or g (vector body or tail)
    assert torch.equal(gx[finite], gx_ref[finite])
    assert gx[x.isnan()].tolist() == [0.0]


def test_clip_by_hand():
    """Hardtanh passes no gradient at its boundaries: sign(hardtanh x) has STE's mask without |x| = 1."""
    x = torch.tensor([-1.5, -1.0, -0.25, 0.0, 0.75, 1.0, 1.01])
    x = x.requires_grad_()
    binary_sign(x, "ste", clip=True).backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0]


def test_hardtanh_keeping_output_is_hardtanh_and_keeps_only_its_output():
    from irconvert.fused.hardtanh import HardtanhKeepingOutput

    x = probe()
    g = torch.randn(x.shape)
    x[20:22] = torch.tensor([1.0000001, -0.99999994])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = nn.Hardtanh(-1.0, 1.0)(a * 1), HardtanhKeepingOutput()(b * 1)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ya, yb, **exact)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **exact)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = HardtanhKeepingOutput()(x.clone().requires_grad_() * 1)
    assert len(kept) == 1 and kept[0].data_ptr() == y.data_ptr()


def test_kept_small_signs_and_weight_give_the_same_gradients():
    from contextlib import nullcontext

    from irconvert.fused.saved import kept_small

    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    w = torch.where(torch.rand(3, 4, 3, 3) < 0.5, -1.0, 1.0) * torch.tensor([0.5, 2.0**-70, 4.0]).view(3, 1, 1, 1)
    results = []
    for ctx in (nullcontext, kept_small):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        q = wi * 1.0
        signs = binary_sign(xi, "ste")
        with ctx() if ctx is nullcontext else ctx(signs, xi, q.shape):
            out = F.conv2d(signs, q)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out, xi.grad, wi.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    src = x.clone().requires_grad_() * 1
    signs = binary_sign(src, "ste")
    with kept_small(signs, src):
        out = F.conv2d(signs, w)
    src.mul_(2)
    with pytest.raises(RuntimeError, match="in place"):
        out.sum().backward()


def unfused_libra_pb(w, mode, t, k):
    """The weight path of methods.Binarizer before the fused op: balance, sign, 2^round(log2 mean|w_hat|)."""
    w_hat = libra.balance(w)
    b = EDESign.apply(w_hat, t, k) if mode == "ede" else SurrogateSign.apply(w_hat, clipped_identity)
    return (b * libra.pow2(libra.scale_exponent(w_hat), w_hat)).to(w.dtype)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (3, 1, 1, 1), (4, 9)])
@pytest.mark.parametrize("mode", ["ede", "ste"])
def test_libra_pb_op_equals_the_unfused_weight_path(mode, shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.05
    if shape == (4, 9):
        w[1] = 0.25  # a constant channel (0.25 * 9 sums exactly): w_hat = 0, sign +1, s = 1, gradient 0
    t, k = 0.2, 5.0
    g = torch.randn(shape)
    w1 = w.clone().requires_grad_()
    q = libra_pb(w1, mode, torch.tensor([t, k]))
    q.backward(g)
    w2 = w.clone().requires_grad_()
    q_ref = unfused_libra_pb(w2, mode, t, k)
    q_ref.backward(g)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(w1.grad).all()
    torch.library.opcheck(libra_pb_op, (w.clone().requires_grad_(), torch.tensor([t, k]), mode))


def small_binary(method="irnet"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return irconvert.binarize(net, method=method)


def grads(model, x, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("method", ["irnet", "libra", "vanilla", "scaled", "sdbnn_ede"])
def test_model_outputs_identical_and_gradients_equal_to_the_fallback(method, amp, monkeypatch):
    model = small_binary(method)
    irconvert.set_ede(model, 0.2)
    x = torch.randn(4, 3, 6, 6)
    out, gs = grads(model, x, amp)
    monkeypatch.setenv(ENV, "python")
    out_py, gs_py = grads(model, x, amp)
    assert torch.equal(out, out_py)
    rtol, atol = (2e-2, 2e-2) if amp else (1e-4, 1e-5)
    for a, b in zip(gs, gs_py):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_fullgraph_trace_has_no_break_and_t_does_not_recompile():
    """dynamo alone (no code generation, fast): one graph; a new t each step reuses it."""
    model = small_binary()
    x = torch.randn(2, 3, 6, 6)
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for t in (0.01, 0.1, 1.0):
        irconvert.set_ede(model, t)
        compiled(x).sum().backward()
    assert counts["n"] == 1


def test_compiled_backward_recomputes_signs_and_binary_weights(monkeypatch):
    """Inside torch.compile the saved-tensor hooks that pack B_a and B_w to bits do not run; the layers
    mark the sign and the weight binarization for recomputation instead, so the backward makes them
    again (one more call of each op per layer) and keeps neither as floats. Gradients are unchanged."""
    import irconvert.fused.sign as fused_sign
    import irconvert.methods.libra_pb as libra_pb

    model = small_binary()
    irconvert.set_ede(model, 0.3)
    x = torch.randn(4, 3, 6, 6)
    out, gs = grads(model, x, False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads(compiled, x, False)  # compile first: tracing calls the ops too

    calls = {"sign": 0, "libra": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fused_sign, "sign_values", counted("sign", fused_sign.sign_values))
    kernel_of = libra_pb._cpu_kernel

    class Counting:  # the C++ module, with its Libra-PB forward counted
        def __init__(self, mod):
            self.mod = mod
            self.libra_forward = counted("libra", mod.libra_forward)

        def __getattr__(self, name):
            return getattr(self.mod, name)

    monkeypatch.setattr(libra_pb, "_cpu_kernel", lambda w: None if (m := kernel_of(w)) is None else Counting(m))
    layers = len(list(irconvert.binary_layers(model)))
    w1a1 = sum(m.binary_mode == "W1A1" for _, m in irconvert.binary_layers(model))
    grads(model, x, False)
    eager = dict(calls)
    assert eager == {"sign": w1a1, "libra": layers}
    calls.update(sign=0, libra=0)
    model.zero_grad(set_to_none=True)
    out_c = compiled(x)
    out_c.square().sum().backward()
    # one call more per layer than eager mode: the sign and Libra-PB's forward again in the backward
    assert calls == {"sign": eager["sign"] + w1a1, "libra": eager["libra"] + layers}
    torch.testing.assert_close(out_c.detach(), out, rtol=1e-5, atol=1e-6)
    for a, b in zip([p.grad for p in model.parameters() if p.grad is not None], gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_autocast_step_casts_inside_the_recomputed_region_without_changing_a_number():
    """Under bf16 autocast the compiled layers cast B_a and the binary weight to bfloat16 themselves (so the
    cast is recomputed with them, not kept): the values are those autocast's own cast gives, so the
    outputs and gradients equal eager mode's exactly (aot_eager runs the same kernels)."""
    model = small_binary()
    irconvert.set_ede(model, 0.3)
    x = torch.randn(4, 3, 6, 6)
    out, gs = grads(model, x, True)
    out_c, gs_c = grads(torch.compile(model, backend="aot_eager", fullgraph=True), x, True)
    assert torch.equal(out_c, out)
    for a, b in zip(gs_c, gs):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    model = small_binary()
    irconvert.set_ede(model, 0.3)
    x = torch.randn(4, 3, 6, 6)
    out, gs = grads(model, x, False)
    out_c, gs_c = grads(torch.compile(model, fullgraph=True), x, False)
    # inductor fuses BatchNorm and friends with its own rounding order: close, not bit-identical
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    for a, b in zip(gs_c, gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


TRITON_CHECK = textwrap.dedent("""
    import torch
    from irconvert.fused import grad_torch, sign_torch
    from irconvert.fused import triton_sign
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float('inf'), -float('inf'), float('nan')])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.cat([special, torch.randn(3000) * 1.5]).to(dtype)
        g = torch.randn(x.shape).to(dtype)
        assert torch.equal(triton_sign.sign_forward(x), sign_torch(x)), dtype
        tk = torch.tensor([0.3, 1 / 0.3])
        for mode in ('ede', 'ste', 'approx'):
            for clip in (False, True):
                got = triton_sign.sign_backward(g, x, tk if mode == 'ede' else None, mode, clip)
                want = grad_torch(g.float(), x.float(), tk, mode, clip).to(dtype)
                tol = 1e-5 if dtype == torch.float32 else 1.6e-2
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    print('ok')
""")


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter():
    """The CUDA kernels' numerics, run by Triton's interpreter on CPU tensors (no GPU needed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_train_compile_recipe_field_and_where_it_applies():
    from irconvert.recipe import TrainSection
    from irconvert.train import training_net

    assert TrainSection().compile == "auto"
    assert TrainSection(compile=True).compile is True and TrainSection(compile=False).compile is False
    with pytest.raises(Exception, match="compile"):
        TrainSection(compile="sometimes")
    model = small_binary()
    cpu = torch.device("cpu")
    assert training_net(model, "auto", cpu) is model and training_net(model, False, cpu) is model
    assert isinstance(training_net(model, True, cpu), torch._dynamo.eval_frame.OptimizedModule)


def test_libra_pb_backward_by_blocks_of_channels_is_the_same(monkeypatch):
    from irconvert.methods import libra_pb as module

    torch.manual_seed(2)
    w, g = torch.randn(7, 5, 3, 3) * 0.05, torch.randn(7, 5, 3, 3)
    grads = []
    for block in (1 << 19, 100, 1):  # one block; 2 channels a block (the last one alone); 1 channel a block
        monkeypatch.setattr(module, "_BLOCK", block)
        w1 = w.clone().requires_grad_()
        libra_pb(w1, "ede", torch.tensor([0.2, 5.0])).backward(g)
        grads.append(w1.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ede", "ste", "approx"])
def test_libra_pb_cpu_kernel_equals_the_pytorch_ops(mode, dtype, monkeypatch):
    torch.manual_seed(3)
    tk = torch.tensor([0.2, 5.0])
    for shape in [(32, 64, 3, 3), (10, 13), (4, 9), (3, 1, 1, 1)]:
        w = (torch.randn(shape) * 0.05).to(dtype)
        if shape == (4, 9):
            w[1] = 0.25  # a constant channel
        g = torch.randn(shape).to(dtype)
        results = []
        for choice in ("fused", "python"):
            monkeypatch.setenv(ENV, choice)
            wi = w.clone().requires_grad_()
            q, mu, r, s = libra_pb_op(wi, tk, mode)
            q.backward(g)
            results.append((q, mu, r, s, wi.grad))
        (q, mu, r, s, grad), (q_py, mu_py, r_py, s_py, grad_py) = results
        for a, b in ((q, q_py), (mu, mu_py), (r, r_py), (s, s_py)):
            assert torch.equal(a, b), shape
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
        torch.testing.assert_close(grad, grad_py, **tol)


def test_scale_exponent_is_the_exactly_rounded_log2():
    import math

    import numpy as np

    below = np.float32(2**-0.5)  # the float just below 2^-1/2
    cases = [below, np.nextafter(below, np.float32(1)), np.float32(1.0), np.float32(0.75), np.float32(0.5)]
    m = torch.tensor([float(c) * 2.0**k for c in cases for k in (-9, 0, 5)], dtype=torch.float32)
    w_hat = torch.stack([m, -m], dim=1)  # mean |w_hat| = m exactly
    expected = [round(math.log2(v)) for v in m.tolist()]
    assert libra.scale_exponent(w_hat).tolist() == expected
    assert expected[:3] == [-10, -1, 4]  # 2^k * (just below 2^-1/2) rounds down


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_bits_kernel_equals_the_pytorch_packing(dtype):
    from irconvert.fused import saved

    torch.manual_seed(4)
    for shape in [(16, 8, 3, 3), (5, 3, 3, 3), (7, 5)]:  # rows on byte boundaries, rows across them, a tail
        s = torch.tensor([2.0**e for e in torch.randint(-20, 5, (shape[0],)).tolist()]).to(dtype)
        s[1] = 0.0  # a row of +-0.0: -0.0 comes back as -0.0
        t = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).to(dtype) * s.view(-1, *[1] * (len(shape) - 1))
        saved_kernel = saved._pack_weight(t)
        bits_torch = saved._pack_bits(torch.signbit(t))
        assert torch.equal(saved_kernel[1], bits_torch)
        back = saved._unpack_weight(saved_kernel)
        assert torch.equal(back, t) and torch.equal(torch.signbit(back), torch.signbit(t))
        shape_, s_ = saved_kernel[3], saved_kernel[2]
        back_torch = torch.where(saved._unpack_bits(bits_torch, shape_), -s_.reshape((-1,) + (1,) * (len(shape) - 1)),
                                 s_.reshape((-1,) + (1,) * (len(shape) - 1)))
        assert torch.equal(back, back_torch)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["ede", "ste", "approx"])
def test_bfloat16_kernel_is_the_float_kernel_rounded_once(mode, clip):
    """The bfloat16 loops convert blocks by their bits: the same numbers as float32 math rounded to bfloat16."""
    mod = kernel(torch.zeros(1))
    if mod is None:
        pytest.skip("no compiled kernel")
    x, g = probe(torch.bfloat16), probe(torch.bfloat16).flip(0)
    out = mod.sign_backward(g, x, mode, 0.3, 1 / 0.3, clip)
    want = mod.sign_backward(g.float(), x.float(), mode, 0.3, 1 / 0.3, clip).bfloat16()
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mod.sign_forward(x), sign_torch(x))


def test_sign_gradient_of_tensors_that_differ_only_in_a_size_one_stride():
    """timm's CSATv2 hands the backward g and x of shape [4, 1, 386] with strides (386, 386, 1) and
    (386, 1, 1): the same memory order, which the kernel takes as such."""
    from irconvert.fused.sign import binary_sign_grad, grad_torch

    x = torch.randn(4, 386, 1).transpose(1, 2)  # strides (386, 1, 1)
    g = torch.randn(4, 1, 386)  # strides (386, 386, 1)
    assert x.is_contiguous() and g.is_contiguous() and x.stride() != g.stride()
    tk = torch.tensor([0.3, 1 / 0.3])
    for clip in (False, True):
        torch.testing.assert_close(binary_sign_grad(g, x, tk, "ede", clip), grad_torch(g, x, tk, "ede", clip))
