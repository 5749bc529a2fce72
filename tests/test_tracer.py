import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_gpttrace import capture, stats, trace_training
from pytest_gpttrace.errors import CaptureError
from pytest_gpttrace.tracer import select_stages
from tests.builders import losses, stage
from tests.models import SMALL_CONFIG, UserGPT, tiny_reference, user_batches


class CountItemCalls(TorchDispatchMode):
    """Counts every device-to-host scalar read (what .item(), float(t), bool(t) dispatch to)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_hooks_do_not_read_values_back_to_the_host():
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    with capture(model) as cap:
        with CountItemCalls() as counter:
            loss = model(idx, targets)
            loss.backward()
        cap.end_iteration(loss=loss)
    it = cap.iterations[0]
    assert len(it.forward) > 40 and len(it.stage_grads) > 40  # the hooks did run under the mode
    assert counter.count == 0


def test_functional_stages_do_not_read_values_back_to_the_host():
    from tests.functional_models import FunctionalGPT, functional_batches

    model = FunctionalGPT()
    idx, targets = next(functional_batches())
    with capture(model) as cap:
        with CountItemCalls() as counter:
            loss = model(idx, targets)
            loss.backward()
        cap.end_iteration(loss=loss)
    it = cap.iterations[0]
    assert sum("/" in name for name in it.forward) > 20 and "blocks.1.attn/rotary#2" in it.stage_grads
    assert counter.count == 0


def test_the_counter_does_see_an_item_call():
    with CountItemCalls() as counter:
        torch.ones(2).sum().item()
    assert counter.count == 1


def test_reference_model_trace_has_every_stage_in_execution_order():
    model, batches, opts = tiny_reference()
    trace = trace_training(model, batches, opts, iterations=2)
    it = trace.iterations[0]
    names = list(it.forward)
    assert names[:6] == ["inputs.idx", "inputs.targets", "embed.wte", "embed.norm", "rope.cos", "rope.sin"]
    assert names[-4:] == ["final_norm", "lm_head.logits", "lm_head.softcap", "loss"]
    assert len(names) == 6 + 19 * SMALL_CONFIG.n_layer + 4
    grads = list(it.stage_grads)
    assert grads[0] == "loss" and grads[1] == "lm_head.softcap"  # backward order
    assert "inputs.idx" not in grads and "rope.cos" not in grads  # no gradient flows there
    assert set(it.param_grads) == {n for n, _ in model.named_parameters()}
    assert it.stepped is True and set(it.lr) == {"AdamW[0]", "AdamW[1]", "Muon[0]"}
    assert trace.config["n_layer"] == 2 and trace.model == "GPT"
    assert trace.environment["device_type"] == "cpu"
    assert trace.environment["stats_path"] == stats.prepare()[0]  # the path this machine can run
    assert trace.parameters["lm_head.weight"] == (SMALL_CONFIG.vocab_size, SMALL_CONFIG.n_embd)
    # the zero-init pattern, seen through the trace
    assert it.forward["blocks.0.attn.out"].all_zero and it.forward["lm_head.logits"].all_zero
    assert stage(it.param_grads["wte.weight"]).all_zero and not stage(it.param_grads["lm_head.weight"]).all_zero
    assert losses(trace)[1] < losses(trace)[0]


def test_micro_steps_are_told_apart_from_optimizer_steps():
    model, batches, opts = tiny_reference()
    trace = trace_training(model, batches, opts, iterations=4, micro_steps=2)
    assert [it.stepped for it in trace.iterations] == [False, True, False, True]
    loss = losses(trace)
    assert loss[0] == loss[1] and loss[2] < loss[1]  # the same batch, no step in between


def test_a_loop_without_optimizers_never_steps():
    model, batches, _ = tiny_reference()
    trace = trace_training(model, batches, None, iterations=3)
    assert [it.stepped for it in trace.iterations] == [False] * 3
    assert len({it.loss for it in trace.iterations}) == 1


def test_user_model_without_taps_is_traced_per_leaf_module():
    model = UserGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trace = trace_training(model, user_batches(), opt, iterations=2)
    it = trace.iterations[0]
    assert list(it.forward)[:2] == ["tok_emb", "pos_emb"]
    assert "layers.0.qkv" in it.forward and "layers.1.ff.1" in it.forward and "head" in it.forward
    assert "layers.0.ln#2" in it.forward  # called twice: recorded twice, not overwritten
    assert it.forward["layers.0.ln"] != it.forward["layers.0.ln#2"]
    assert "head" in it.stage_grads and "layers.0.ln#2" in it.stage_grads
    # pos_emb looks up positions (no gradient flows into its input), but its output feeds the loss:
    # its gradient is recorded with the output's shape (T, d), the batch of one summed out
    pos_grad = it.stage_grads["pos_emb"]
    assert pos_grad.shape == (16, 16) and pos_grad.mean == pytest.approx(it.stage_grads["tok_emb"].mean, rel=1e-6)
    assert stage(it.param_grads["head.weight"]).numel == 64 * 16
    assert losses(trace)[1] < losses(trace)[0]
    assert trace.config == {} and trace.model == "UserGPT"


def test_hooks_are_removed_after_an_exception():
    model, batches, _ = tiny_reference()
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        model(*next(batches))
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_after_a_failing_step_in_trace_training():
    model, batches, _ = tiny_reference()

    def broken_loss(model, batch):
        model(*batch)
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        trace_training(model, batches, None, loss_fn=broken_loss)
    assert not any(m._forward_hooks for m in model.modules())


def test_patterns_narrow_widen_and_exclude():
    model, _, _ = tiny_reference()
    narrow = [n for n, _ in select_stages(model, ["blocks.0.attn.*"])]
    assert narrow[0] == "blocks.0.attn.norm" and all(n.startswith("blocks.0.attn.") for n in narrow)
    wide = [n for n, _ in select_stages(model, ["*", "+blocks.*.attn.c_q"])]
    assert "blocks.1.attn.c_q" in wide and "loss" in wide
    dropped = [n for n, _ in select_stages(model, ["!lm_head.*", "!inputs.*"])]
    assert "lm_head.logits" not in dropped and "inputs.idx" not in dropped and "final_norm" in dropped


def test_patterns_that_select_nothing_name_the_stages():
    model, _, _ = tiny_reference()
    with pytest.raises(CaptureError, match=r"select none of the \d+ stages of GPT"):
        select_stages(model, ["transformer.h.*"])


def test_a_model_with_no_stages_is_refused_clearly():
    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x * 2

    # traced by its ops, and x * 2 is none of them: refused at the first iteration, naming the op list
    with capture(Doubler()) as cap, pytest.raises(CaptureError, match=r"^Doubler has no stages to trace: .*rms_norm"):
        cap.model(torch.ones(2))
        cap.end_iteration()


def test_a_replacing_hook_still_changes_the_model_under_capture():
    model, batches, _ = tiny_reference()
    idx, targets = next(batches)
    model.get_submodule("blocks.0.mlp.relu2").register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with capture(model) as cap:
        loss = model(idx, targets)
        loss.backward()
        cap.end_iteration(loss)
    assert cap.iterations[0].forward["blocks.0.mlp.relu2"].all_zero


def test_batches_that_run_out_are_reported():
    model, batches, _ = tiny_reference()
    with pytest.raises(CaptureError, match="ran out after 1 of 3"):
        trace_training(model, [next(batches)], None, iterations=3)


def stage_outputs(model):
    """Every tensor the model's leaf modules return, kept to look at their hooks afterwards."""
    kept = []
    handles = [m.register_forward_hook(lambda m, i, o: kept.append(o)) for m in model.modules()
               if next(m.children(), None) is None]
    return kept, handles


@pytest.mark.parametrize("close", ["discard_iteration", "end_iteration", "exit"])
def test_tensor_hooks_are_removed_however_an_iteration_closes(close):
    model = UserGPT()
    idx, targets = next(user_batches())
    kept, handles = stage_outputs(model)
    with capture(model) as cap:
        model(idx, targets)  # no backward: the gradient hooks are still waiting
        hooked = [t for t in kept if isinstance(t, torch.Tensor) and t.requires_grad]
        assert hooked and all(t._backward_hooks for t in hooked)
        if close != "exit":
            getattr(cap, close)()
        if close == "discard_iteration":
            assert not cap.iterations
    for h in handles:
        h.remove()
    assert not any(t._backward_hooks for t in hooked)


@pytest.mark.parametrize("run", ["capture", "trace_training"])
def test_a_model_on_the_meta_device_is_refused_up_front(run):
    with torch.device("meta"):
        model = UserGPT()
    with pytest.raises(CaptureError) as info:
        if run == "capture":
            capture(model)
        else:
            trace_training(model, user_batches(), None, iterations=1)
    message = str(info.value)
    assert message == ("UserGPT is on the meta device ('tok_emb.weight' has a shape but no values): materialise it "
                       "before tracing (model.to_empty(device=...), then initialise its weights)")
    assert not any(m._forward_hooks for m in model.modules())


def test_a_meta_buffer_is_refused_too():
    model = UserGPT()
    model.register_buffer("mask", torch.empty(4, device="meta"))
    with pytest.raises(CaptureError, match=r"^UserGPT is on the meta device \('mask' has a shape but no values\)"):
        capture(model)


def test_a_frozen_model_is_refused_by_trace_training_in_one_line():
    model = UserGPT().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(CaptureError) as info:
        trace_training(model, user_batches(), opt, iterations=2)
    assert str(info.value) == (
        "every parameter of UserGPT is frozen (requires_grad=False), so trace_training has no backward to run: "
        "unfreeze what should train (model.requires_grad_(True)), or trace a forward pass with capture(model)")
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_frozen_model_is_traced_forward_only_by_capture():
    model = UserGPT().requires_grad_(False)
    idx, targets = next(user_batches())
    with capture(model) as cap:
        _, loss = model(idx, targets)
        it = cap.end_iteration(loss=loss, stepped=False)
    trace = cap.trace()
    assert list(it.forward)[:2] == ["tok_emb", "pos_emb"] and "head" in it.forward
    assert it.stage_grads == {} and it.param_grads == {}  # no gradient: none expected, none missing
    assert trace.frozen_params == tuple(n for n, _ in model.named_parameters())
    assert it.loss == pytest.approx(loss.item())


@pytest.mark.parametrize("loss_fn, message", [
    (lambda model, batch: model(*batch)[1].detach(),
     "the loss of UserGPT does not require grad (computed under torch.no_grad(), or detached), "
     "so trace_training cannot call backward() on it"),
    (lambda model, batch: model(*batch)[1].item(),
     "the loss of UserGPT is a float, not a scalar tensor: trace_training needs a loss to call backward() on"),
    (lambda model, batch: model(*batch)[0].sum(-1),
     "the loss of UserGPT is a tensor of shape (1, 16), not a scalar tensor: trace_training needs a loss to "
     "call backward() on"),
], ids=["detached", "float", "not-scalar"])
def test_a_loss_backward_cannot_run_on_is_refused_in_one_line(loss_fn, message):
    model = UserGPT()
    with pytest.raises(CaptureError) as info:
        trace_training(model, user_batches(), None, iterations=1, loss_fn=loss_fn)
    assert str(info.value) == message
    assert not any(m._forward_hooks for m in model.modules())
