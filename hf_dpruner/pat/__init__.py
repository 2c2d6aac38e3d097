"""PAT, Pruning-Aware Tuning (Liu et al. 2024): structured pruning of the hidden channels learned during
fine-tuning, exported as a smaller standard transformers checkpoint."""

from .config import PAT_CONFIG_NAME, PATConfig
from .export import export_pat_model
from .hsm import HybridSparsificationModule
from .mask import SharedChannelMask
from .modules import SUPPORTED_MODEL_TYPES, PATModules, get_pat_model, get_pat_modules
from .neuron_pruning import neurons_for_parameters, prune_mlp_neurons
from .neuron_selection import obs_neuron_selection
from .one_shot import width_prune
from .one_shot_neurons import prune_and_reconstruct
from .teacher_reconstruction import reconstruct_to_teacher
from .trainer import PATTrainer

__all__ = [
    "PAT_CONFIG_NAME",
    "PATConfig",
    "PATModules",
    "PATTrainer",
    "HybridSparsificationModule",
    "SUPPORTED_MODEL_TYPES",
    "SharedChannelMask",
    "export_pat_model",
    "get_pat_model",
    "get_pat_modules",
    "neurons_for_parameters",
    "obs_neuron_selection",
    "prune_and_reconstruct",
    "prune_mlp_neurons",
    "reconstruct_to_teacher",
    "width_prune",
]
