"""Helpers of ``benchmarks/train_effect.py``: the tasks and their data (``tasks``), the model and its packed
attention (``model``), the conditions and the batches they feed (``plan``), training and evaluation
(``train``), and the summary, JSON and plots (``report``)."""
