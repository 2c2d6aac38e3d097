"""The examples in the docstrings of the public entry points run and print what they show (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

ENTRY_POINTS = {  # module -> the public objects whose docstrings must hold a runnable example
    "hf_dpruner.methods.base": ["prune_model"],
    "hf_dpruner.trainer": ["DPrunerTrainer"],
    "hf_dpruner.modeling": ["AutoPrunedModelForCausalLM"],
    "hf_dpruner.recovery.lora": ["get_masked_peft_model"],
    "hf_dpruner.pat.trainer": ["PATTrainer"],
    "hf_dpruner.pat.one_shot": ["width_prune"],
    "hf_dpruner.pat.neuron_pruning": ["prune_mlp_neurons"],
    "hf_dpruner.pat.neuron_selection": ["obs_neuron_selection"],
    "hf_dpruner.pat.teacher_reconstruction": ["reconstruct_to_teacher"],
    "hf_dpruner.pat.one_shot_neurons": ["prune_and_reconstruct"],
    "hf_dpruner.recovery.distillation_trainer": ["DistillationTrainer"],
}


@pytest.mark.parametrize("module_name", sorted(ENTRY_POINTS))
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write "out" write it here
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    examples = {test.name.rsplit(".", 1)[-1]: test for test in finder.find(module) if test.examples}
    for name in ENTRY_POINTS[module_name]:
        assert name in examples, f"{module_name}.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples.values():
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0 and results.attempted >= len(ENTRY_POINTS[module_name])
