"""Jinja templates of the model cards that hf_dpruner writes (installed as the package hf_dpruner.model_cards)."""
