"""PAT's quality levers: a mask that starts from a measured channel importance (the initial binary top-k follows
it), and distillation from the dense model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_dpruner.distillation import distillation_loss_sum
from hf_dpruner.pat import PATConfig, PATTrainer, get_pat_model, get_pat_modules, width_prune
from hf_dpruner.pat.channel_importance import (
    activation_channel_importance,
    logits_from_importance,
    taylor_channel_importance,
)

from testing_utils import PAT_LEARNED, build_tiny, make_batches, make_windows

LOUD, SILENT = 5, 11  # hidden channels made the most and the least important


def _model_with_a_loud_and_a_silent_channel():
    """Every RMSNorm on the residual stream scales channel LOUD by 20; channel SILENT is 0 on the whole residual
    stream (nothing writes it: embedding column, attention and MLP output rows are 0), so closing it changes
    nothing."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, SILENT] = 0.0
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[LOUD] = 20.0
            layer.self_attn.o_proj.weight[SILENT] = 0.0
            layer.mlp.down_proj.weight[SILENT] = 0.0
        model.model.norm.weight[LOUD] = 20.0
    return model


def test_logits_follow_the_importance_standardised():
    importance = torch.tensor([3.0, 0.5, 10.0, 1.0, 0.0])
    logits = logits_from_importance(importance, scale=2.0)
    assert torch.equal(torch.argsort(logits), torch.argsort(importance))
    assert logits.mean().abs() < 1e-5 and logits.std().item() == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(ValueError, match="finite, non-negative"):
        logits_from_importance(torch.tensor([1.0, -1.0]))


def test_activation_importance_ranks_the_loud_channel_first_and_the_silent_one_last():
    importance = activation_channel_importance(_model_with_a_loud_and_a_silent_channel(), make_batches(2, 2, 16))
    assert importance.shape == (64,) and int(importance.argmax()) == LOUD
    assert int(importance.argmin()) == SILENT and importance[SILENT] == 0


def test_taylor_importance_is_zero_for_a_channel_that_cannot_change_the_loss():
    model = get_pat_model(_model_with_a_loud_and_a_silent_channel(), PATConfig(**PAT_LEARNED, lora_r=0, hsm_rank=2))
    pat = get_pat_modules(model)
    importance = taylor_channel_importance(model, pat, make_batches(2, 2, 16))
    assert importance[SILENT] == 0 and bool((importance.sum() - importance[SILENT]) > 0)
    assert all(p.grad is None for p in model.parameters())  # only the gate was differentiated


@pytest.mark.parametrize("mask_init", ["activation", "taylor"])
def test_the_trainer_starts_the_mask_from_the_importance(tmp_path, mask_init):
    config = PATConfig(**PAT_LEARNED, pruning_ratio=0.25, lora_r=2, hsm_rank=2, mask_init=mask_init,
                       mask_init_samples=4)
    dataset = Dataset.from_dict({"input_ids": make_windows(8, 16).tolist()})
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", disable_tqdm=True)
    trainer = PATTrainer(model=_model_with_a_loud_and_a_silent_channel(), args=args, pat_config=config,
                         train_dataset=dataset)
    importance = trainer.initialize_mask()
    mask = trainer.pat.mask
    keep = mask.keep_mask()
    assert int(keep.sum()) == 48 and torch.equal(keep, torch.zeros(64, dtype=torch.bool).index_fill_(
        0, torch.argsort(importance, descending=True, stable=True)[:48], True))
    assert not keep[SILENT] and (mask_init == "taylor" or keep[LOUD])
    logits = mask.logits.detach().clone()
    trainer.train()  # already initialised: training starts from these logits, it does not measure again
    assert trainer.channel_importance is importance
    assert (mask.logits.detach() - logits).abs().max() < 0.1


def test_zeros_is_the_paper_and_measures_nothing(tmp_path):
    dataset = Dataset.from_dict({"input_ids": make_windows(4, 16).tolist()})
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", disable_tqdm=True)
    assert PATConfig().mask_init == "activation"  # the default; zeros is the paper's
    trainer = PATTrainer(model=build_tiny("llama"), args=args,
                         pat_config=PATConfig(**PAT_LEARNED, lora_r=0, hsm_rank=2, mask_init="zeros"),
                         train_dataset=dataset)
    assert trainer.initialize_mask() is None and bool((trainer.pat.mask.logits == 0).all())


@pytest.mark.parametrize("field, value, message", [
    ("mask_init", "random", "mask_init must be one of"),
    ("mask_init_samples", 0, "mask_init_samples must be a positive integer"),
    ("mask_init_scale", 0.0, "mask_init_scale must be > 0"),
])
def test_mask_init_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        PATConfig(**{field: value})


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_width_prune_keeps_the_important_channels_and_computes_the_masked_models_logits(arch, tied):
    """The one-shot peer: the kept channels are the top-k of the importance, the model is left unchanged, and the
    smaller model computes what the full model computes with the other channels closed on the residual stream."""
    model = build_tiny(arch, tie_word_embeddings=tied)
    with torch.no_grad():
        for layer in model.model.layers:  # give the norms distinct gains, so a wrong rescale would show
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    importance = torch.rand(64, generator=torch.Generator().manual_seed(1))
    small = width_prune(model, 0.25, [], importance=importance)
    keep = torch.argsort(importance, descending=True)[:48].sort().values
    assert small.config.hidden_size == 48 and small.num_parameters() < model.num_parameters()
    assert torch.equal(small.model.embed_tokens.weight, model.model.embed_tokens.weight[:, keep])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    pat_model = get_pat_model(model, PATConfig(**PAT_LEARNED, pruning_ratio=0.25, lora_r=0))
    gate = torch.zeros(64).index_fill_(0, keep, 1.0)
    x = make_windows(2, 16)
    with torch.no_grad(), get_pat_modules(pat_model).fixed_gate(gate):
        expected = pat_model(input_ids=x).logits
    torch.testing.assert_close(small(input_ids=x).logits, expected, atol=2e-5, rtol=1e-4)


def test_hidden_pruning_keeps_a_multiple_of_the_heads_so_the_export_saves_and_loads(tmp_path):
    # 72 channels, 9 heads of 8: 10% leaves 64.8 channels, which transformers refuses (not a multiple of 9)
    model = build_tiny("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    small = width_prune(model, 0.1, make_batches(2))
    assert small.config.hidden_size == 63
    small.save_pretrained(tmp_path / "width")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "width").config.hidden_size == 63
    pat = get_pat_modules(get_pat_model(build_tiny("llama", hidden_size=72, num_attention_heads=9,
                                                   num_key_value_heads=3), PATConfig(**PAT_LEARNED, pruning_ratio=0.1)))
    assert pat.mask.num_kept == 63


def test_width_prune_measures_the_activation_importance_and_checks_its_input():
    small = width_prune(_model_with_a_loud_and_a_silent_channel(), 0.25, make_batches(2, 2, 16))
    assert small.config.hidden_size == 48
    assert not (small.model.embed_tokens.weight == 0).all(0).any()  # the silent channel (a zero column) went
    with pytest.raises(ValueError, match=r"importance must have shape \(64,\)"):
        width_prune(build_tiny("llama"), 0.25, [], importance=torch.ones(10))
    with pytest.raises(ValueError, match="pruning_ratio must be a number in"):
        width_prune(build_tiny("llama"), 1.5, [], importance=torch.ones(64))
    with pytest.raises(ValueError, match="PAT supports the Llama family"):
        width_prune(build_tiny("gpt2"), 0.25, [], importance=torch.ones(64))


def _layer_output(model, module_path, batches, layer=0):
    outputs = []
    handle = model.model.layers[layer].get_submodule(module_path).register_forward_hook(
        lambda module, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat(outputs)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_compensation_refits_the_readers_of_the_residual_stream_by_least_squares(arch, tied):
    """The readers of the first block see exactly the inputs the maps are fitted on (the sliced embedding), so their
    outputs on the calibration tokens come closer to the dense ones than with the plain column selection; keeping
    every channel gives the identity map; a tied head is left as the column selection."""
    from hf_dpruner.pat.compensation import reader_maps

    model = build_tiny(arch, tie_word_embeddings=tied)
    batches = make_batches(4, 2, 16)
    importance = torch.rand(64, generator=torch.Generator().manual_seed(1))
    plain = width_prune(model, 0.25, batches, importance=importance)
    refit = width_prune(model, 0.25, batches, importance=importance, compensate=True)
    for path in ("self_attn.q_proj", "mlp.up_proj"):
        dense = _layer_output(model, path, batches)
        error = {name: (_layer_output(small, path, batches) - dense).pow(2).sum().item()
                 for name, small in (("plain", plain), ("refit", refit))}
        assert error["refit"] < 0.9 * error["plain"], (path, error)
    keep = torch.argsort(importance, descending=True)[:48].sort().values
    maps = reader_maps(model, keep, batches)
    assert ("final" in maps) == (not tied) and len(maps) == 2 * model.config.num_hidden_layers + (not tied)
    if tied:
        assert torch.equal(refit.lm_head.weight, refit.model.embed_tokens.weight)
    everything = reader_maps(model, torch.arange(64), batches, damping=1e-8)
    for m in everything.values():
        torch.testing.assert_close(m, torch.eye(64), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        reader_maps(model, keep, [])


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_a_refit_on_the_smaller_models_own_residual_stream_lowers_the_last_layers_errors(arch, tied):
    """The smaller model's norm output equals the kept-channel formula where both read the same residual (the first
    block), so the first block's maps agree; deeper, the refit also absorbs the earlier layers' errors."""
    from hf_dpruner.pat.compensation import reader_maps
    from hf_dpruner.pat.export import channel_subset_state_dict, smaller_model

    model = build_tiny(arch, tie_word_embeddings=tied)
    batches = make_batches(4, 2, 16)
    importance = torch.rand(64, generator=torch.Generator().manual_seed(1))
    keep = torch.argsort(importance, descending=True)[:48].sort().values
    first = reader_maps(model, keep, batches)
    small = smaller_model(model, channel_subset_state_dict(model, keep, reader_maps=first), 48)
    torch.testing.assert_close(reader_maps(model, keep, batches, small=small)["0_input_layernorm"],
                               first["0_input_layernorm"], atol=1e-5, rtol=1e-4)
    last = model.config.num_hidden_layers - 1

    def error(candidate, path):
        return (_layer_output(candidate, path, batches, last) - _layer_output(model, path, batches, last)
                ).pow(2).sum().item()

    once = width_prune(model, 0.25, batches, importance=importance, compensate=True)
    twice = width_prune(model, 0.25, batches, importance=importance, compensate=True, compensation_rounds=2)
    for path in ("self_attn.q_proj", "mlp.up_proj"):
        assert error(twice, path) < error(once, path)
    with pytest.raises(ValueError, match="compensation_rounds must be an integer >= 1"):
        width_prune(model, 0.25, batches, importance=importance, compensate=True, compensation_rounds=0)


def test_the_calibration_pass_drops_padding_and_restores_the_model_even_on_an_error():
    from hf_dpruner.pat.calibration import CalibrationBatch, calibration_pass

    model = build_tiny("llama").train()
    current, seen = CalibrationBatch(), []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: seen.append(current.tokens(out, out.shape[-1])))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    batches = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask}]
    assert calibration_pass([model], batches * 2, current, [handle]) == 4
    assert [t.shape[0] for t in seen] == [4, 4] and seen[0].dtype == torch.float32
    assert model.training and not model.model.norm._forward_hooks and current.attention_mask is None

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        calibration_pass([model], batches, current, [handle])
    assert model.training and not model.model.norm._forward_hooks


@pytest.mark.slow
def test_on_the_embedded_model_the_activation_choice_beats_a_random_one_before_any_training():
    """25% of the hidden channels closed, no training: by activation importance against a random 25%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.data import calibration_batches
    from hf_dpruner.evaluation import perplexity
    from hf_dpruner.resources import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = PATConfig(**PAT_LEARNED, pruning_ratio=0.25, lora_r=0)
    model = get_pat_model(AutoModelForCausalLM.from_pretrained(path), config)
    pat = get_pat_modules(model)
    batches = calibration_batches(load_corpus_texts("medical"), tokenizer, 256, 8, 4)
    with pat.fixed_gate(torch.ones(pat.mask.hidden_size)):
        importance = activation_channel_importance(model, batches)
    eval_texts = load_corpus_texts("medical", "eval")
    kept = pat.mask.num_kept
    choices = {"activation": torch.argsort(importance, descending=True)[:kept],
               "random": torch.randperm(pat.mask.hidden_size, generator=torch.Generator().manual_seed(0))[:kept]}
    ppl = {}
    for name, channels in choices.items():
        gate = torch.zeros(pat.mask.hidden_size).index_fill_(0, channels, 1.0)
        with pat.fixed_gate(gate):
            ppl[name] = perplexity(model, tokenizer, eval_texts, seq_len=512, max_tokens=4096,
                                   disable_tqdm=True)["perplexity"]
    print(f"medical perplexity with 25% of the channels closed, before training: {ppl}")
    assert ppl["activation"] < 0.5 * ppl["random"]


# ---- distillation from the dense model ----


def test_distillation_term_is_the_token_mean_kl_and_skips_padding():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, -100, -100]])
    total, count = distillation_loss_sum(student, teacher, labels, temperature=2.0)
    assert count == 4 + 2
    expected = 0.0
    for b, i in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:
        p = torch.softmax(teacher[b, i] / 2, -1)
        expected += 4 * float((p * (p.log() - torch.log_softmax(student[b, i] / 2, -1))).sum())
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss_sum(teacher, teacher, labels)[0]) == pytest.approx(0.0, abs=1e-5)


def test_the_teacher_is_the_base_model_with_lora_and_pat_switched_off(tmp_path):
    base = build_tiny("llama")
    batch = make_batches(1, 2, 16)[0]
    with torch.no_grad():
        expected = base(**batch).logits
    config = PATConfig(**PAT_LEARNED, pruning_ratio=0.25, lora_r=2, hsm_rank=2, distill_weight=0.5)
    trainer = _pat_trainer(tmp_path, build_tiny("llama"), config, steps=4)
    trainer.train()
    model = trainer.model
    with torch.no_grad():
        student = model(**batch).logits
        with model.disable_adapter(), trainer.pat.bypassed():
            teacher = model(**batch).logits
    torch.testing.assert_close(teacher, expected)
    assert (student - expected).abs().max() > 1e-3  # trained and masked: the student differs
    assert "pat_distill_loss" in trainer._pat_terms and trainer._pat_terms["pat_distill_loss"] > 0


def test_distillation_counts_the_same_under_gradient_accumulation(tmp_path):
    """4 windows in one batch, or 2 + 2 accumulated: the same trained PAT modules and LoRA (SGD)."""
    states = []
    for batch, accumulation in ((4, 1), (2, 2)):
        config = PATConfig(**PAT_LEARNED, pruning_ratio=0.25, lora_r=2, hsm_rank=2, distill_weight=0.7,
                           distill_temperature=2.0)
        trainer = _pat_trainer(tmp_path / f"{batch}", build_tiny("llama"), config, steps=3, optim="sgd",
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        states.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad})
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


def _pat_trainer(tmp_path, model, config, steps, **overrides):
    dataset = Dataset.from_dict({"input_ids": make_windows(32, 16).tolist()})
    settings = dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                    save_strategy="no", disable_tqdm=True, logging_steps=1)
    args = TrainingArguments(str(tmp_path / "run"), **{**settings, **overrides})
    return PATTrainer(model=model, args=args, pat_config=config, train_dataset=dataset)


@pytest.mark.parametrize("field, value, message", [
    ("distill_weight", 1.5, "distill_weight must be in"),
    ("distill_temperature", 0.0, "distill_temperature must be > 0"),
])
def test_distillation_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        PATConfig(**{field: value})


@pytest.mark.parametrize("hsm_lr", [None, 5e-3])
def test_the_mask_and_the_hsms_get_their_own_learning_rates(tmp_path, hsm_lr):
    config = PATConfig(**PAT_LEARNED, lora_r=2, hsm_rank=2, mask_init="zeros", mask_learning_rate=3e-3,
                       hsm_learning_rate=hsm_lr)
    trainer = _pat_trainer(tmp_path, build_tiny("llama"), config, steps=1)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    hsm_params = [p for p in trainer.pat.hsms.parameters() if p.requires_grad]
    assert lr_of[id(trainer.pat.mask.logits)] == 3e-3
    assert {lr_of[id(p)] for p in hsm_params} == {hsm_lr or trainer.args.learning_rate}
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and {lr_of[id(p)] for p in lora} == {trainer.args.learning_rate}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(lr_of)  # each parameter once
