"""EAGLE-1 head format and trainer module, without vLLM or real models.

The writer stores exactly the tensors vLLM's ``EagleLlamaForCausalLM`` loads (names, shapes), the config copies
the target's attention shape and says Llama; the PyTorch head computes what a Llama decoder layer with an
identity input norm computes (checked against transformers' ``LlamaDecoderLayer``); the restricted loss equals
the full one when the candidate set is the whole vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanospec_vllm.tools.eagle.format import (
    check_tensors,
    head_config,
    random_tensors,
    tensor_shapes,
    write_head,
)
from nanospec_vllm.tools.eagle.model import EagleHead, candidate_ids, eagle_loss

QWEN05 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
          "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "vocab_size": 151936,
          "max_position_embeddings": 32768, "tie_word_embeddings": False, "bos_token_id": 151643,
          "eos_token_id": 151645, "hidden_act": "silu", "sliding_window": None, "use_sliding_window": False}
SMALL = dict(QWEN05, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=500, head_dim=16, bos_token_id=1, eos_token_id=2)


def test_config_copies_target_shape_and_says_llama():
    cfg = head_config(QWEN05)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (14, 2, 64)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["vocab_size"] == 151936
    assert cfg["rope_parameters"]["rope_type"] == "default"
    assert cfg["attention_bias"] is False and cfg["tie_word_embeddings"] is False
    for k in ("sliding_window", "use_sliding_window", "num_hidden_layers_target"):
        assert k not in cfg


def test_tensor_names_and_shapes_match_vllm_eagle_loader():
    shapes = tensor_shapes(head_config(QWEN05))
    assert set(shapes) == {
        "fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"}
    assert shapes["fc.weight"] == (896, 1792)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (896, 896)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert shapes["layers.0.mlp.down_proj.weight"] == (896, 4864)
    # nothing vLLM would refuse (lm_head, input norm, final norm, embedding) or drop silently (biases)
    assert not [n for n in shapes if "lm_head" in n or "input_layernorm" in n or "embed" in n or n.startswith("norm")
                or n.endswith(".bias")]
    assert sum(torch.Size(s).numel() for s in shapes.values()) == pytest.approx(16.5e6, rel=0.03)


def test_write_head_atomic_and_checked(tmp_path):
    cfg = head_config(SMALL)
    t = random_tensors(cfg, seed=3)
    dest = write_head(tmp_path / "h", cfg, t, {"card.json": "{}"})
    assert sorted(p.name for p in dest.iterdir()) == ["card.json", "config.json", "model.safetensors"]
    stored = load_file(str(dest / "model.safetensors"))
    assert set(stored) == set(tensor_shapes(cfg)) and all(v.dtype == torch.bfloat16 for v in stored.values())
    assert json.loads((dest / "config.json").read_text()) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    write_head(dest, cfg, random_tensors(cfg, seed=4))  # replaces
    assert not torch.equal(load_file(str(dest / "model.safetensors"))["fc.weight"], stored["fc.weight"])
    with pytest.raises(ValueError, match="unexpected"):
        check_tensors(cfg, dict(t, **{"lm_head.weight": torch.zeros(500, 64)}))
    with pytest.raises(ValueError, match="unexpected"):
        check_tensors(cfg, dict(t, **{"layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match="shapes"):
        check_tensors(cfg, dict(t, **{"fc.weight": torch.zeros(64, 64)}))


def test_head_state_dict_is_the_checkpoint():
    cfg = head_config(SMALL)
    sd = EagleHead(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == tensor_shapes(cfg)


def test_head_matches_transformers_llama_layer_with_identity_input_norm():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = head_config(SMALL)
    torch.manual_seed(0)
    head = EagleHead(cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    lc = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    lc._attn_implementation = "eager"
    layer = LlamaDecoderLayer(lc, 0).double()
    sd = {k.removeprefix("layers.0."): v for k, v in head.state_dict().items() if k.startswith("layers.0.")}
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert missing == ["input_layernorm.weight"] and not unexpected
    layer.input_layernorm = torch.nn.Identity()
    t = 9
    emb, feat = torch.randn(t, 64, dtype=torch.double), torch.randn(t, 64, dtype=torch.double)
    pos = torch.arange(5, 5 + t)
    ours = head(emb, feat, pos)
    x = head.fc(torch.cat([emb, feat], -1))[None]
    cos, sin = LlamaRotaryEmbedding(lc)(x, pos[None])
    mask = torch.full((t, t), float("-inf"), dtype=torch.double).triu(1)[None, None]
    out = layer(x, attention_mask=mask, position_ids=pos[None], position_embeddings=(cos, sin))
    ref = out[0] if isinstance(out, tuple) else out
    # the head computes rope angles in fp32 (as vLLM does), hence ~1e-6 and not 1e-12
    torch.testing.assert_close(ours, ref[0], rtol=1e-5, atol=1e-5)


def test_restricted_loss_equals_full_over_whole_vocab_and_candidates_cover_labels():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(7, 64, generator=g), torch.randn(7, 64, generator=g)
    w = torch.randn(500, 64, generator=g)
    full = eagle_loss(pred, tgt, w)
    restricted = eagle_loss(pred, tgt, w, cand=(torch.arange(500), torch.zeros(500)))
    for k in ("loss", "l1", "ce", "acc"):
        torch.testing.assert_close(full[k], restricted[k])
    part = eagle_loss(pred, tgt, w, cand=(torch.arange(100), torch.zeros(100)))
    assert not torch.allclose(part["ce"], full["ce"])  # a real subset scores fewer rows
    labels = torch.tensor([3, 499, 3, 42])
    c, logw = candidate_ids(labels, 500, 50, g)
    assert set(labels.tolist()) <= set(c.tolist()) and torch.equal(c, torch.sort(c).values)
    assert len(set(c.tolist())) == len(c)
    pos = torch.isin(c, labels)
    assert (logw[pos] == 0).all() and torch.allclose(logw[~pos].exp().sum(), torch.tensor(497.0))


def test_sampled_softmax_estimates_the_full_loss():
    g = torch.Generator().manual_seed(1)
    v, h = 5000, 32
    w = torch.randn(v, h, generator=g) * 0.3
    pred, tgt = torch.randn(20, h, generator=g), torch.randn(20, h, generator=g)
    full = float(eagle_loss(pred, tgt, w)["ce"])
    est = [float(eagle_loss(pred, tgt, w, cand=candidate_ids(torch.tensor([1, 2]), v, 1000, g))["ce"])
           for _ in range(20)]
    assert abs(sum(est) / len(est) - full) < 0.05 * full


@pytest.mark.parametrize("steps", [2, 3])
def test_unrolled_passes_equal_incremental_drafting(steps):
    """Pass s at base i must equal what a plain causal forward computes on the sequence the draft loop builds:
    the teacher-forced inputs 0..i, then the fed-back outputs of the earlier passes at positions i+1..i+s."""
    cfg = head_config(SMALL)
    torch.manual_seed(1)
    head = EagleHead(cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    t = 7
    emb, feat = torch.randn(t, 64, dtype=torch.double), torch.randn(t, 64, dtype=torch.double)
    pos = torch.arange(t)
    outs = head.forward_unrolled(emb, feat, pos, steps)
    assert [o.shape[0] for o in outs] == [t - s for s in range(steps)]
    torch.testing.assert_close(outs[0], head(emb, feat, pos))
    for i in range(t - steps + 1):
        e, f, p_ = emb[: i + 1], feat[: i + 1], pos[: i + 1]
        for s in range(1, steps):
            prev = head(e, f, p_)[-1:]  # the last draft's output is the next step's feature
            e, f, p_ = torch.cat([e, emb[i + s: i + s + 1]]), torch.cat([f, prev]), torch.cat([p_, pos[i:i + 1] + s])
            torch.testing.assert_close(outs[s][i], head(e, f, p_)[-1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("unroll", [1, 2])
def test_trainer_steps_at_toy_size(unroll):
    from nanospec_vllm.tools.eagle import train as tr

    cfg = head_config(SMALL)
    g = torch.Generator().manual_seed(0)
    lens = [12, 9, 15]
    n = sum(lens)
    feats = {"features": torch.randn(n, 64, generator=g).to(torch.bfloat16),
             "ids": torch.randint(0, 500, (n,), generator=g),
             "offsets": torch.tensor([0, 12, 21, 36]), "prompt_lens": torch.tensor([4, 4, 4])}
    emb = torch.randn(500, 64, generator=g).to(torch.bfloat16)
    a = tr.build_parser().parse_args(["x", "--steps", "3", "--tokens-per-step", "20", "--neg", "50",
                                      "--unroll", str(unroll), "--threads", "1"])
    tensors, stats = tr.train(a, cfg, feats, emb, emb, progress=False)
    assert stats["steps"] == 3 and set(tensors) == set(tensor_shapes(cfg))
    assert all(torch.isfinite(c["loss"]) if isinstance(c["loss"], torch.Tensor) else c["loss"] == c["loss"]
               for c in stats["curve"])
    assert ("acc2" in stats["curve"][-1]) == (unroll == 2)


def test_random_weights_head_for_any_target_folder(tmp_path):
    from nanospec_vllm.tools.eagle import train as tr

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(SMALL))
    out = tr.train_eagle([str(target), "--random-weights", "--seed", "3", "--out", str(tmp_path / "h")])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 500
    tensors = load_file(str(out / "model.safetensors"))
    check_tensors(cfg, tensors)
    assert json.loads((out / "card.json").read_text())["kind"] == "eagle1-random"
    again = tr.train_eagle([str(target), "--random-weights", "--seed", "3", "--out", str(tmp_path / "h2")])
    assert torch.equal(load_file(str(again / "model.safetensors"))["fc.weight"], tensors["fc.weight"])
