"""Evaluation of adapters: held-out loss per category (and, later, generation metrics)."""
