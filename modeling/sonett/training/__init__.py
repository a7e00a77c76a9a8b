"""Training: pretraining, checkpoints, fine-tuning, task and vision training."""
