"""What runs leave for people: eval's HTML report with its galleries, a run's learning curves,
a k-fold multirun's summary and an export's model card.

Imports from: core, inference.
"""
