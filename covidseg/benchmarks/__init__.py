"""Figures, never timed tests: training and inference throughput of a recipe's network
(``throughput``), whole ``predict`` commands in fp32 and bf16 (``predict``), and the server under
load (``serve``). Each prints medians and spreads of interleaved rounds.

Imports from: core, data, models, inference, training, evaluation, serving, reports, and the commands.
"""
