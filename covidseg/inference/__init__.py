"""A checkpoint to answers: the inference path, apart from training.

Owns what a model file may say (``model_spec``), turning ``ckpt_path`` into networks without
running any code from the file (``loader``), the one object that owns the model's answer, with
ensembles, flip TTA, the lung restriction and the presence gate (``predictor``), the backends that
run it, torch or ONNX Runtime, and each image's result at its own size (``segment``), predict's
image files in and masks out (``image_files``), the files other runtimes read (``exporters``),
small-region removal (``regions``) and severity grading (``severity``). A new inference backend
goes in ``segment``.

Imports from: core, models.
"""
