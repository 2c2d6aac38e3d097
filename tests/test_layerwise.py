"""`capture_block_inputs`: the blocks' inputs are recorded without running the blocks."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner.layerwise import capture_block_inputs
from hf_dpruner.targets import decoder_layers

from testing_utils import ARCHS, build_tiny, make_batches


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_records_what_a_full_forward_passes_each_block_without_running_them(arch):
    model = build_tiny(arch).eval()
    batches = make_batches(2, 2, 16)
    blocks = decoder_layers(model)
    seen: list[list[tuple]] = [[] for _ in blocks]

    def record(index):
        def hook(module, args, kwargs):
            seen[index].append((args, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()

    runs = []
    counters = [module.register_forward_hook(lambda *_: runs.append(1)) for block in blocks
                for module in block.modules() if isinstance(module, torch.nn.Linear)]
    hidden, calls = capture_block_inputs(model, batches)
    for handle in counters:
        handle.remove()

    assert runs == []  # no layer of any block computed anything
    assert len(hidden) == len(batches)
    for b, h in enumerate(hidden):
        first_args, first_kwargs = seen[0][b]
        assert torch.equal(h, first_args[0] if first_args else first_kwargs["hidden_states"])
    for index in range(len(blocks)):
        assert len(calls[index]) == len(batches)
        for (args, kwargs), (ref_args, ref_kwargs) in zip(calls[index], seen[index], strict=True):
            assert _same(args, ref_args[1:]) and _same(kwargs, ref_kwargs), (index, kwargs.keys())
    assert all("forward" not in block.__dict__ for block in blocks)  # the class's forward is back


def test_capture_keeps_a_forward_wrapper_set_on_the_instance():
    model = build_tiny("llama").eval()
    block = decoder_layers(model)[1]
    calls = []

    def wrapped(*args, **kwargs):  # as accelerate's device hooks install one
        calls.append(1)
        return type(block).forward(block, *args, **kwargs)

    block.forward = wrapped
    capture_block_inputs(model, make_batches(1, 2, 16))
    assert block.forward is wrapped and calls == []
    with torch.no_grad():
        model(**make_batches(1, 2, 16)[0])
    assert calls == [1]
