"""LoRA: low-rank adapters that fine-tune a run while its own weights stay frozen.

`config`: a recipe's `lora` section; `adapters`: putting them on a model, separating and merging
them; `run`: a LoRA run directory, whose checkpoints hold the adapters and name the run they
adapt; `training`: what a run trains and checkpoints.
"""
