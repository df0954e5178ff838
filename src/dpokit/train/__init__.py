"""Training: losses, batching, reference log-probs and the Trainer subclass. Entry: `trainer.run_training`."""
