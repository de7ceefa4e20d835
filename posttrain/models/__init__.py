"""Loading and wrapping Hugging Face models: policy, reference, reward model, critic."""
