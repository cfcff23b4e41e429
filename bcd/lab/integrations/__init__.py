"""Integrations with the tools around training: TensorBoard, the transformers Trainer."""
