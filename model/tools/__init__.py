"""Measuring tools: the training-step benchmark (``python -m model.tools.bench``), the roofline
under the step and the step's breakdown by operation class. Nothing in the package imports
them."""
