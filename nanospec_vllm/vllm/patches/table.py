"""Print the patch register as the markdown table in ``docs/architecture.md``:
``python -m nanospec_vllm.vllm.patches.table``."""

from . import markdown_table

if __name__ == "__main__":
    print(markdown_table(), end="")
