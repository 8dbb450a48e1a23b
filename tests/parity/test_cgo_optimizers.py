"""Critical-gradient optimizers replay the official trajectories (chandar-lab/CriticalGradientOptimization).

Every ``cgo_optimizer_trajectory`` fixture is replayed with teacher forcing: the stored gradient
``in.grad.<param>[t]`` is set as ``p.grad`` before step ``t``. After every step the parameters, the buffer
(priorities and gradients in heap-array order, size) and the aggregate ``g_hat`` are compared; at the end
the base optimizer's state. ``*_C`` classes run :mod:`visrep.optim.critical` with ``reference_compat=True``;
the vanilla classes of the reference (old torch.optim copies) are checked against ``torch.optim``.
The reference's ``g_analysis`` / ``offline_grad`` statistics are not implemented and not compared.
"""
import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.optim.Optimizer imports it lazily: pay once at collection, not in a test)

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.optim import critical

_RENAMED = {"topC": "topc"}  # reference kwarg -> ours


def _build_optimizer(fx, params):
    cfg = fx.config
    name = cfg["optimizer_class"]
    kwargs = dict(cfg["effective_kwargs"])
    if name.endswith("_C"):
        sampling = kwargs.pop("sampling", None)
        if sampling not in (None, "KotH"):
            pytest.skip(f"sampling={sampling!r} is not implemented (keep-the-highest only)")
        kwargs = {_RENAMED.get(k, k): v for k, v in kwargs.items()}
        return getattr(critical, name)(params, reference_compat=True, **kwargs)
    return getattr(torch.optim, name)(params, **kwargs)


def _padded(values: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    out = values.new_full((size, *values.shape[1:]), fill)
    out[: values.shape[0]] = values
    return out


@pytest.mark.parametrize("path", fixtures_of_kind("cgo_optimizer_trajectory"))
def test_cgo_trajectory(path):
    fx = load_fixture(path)
    names = fx.config["param_order"]
    params = {n: torch.nn.Parameter(fx.tensors[f"state.{n}"].clone()) for n in names}
    opt = _build_optimizer(fx, list(params.values()))
    group = opt.param_groups[0]
    has_buffer = any(k.startswith("out.buffer.") for k in fx.tensors)
    has_aggr = any(k.startswith("out.aggr_grad.") for k in fx.tensors)

    captured = {}
    if has_aggr:
        aggregate = opt.aggregate

        def spy(p, grad, group):
            captured[p] = aggregate(p, grad, group)
            return captured[p]

        opt.aggregate = spy

    n_steps = fx.config["n_steps"]
    for t in range(n_steps):
        for n, p in params.items():
            p.grad = fx.tensors[f"in.grad.{n}"][t].clone()
        captured.clear()
        opt.step()
        for n, p in params.items():
            fx.assert_close(f"out.param.{n}", p.detach(), fx.tensors[f"out.param.{n}"][t])
            if has_aggr and t > 0:
                assert p in captured, f"{fx.name}: no aggregate for {n} at step {t}"
                fx.assert_close(f"out.aggr_grad.{n}", captured[p], fx.tensors[f"out.aggr_grad.{n}"][t - 1])
            if has_buffer:
                buf = opt.memory(p, group)
                size = fx.tensors[f"out.buffer.size.{n}"][t]
                fx.assert_close(f"out.buffer.size.{n}", torch.tensor(len(buf)), size)
                prio_key, grads_key = f"out.buffer.priorities.{n}", f"out.buffer.grads.{n}"
                capacity = fx.tensors[prio_key].shape[1]
                fx.assert_close(prio_key, _padded(buf.priorities(), capacity, -1.0), fx.tensors[prio_key][t])
                fx.assert_close(grads_key, _padded(buf.grads(), capacity, 0.0), fx.tensors[grads_key][t])
        if not has_buffer:
            assert not any(k.startswith("cg_") for n in names for k in opt.state[params[n]]), \
                f"{fx.name}: a buffer was allocated although the reference keeps none"

    final = fx.prefixed("out.final_state.")
    for key, expected in final.items():
        pname = next(n for n in names if key.startswith(n + "."))
        skey = key[len(pname) + 1:]
        state = opt.state[params[pname]]
        assert skey in state, f"{fx.name}: state {skey!r} missing for {pname}"
        fx.assert_close(f"out.final_state.{key}", torch.as_tensor(state[skey]), expected)
