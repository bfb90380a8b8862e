"""Drafter training (`redrafter train-drafter`, docs/design.md §1): the frozen base model supplies
hidden states and targets (teacher.py), the drafter learns them over K unrolled steps (loss.py,
trainer.py), optionally with a reduced draft vocabulary (vocab.py); data.py reads text/JSONL
files, prompts.py builds the demo model's prompts, recipe.py ties it together, evaluate.py
measures accuracy and tokens/step with the real decode driver."""
