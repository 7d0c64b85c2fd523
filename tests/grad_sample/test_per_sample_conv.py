"""The unfold + matmul per-sample conv2d weight gradient (demem_ext.grad_sample.conv_rule) against torch's own."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, vmap

from demem_ext.grad_sample import conv_rule as per_sample_conv
from demem_ext.grad_sample.torch_func import LossModule, per_sample_grads
from demem_ext.grad_sample.conv_rule import SmallMapConv2d, UnfoldConv2d, output_map_elements, routes
from conftest import loss_fn, per_sample_reference

PROPS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    height = draw(st.integers(dilation[0] * (kh - 1) + 1, 7))
    width = draw(st.integers(dilation[1] * (kw - 1) + 1, 7))
    return {"rows": draw(st.integers(1, 4)), "c_in": draw(st.integers(1, 4)), "c_out": draw(st.integers(1, 5)),
            "map": (height, width), "kernel": (kh, kw), "stride": stride, "padding": padding,
            "dilation": dilation, "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def _per_sample(case: dict, route: bool) -> tuple[torch.Tensor, ...]:
    """vmap(grad) of a loss of one conv2d over the samples, w.r.t. weight, bias and input."""
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["rows"], case["c_in"], *case["map"], generator=gen, dtype=torch.float64)
    weight = torch.randn(case["c_out"], case["c_in"], *case["kernel"], generator=gen, dtype=torch.float64)
    bias = torch.randn(case["c_out"], generator=gen, dtype=torch.float64) if case["bias"] else None
    geometry = {k: case[k] for k in ("stride", "padding", "dilation")}

    def loss(weight: torch.Tensor, bias, xi: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(xi.unsqueeze(0), weight, bias, **geometry)
        return (out.tanh() * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum()

    argnums = (0, 1, 2) if case["bias"] else (0, 2)
    fn = vmap(grad(loss, argnums=argnums), in_dims=(None, None, 0))
    if not route:
        return fn(weight, bias, x)
    with SmallMapConv2d():
        return fn(weight, bias, x)


@PROPS
@given(case=conv_cases())
def test_unfold_weight_gradient_equals_torch_func(case) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(per_sample_conv, "MIN_WEIGHT_PER_OUTPUT", 0)  # route every conv2d
        routed = _per_sample(case, True)
    plain = _per_sample(case, False)
    for got, want in zip(routed, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_routing_rule() -> None:
    def x(c, size):
        return torch.zeros(1, c, size, size)

    def w(c_out, c_in, k=3):
        return torch.zeros(c_out, c_in, k, k)

    assert routes(x(512, 4), w(512, 512), 1, 1, 1, 1)  # ResNet-18 layer4: 2.4M weights on a 4x4 map
    assert routes(x(256, 8), w(512, 256), 2, 1, 1, 1)  # its strided first conv: 8x8 -> 4x4
    assert not routes(x(256, 8), w(256, 256), 1, 1, 1, 1)  # layer3: 9216 weights per output element
    assert not routes(x(64, 32), w(64, 64), 1, 1, 1, 1)  # layer1
    assert not routes(x(512, 4), w(256, 256), 1, 1, 1, 2)  # groups
    assert not routes(x(512, 4), w(512, 512), 1, "same", 1, 1)  # string padding
    assert not routes(torch.zeros(512, 4, 4), w(512, 512), 1, 1, 1, 1)  # unbatched input
    assert not routes(x(512, 4).to("meta"), w(512, 512).to("meta"), 1, 1, 1, 1)  # not on the CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not routes(x(512, 4), w(512, 512), 1, 1, 1, 1)
    assert routes(x(512, 4), w(512, 512), [1], (1,), [1], 1)  # one-element sequences, as conv2d takes them
    assert output_map_elements((4, 4), (3, 3), (1, 1), (1, 1), (1, 1)) == 16
    assert output_map_elements((8, 7), (3, 1), (2, 2), (1, 0), (2, 1)) == 3 * 4


class _Recorder:
    """Counts UnfoldConv2d.apply calls while it is patched in."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        apply = UnfoldConv2d.apply

        def counting(*args):
            self.calls += 1
            return apply(*args)

        monkeypatch.setattr(UnfoldConv2d, "apply", counting)


def test_mode_routes_keyword_calls_and_leaves_others(monkeypatch) -> None:
    recorder = _Recorder(monkeypatch)
    x, weight, bias = (t.double() for t in (torch.randn(2, 512, 4, 4), torch.randn(512, 512, 3, 3) / 48,
                                            torch.randn(512)))
    weight.requires_grad_()
    with SmallMapConv2d():
        routed = F.conv2d(x, weight=weight, bias=bias, padding=(1, 1))
        assert recorder.calls == 1
        (routed_grad,) = torch.autograd.grad(routed.square().sum(), weight)  # a batch of 2 outside vmap
        other = F.conv2d(x, weight, bias, padding="same")
        grouped = F.conv2d(x, weight[:, :256], None, 1, 1, 1, 2)
        summed = torch.add(x, 1)
    assert recorder.calls == 1
    plain = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(routed, plain)
    torch.testing.assert_close(routed_grad, torch.autograd.grad(plain.square().sum(), weight)[0])
    torch.testing.assert_close(other, F.conv2d(x, weight, bias, padding=1))
    torch.testing.assert_close(grouped, F.conv2d(x, weight[:, :256], None, 1, 1, 1, 2))
    torch.testing.assert_close(summed, x + 1)


def test_double_backward_through_the_routed_conv(monkeypatch) -> None:
    """A loss that differentiates its input gradient (a gradient penalty) gets the same weight gradient."""
    monkeypatch.setattr(per_sample_conv, "MIN_WEIGHT_PER_OUTPUT", 0)
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=gen,
                                                                                           dtype=torch.float64)

    def loss(weight: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        def energy(inp):
            return F.conv2d(inp, weight, None, 1, 1).tanh().sum()

        xi = xi.unsqueeze(0)
        return grad(energy)(xi).square().sum() + energy(xi)

    fn = vmap(grad(loss), in_dims=(None, 0))
    with SmallMapConv2d():
        routed = fn(weight, x)
    torch.testing.assert_close(routed, fn(weight, x), rtol=1e-10, atol=1e-10)


class _WideOnSmallMaps(nn.Module):
    """A conv2d stack whose last two layers the rule routes (large weights on 2x2 maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 128, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(128, 128, 3, padding=1)
        self.frozen = nn.Conv2d(128, 128, 3, padding=1, bias=False).requires_grad_(False)
        self.head = nn.Linear(128 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen(F.relu(self.wide(F.relu(self.stem(x)))))
        return self.head(h.flatten(1))


def _engine_inputs(model: nn.Module) -> tuple[LossModule, dict[str, torch.Tensor]]:
    """The torch.func engine's loss module (cross-entropy per sample) and trainable parameters for `model`."""
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return LossModule(model, loss_fn), params


def test_engine_per_sample_grads_with_routed_layers_equal_a_loop(monkeypatch) -> None:
    recorder = _Recorder(monkeypatch)
    torch.manual_seed(0)
    model = _WideOnSmallMaps()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    grads, losses = per_sample_grads(*_engine_inputs(model), (x, y), torch.float32)
    assert recorder.calls == 2  # wide and frozen (its input gradient); not the stem (8 weights per element)
    want_grads, want_losses = per_sample_reference(model, x, y)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, want_losses)


def test_environment_switch_turns_the_rule_off(monkeypatch) -> None:
    recorder = _Recorder(monkeypatch)
    module, params = _engine_inputs(_WideOnSmallMaps())
    batch = (torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,)))
    monkeypatch.setenv("DEMEM_UNFOLD_CONV", "0")
    off, _ = per_sample_grads(module, params, batch, torch.float32)
    off = off.clone()
    assert recorder.calls == 0
    monkeypatch.setenv("DEMEM_UNFOLD_CONV", "1")
    on, _ = per_sample_grads(module, params, batch, torch.float32)
    assert recorder.calls == 2
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_conv_grads_benchmark(tmp_path, capsys) -> None:
    from demem_ext.bench import conv_grads

    path = tmp_path / "conv.json"
    switch = os.environ.get("DEMEM_UNFOLD_CONV")
    assert conv_grads.main(["--quick", "--repeats", "1", "--steps", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "grouped/unfold" in out and "small map" in out and "per-sample, rule off" in out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert [r["layer"] for r in rows] == ["small map", "large map"]
    for r in rows:
        assert r["grouped_ms"] > 0 and r["unfold_ms"] > 0 and r["max_rel_diff"] < 1e-5
        assert r["grouped_over_unfold"] == pytest.approx(r["grouped_ms"] / r["unfold_ms"])
    steps = data["steps"]
    assert {"per-sample, rule on", "per-sample, rule off", "PGD-AT"} <= set(steps["median_s"])
    assert steps["over_pgd"]["PGD-AT"] == 1.0 and os.environ.get("DEMEM_UNFOLD_CONV") == switch
