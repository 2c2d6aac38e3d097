"""Block-wise reconstruction of a structurally pruned model toward the dense model it came from.

After one-shot structured pruning (e.g. `prune_mlp_neurons`), each decoder block of the smaller model is trained
(all its parameters, Adam) so that, on its own inputs — the outputs of the already reconstructed blocks before it —
it reproduces the dense block's outputs on the dense model's trajectory. It is the structured counterpart of the
unstructured recipe's reconstruction (`reconstruction.reconstruct_block`, which this reuses): one block in memory
at a time, no labels, and the calibration windows can mix domain and general text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..layerwise import BlockStep, capture_block_inputs
from ..reconstruction import autocast_dtype, reconstruct_block
from ..targets import decoder_layers


def reconstruct_to_teacher(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    epochs: int = 8,
    lr: float = 2e-3,
    precision: str = "auto",
    seed: int = 0,
    disable_tqdm: bool = False,
) -> list[tuple[float, float]]:
    """Train `student`'s blocks in place to reproduce `teacher`'s block outputs on the calibration `batches`
    (``input_ids``, optionally ``attention_mask``); returns each block's relative output error before and after.

    Both models must have as many decoder blocks and the same hidden size (a model pruned along the MLP neurons or
    attention heads of `teacher`, not its hidden channels). `precision` ('auto', 'float32', 'bfloat16') is the
    autocast of the passes, see `reconstruction.autocast_dtype`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_dpruner.pat import prune_mlp_neurons
        >>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> batches = [{"input_ids": torch.randint(0, 64, (2, 16))}]
        >>> small = prune_mlp_neurons(dense, 16, batches, selection="obs")
        >>> errors = reconstruct_to_teacher(small, dense, batches, epochs=2, disable_tqdm=True)
        >>> len(errors)
        2
    """
    student_blocks, teacher_blocks = decoder_layers(student), decoder_layers(teacher)
    if len(student_blocks) != len(teacher_blocks) or student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(f"The student ({len(student_blocks)} blocks, hidden size {student.config.hidden_size}) and "
                         f"the teacher ({len(teacher_blocks)} blocks, hidden size {teacher.config.hidden_size}) must "
                         "have as many blocks and the same hidden size; reconstruct models pruned along the MLP "
                         "neurons or attention heads, not the hidden channels.")
    if not batches:
        raise ValueError("reconstruct_to_teacher needs at least one calibration batch.")
    if epochs < 1 or not lr > 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got {epochs!r} and {lr!r}.")
    device = next(student.parameters()).device
    autocast = autocast_dtype(precision, device)
    flags = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    errors = []
    try:
        teacher_hidden, teacher_calls = capture_block_inputs(teacher, batches)
        student_hidden, student_calls = capture_block_inputs(student, batches)
        blocks = zip(student_blocks, teacher_blocks, strict=True)
        for i, (block, dense_block) in enumerate(tqdm(list(blocks), desc="reconstruct blocks", disable=disable_tqdm)):
            targets = BlockStep(i, dense_block, teacher_hidden, teacher_calls[i]).forward(autocast)
            inputs = [(h, args, kwargs) for h, (args, kwargs) in zip(student_hidden, student_calls[i], strict=True)]
            masks = {p: torch.ones_like(p, dtype=torch.bool) for p in block.parameters()}
            errors.append(reconstruct_block(block, inputs, targets, masks, epochs=epochs, lr=lr, generator=generator,
                                            autocast=autocast))
            teacher_hidden = targets
            student_hidden = BlockStep(i, block, student_hidden, student_calls[i]).forward(autocast)
    finally:
        student.train(flags[0])
        teacher.train(flags[1])
    return errors
