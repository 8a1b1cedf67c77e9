"""EAGLE-1 heads for NanoSpec: the checkpoint format vLLM loads (``format``), the head in PyTorch and its loss
(``model``), self-distillation data (``data``), the ``nanospec train-eagle`` trainer (``train``), a child-process
vLLM job runner (``engine``) and a report-only evaluation (``evaluate``). Importing the package costs nothing.
"""
