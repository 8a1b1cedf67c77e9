"""EAGLE heads for NanoSpec: the checkpoint formats vLLM loads (``format``: EAGLE-1, ``format3``: EAGLE-3 with an
optional reduced ``d2t`` vocabulary), the heads in PyTorch and their losses (``model``, ``model3``),
self-distillation data (``data``) and self-written prompts (``selfprompt``), the ``nanospec train-eagle`` trainer
(``train``), a child-process vLLM job runner (``engine``) and a report-only evaluation (``evaluate``). Importing
the package costs nothing.
"""
