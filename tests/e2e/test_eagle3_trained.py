"""``nanospec train-eagle --arch eagle3 --quick`` end to end on the real Qwen2.5-Coder-0.5B target.

The toy run (6 calibration + 6 self-written prompts, 24 generated tokens each, 4 training steps) goes through
every stage: self-written prompts and generation with vLLM, the teacher-forced pass with the aux layers, the
draft vocabulary from the data's token counts, training with the training-time test, held-out acceptance with
vLLM's ``method: eagle3`` (so the head loads and drafts), atomic publish with a card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanospec_vllm.tools.eagle.format3 import check_tensors3

pytestmark = pytest.mark.e2e


def test_train_eagle3_quick(qwen05b, tmp_path):
    out = tmp_path / "head"
    env = dict(os.environ, NANOSPEC_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "nanospec_vllm.cli", "train-eagle", str(qwen05b), "--arch", "eagle3",
                        "--quick", "-q", "--data", "calibration,selfprompt", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=2400, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert p.stdout.strip().splitlines()[-1] == str(out)
    assert sorted(x.name for x in out.iterdir()) == ["card.json", "card.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    check_tensors3(cfg, tensors)
    assert cfg["draft_vocab_size"] == 32000 and cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 12, 21]
    card = json.loads((out / "card.json").read_text())
    assert card["kind"] == "eagle3" and card["training"]["steps"] == 4
    assert card["data"]["train_prompts"] == 12 and card["data"]["selfprompt"]["generated"] >= 6
    dv = card["training"]["draft_vocab"]
    # every id the training data holds fits in 32k here, so the draft vocabulary covers all of its tokens
    assert dv["data_tokens_covered"] == 1.0 and dv["distinct_ids_in_data"] <= 32000
    ids = torch.arange(32000) + tensors["d2t"]
    assert {151643, 151645} <= set(ids.tolist())
    acc = card["acceptance_heldout"]
    assert acc["num_drafts"] > 0 and len(acc["accept_per_pos"]) == 3
    assert "EAGLE-3" in (out / "card.md").read_text()
