"""Deployable checkpoints: a run's scheme written as a Hugging Face checkpoint by ModelOpt's exporter."""
