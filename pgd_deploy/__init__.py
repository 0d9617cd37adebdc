"""pgd-deploy: Prediction-Guided Distillation of dense detectors, export and serving.

Nothing heavy is imported here: `import pgd_deploy` must stay cheap and torch-free.
"""

__version__ = "0.1.0"
