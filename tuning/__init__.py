"""Agentic hyperparameter tuning of LoRA fine-tuning: agents, backends, the study store, SEAL and QA."""
