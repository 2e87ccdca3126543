"""Training: distillation (ARD and step distillation), GAN fine-tuning, teacher training and the shared loop."""
