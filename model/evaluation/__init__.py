"""Evaluation: the forward pass training and evaluation share with the validation pass
(``forward``), the metrics it scores (``metrics``) and a pretraining's target alignment
(``diagnostics``)."""
