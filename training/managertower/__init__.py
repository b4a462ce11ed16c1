"""ManagerTower training and evaluation: recipes (YAML), dataset readers, synthetic data, HF Trainer runs.

`python -m training.managertower --recipe NAME --output-dir DIR [--synthetic] [--deepspeed zero2] [--set K=V]`.
"""
