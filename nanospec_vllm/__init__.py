"""nanospec_vllm: NanoSpec for vLLM -- speculative decoding whose drafter scores only a small per-request
in-context vocabulary. The core (``config``, ``state``, ``ops``) never imports vLLM; ``nanospec_vllm.vllm``
holds everything that does. Importing this package is cheap (no torch, no vLLM)."""

__version__ = "0.1.0"
