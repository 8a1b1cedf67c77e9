"""EAGLE-3 head format, head module and trainer, without real models (tiny random heads).

The writer's tensors are loaded by vLLM's own ``Eagle3LlamaForCausalLM`` (built on a tiny Qwen2 target config):
every parameter vLLM has, except the embedding it shares from the target (and the lm_head when shared), must be
filled from the checkpoint with the written values, for a reduced vocabulary with ``d2t``, an own full-size
lm_head and a shared one. The draft vocabulary follows the ``target = draft_row + d2t[draft_row]`` convention.
The training-time test equals drafting step by step, and the trainer runs at toy size.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanospec_vllm.tools.eagle.format import write_head
from nanospec_vllm.tools.eagle.format3 import (
    check_tensors3,
    default_aux_layers,
    draft_vocab,
    eagle3_config,
    random_tensors3,
    tensor_shapes3,
)
from nanospec_vllm.tools.eagle.model import candidate_ids
from nanospec_vllm.tools.eagle.model3 import Eagle3Head, eagle3_loss

from .test_eagle_format import QWEN05

SMALL = dict(QWEN05, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=500, head_dim=16, bos_token_id=1, eos_token_id=2, num_hidden_layers=8,
             max_position_embeddings=512)


def test_config_for_the_05b_target():
    cfg = eagle3_config(QWEN05, 32000)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [2, 12, 21]}  # vLLM's default for 24
    assert default_aux_layers(24) == [2, 12, 21]
    assert (cfg["draft_vocab_size"], cfg["vocab_size"], cfg["target_hidden_size"]) == (32000, 151936, 896)
    assert cfg["num_hidden_layers"] == 1 and cfg["attention_bias"] is False
    assert eagle3_config(QWEN05)["draft_vocab_size"] == 151936
    with pytest.raises(ValueError, match="increasing"):
        eagle3_config(dict(QWEN05, num_hidden_layers=6))  # default (2, 3, 3): vLLM would dedupe to two layers
    with pytest.raises(ValueError, match="draft_vocab_size"):
        eagle3_config(QWEN05, 200_000)


def test_tensor_shapes_at_05b():
    cfg = eagle3_config(QWEN05, 32000)
    s = tensor_shapes3(cfg)
    assert s["fc.weight"] == (896, 3 * 896)
    assert s["midlayer.self_attn.q_proj.weight"] == (896, 2 * 896)
    assert s["midlayer.self_attn.k_proj.weight"] == (128, 2 * 896)
    assert s["midlayer.self_attn.o_proj.weight"] == (896, 896)
    assert s["midlayer.mlp.down_proj.weight"] == (896, 4864)
    assert s["lm_head.weight"] == (32000, 896) and s["d2t"] == (32000,) and s["t2d"] == (151936,)
    assert {"midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "norm.weight",
            "midlayer.post_attention_layernorm.weight"} <= set(s)
    assert not [n for n in s if "embed" in n or n.endswith(".bias")]
    full = eagle3_config(QWEN05)
    assert "lm_head.weight" not in tensor_shapes3(full) and "d2t" not in tensor_shapes3(full)
    assert tensor_shapes3(full, "own")["lm_head.weight"] == (151936, 896)
    with pytest.raises(ValueError):
        tensor_shapes3(cfg, "shared")  # a reduced vocabulary needs its own lm_head


def test_draft_vocab_from_counts():
    counts = torch.zeros(50, dtype=torch.int64)
    counts[[40, 7, 9, 30]] = torch.tensor([5, 9, 5, 1])
    dv = draft_vocab(counts, 6, pinned=[49])
    # pinned 49, then 7 (9), 9 and 40 (5 each, lower id first), 30 (1), then the lowest uncounted id (0)
    assert dv["ids"].tolist() == [0, 7, 9, 30, 40, 49]
    assert torch.equal(torch.arange(6) + dv["d2t"], dv["ids"])  # target_id = draft_row + d2t[draft_row]
    assert dv["t2d"].nonzero().flatten().tolist() == [0, 7, 9, 30, 40, 49] and dv["t2d"].dtype == torch.bool
    assert draft_vocab(counts, 2)["ids"].tolist() == [7, 9]
    with pytest.raises(ValueError):
        draft_vocab(counts, 51)


def _reduced(seed: int = 0):
    cfg = eagle3_config(SMALL, 100)
    ids = torch.sort(torch.randperm(500, generator=torch.Generator().manual_seed(seed))[:100]).values
    return cfg, random_tensors3(cfg, seed=seed, vocab_ids=ids), ids


def test_check_and_write(tmp_path):
    cfg, t, ids = _reduced()
    assert torch.equal(torch.arange(100) + t["d2t"], ids)
    dest = write_head(tmp_path / "h", cfg, t, check=check_tensors3)
    stored = load_file(str(dest / "model.safetensors"))
    assert set(stored) == set(tensor_shapes3(cfg))
    assert stored["d2t"].dtype == torch.int64 and stored["t2d"].dtype == torch.bool
    assert torch.equal(stored["d2t"], t["d2t"]) and stored["fc.weight"].dtype == torch.bfloat16
    assert json.loads((dest / "config.json").read_text()) == cfg
    bad = dict(t, d2t=t["d2t"].flip(0))
    with pytest.raises(ValueError, match="increasing"):
        check_tensors3(cfg, bad)
    shifted = dict(t, t2d=t["t2d"].roll(1))
    with pytest.raises(ValueError, match="t2d"):
        check_tensors3(cfg, shifted)
    with pytest.raises(ValueError, match="missing"):
        check_tensors3(cfg, {k: v for k, v in t.items() if k != "d2t"})
    with pytest.raises(ValueError, match="unexpected"):
        check_tensors3(cfg, dict(t, **{"midlayer.self_attn.q_proj.bias": torch.zeros(64)}))
    full = eagle3_config(SMALL)
    check_tensors3(full, random_tensors3(full))  # shared lm_head: none stored
    check_tensors3(full, random_tensors3(full, "own"))


@pytest.fixture(scope="module")
def vllm_loader(tmp_path_factory):
    """Build vLLM's Eagle3LlamaForCausalLM for a head folder on a tiny Qwen2 target config (one TP rank)."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm.config import (
        ModelConfig,
        ParallelConfig,
        SpeculativeConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    target = tmp_path_factory.mktemp("target")
    (target / "config.json").write_text(json.dumps(dict(SMALL, torch_dtype="bfloat16")))
    mc = ModelConfig(model=str(target), skip_tokenizer_init=True, dtype="bfloat16")
    state = {"init": False}

    def build(head):
        sc = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=2, target_model_config=mc,
                               target_parallel_config=ParallelConfig())
        vc = VllmConfig(model_config=mc, speculative_config=sc)
        with set_current_vllm_config(vc):
            if not state["init"]:
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method="file://" + tempfile.mktemp())
                initialize_model_parallel(1, 1)
                state["init"] = True
            return Eagle3LlamaForCausalLM(vllm_config=vc)

    yield build
    if state["init"]:
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.mark.parametrize("mode", ["reduced", "own", "shared"])
def test_vllm_loads_every_parameter_from_the_writers_checkpoint(mode, vllm_loader, tmp_path):
    if mode == "reduced":
        cfg, t, ids = _reduced(seed=5)
    else:
        cfg = eagle3_config(SMALL)
        t, ids = random_tensors3(cfg, mode, seed=6), None
    head = write_head(tmp_path / mode, cfg, t, check=check_tensors3)
    model = vllm_loader(head)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(-7 if not p.is_floating_point() else float("nan"))
    model.load_weights(load_file(str(head / "model.safetensors")).items())
    shared = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if mode == "shared" else set())
    for name, p in params.items():
        if name == "lm_head.weight":
            p = p[: cfg["draft_vocab_size"]]  # vLLM pads the head's rows to a multiple of 64
        unfilled = (p == -7).any() if not p.is_floating_point() else p.isnan().any()
        assert bool(unfilled) == (name in shared), f"{name}: filled={not unfilled}"
    d = "model.layers.0."
    q, k, v = (t[f"midlayer.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(params[d + "self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    assert torch.equal(params[d + "mlp.gate_up_proj.weight"],
                       torch.cat([t["midlayer.mlp.gate_proj.weight"], t["midlayer.mlp.up_proj.weight"]]))
    assert torch.equal(params[d + "hidden_norm.weight"], t["midlayer.hidden_norm.weight"])
    assert torch.equal(params["model.fc.weight"], t["fc.weight"])
    if mode == "reduced":
        assert torch.equal(model.draft_id_to_target_id, t["d2t"])
        # vLLM's compute_logits puts draft row r at target id r + d2t[r]: the vocabulary the counts chose
        assert torch.equal(torch.arange(100) + model.draft_id_to_target_id, ids)
        assert torch.equal(params["lm_head.weight"][:100], t["lm_head.weight"])
    else:
        assert model.draft_id_to_target_id is None
    with pytest.raises(ValueError):  # the loader rejects a name it does not know: the name check is real
        model.load_weights([("midlayer.self_attn.bogus.weight", torch.zeros(3))])


def test_head_state_dict_is_the_checkpoint():
    cfg, _, _ = _reduced()
    sd = Eagle3Head(cfg).state_dict()
    want = {k: v for k, v in tensor_shapes3(cfg).items() if k not in ("d2t", "t2d")}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    full = eagle3_config(SMALL)
    assert {k: tuple(v.shape) for k, v in Eagle3Head(full, own_lm_head=False).state_dict().items()} == \
        tensor_shapes3(full)


@pytest.mark.parametrize("steps", [2, 3])
def test_training_time_test_equals_drafting_step_by_step(steps):
    """Pass s at base i equals a plain causal pass over the sequence vLLM's draft loop builds: fc(aux) at
    positions 0..i, then the pre-norm outputs fed back at positions i+1..i+s (embeddings of the next tokens)."""
    cfg, _, _ = _reduced()
    torch.manual_seed(2)
    head = Eagle3Head(cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    t = 7
    emb, aux = torch.randn(t, 64, dtype=torch.double), torch.randn(t, 192, dtype=torch.double)
    pos = torch.arange(3, 3 + t)
    outs = head.forward_unrolled(emb, aux, pos, steps)
    assert [o.shape[0] for o in outs] == [t - s for s in range(steps)]
    torch.testing.assert_close(outs[0], head(emb, aux, pos)[0])
    for i in range(t - steps + 1):
        e, x, p_ = emb[: i + 1], head.fc(aux[: i + 1]), pos[: i + 1]
        for s in range(1, steps):
            pre = head._block(e, x, p_, [], [], None)[1][-1:]
            e, x, p_ = torch.cat([e, emb[i + s: i + s + 1]]), torch.cat([x, pre]), torch.cat([p_, pos[i:i + 1] + s])
            torch.testing.assert_close(outs[s][i], head._block(e, x, p_, [], [], None)[0][-1], rtol=1e-9, atol=1e-9)


def test_loss_full_candidates_equal_no_sampling_and_mask():
    g = torch.Generator().manual_seed(0)
    out, tf = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    hw, tw = torch.randn(100, 64, generator=g), torch.randn(100, 64, generator=g)
    a = eagle3_loss(out, tf, hw, tw)
    b = eagle3_loss(out, tf, hw, tw, cand=(torch.arange(100), torch.zeros(100)))
    torch.testing.assert_close(a["ce"], b["ce"])
    m = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(eagle3_loss(out, tf, hw, tw, mask=m)["ce"], eagle3_loss(out[m], tf[m], hw, tw)["ce"])
    c, w = candidate_ids(torch.tensor([3, 9]), 100, 20, g)
    assert torch.isfinite(eagle3_loss(out, tf, hw, tw, cand=(c, w))["ce"])


def _toy_feats(g):
    lens = [12, 9, 15]
    n = sum(lens)
    return {"features": torch.randn(n, 64, generator=g).to(torch.bfloat16),
            "aux": torch.randn(n, 192, generator=g).to(torch.bfloat16),
            "ids": torch.randint(0, 500, (n,), generator=g),
            "offsets": torch.tensor([0, 12, 21, 36]), "prompt_lens": torch.tensor([4, 4, 4])}


@pytest.mark.parametrize("reduced", [True, False])
def test_trainer_steps_at_toy_size(reduced, tmp_path):
    from nanospec_vllm.tools.eagle import train as tr

    g = torch.Generator().manual_seed(0)
    feats = _toy_feats(g)
    emb = torch.randn(500, 64, generator=g).to(torch.bfloat16)
    lm = torch.randn(500, 64, generator=g).to(torch.bfloat16)
    vocab = draft_vocab(torch.bincount(feats["ids"], minlength=500), 100) if reduced else None
    cfg = eagle3_config(SMALL, 100 if reduced else None)
    a = tr.build_parser().parse_args(["x", "--arch", "eagle3", "--steps", "3", "--tokens-per-step", "20", "--neg",
                                      "50", "--unroll", "3", "--threads", "1"])
    tensors, stats = tr.train(a, cfg, feats, emb, lm, progress=False, vocab=vocab)
    assert stats["steps"] == 3 and len(stats["curve"]) == 3
    assert all(c["loss"] == c["loss"] and "acc3" in c and "l1" not in c for c in stats["curve"])
    eq = stats["loss_equivalence"]["after_training"]
    assert -1 <= eq["grad_cosine"] <= 1 and eq["full"]["ce"] > 0
    if reduced:
        tensors.update(d2t=vocab["d2t"], t2d=vocab["t2d"])
        # the reduced lm_head starts as the target's rows of the draft vocabulary (then trains)
        assert not torch.equal(tensors["lm_head.weight"], lm[vocab["ids"]].float())
    check_tensors3(cfg, tensors)
    head = write_head(tmp_path / "h", cfg, tensors, check=check_tensors3)
    assert set(load_file(str(head / "model.safetensors"))) == set(tensor_shapes3(cfg))


def test_fresh_head_lm_head_is_the_targets_rows_and_norms_are_one():
    from nanospec_vllm.tools.eagle.train import _new_head3

    cfg = eagle3_config(SMALL, 100)
    lm = torch.randn(500, 64).to(torch.bfloat16)
    vocab = draft_vocab(torch.arange(500).flip(0), 100)
    head = _new_head3(cfg, vocab, lm)
    assert torch.equal(head.lm_head.weight, lm[vocab["ids"]].float())
    assert torch.equal(head.norm.weight, torch.ones(64)) and head.fc.weight.std() < 0.03
    assert not hasattr(_new_head3(eagle3_config(SMALL), None, lm), "lm_head")  # full vocabulary: shared


def test_random_weights_eagle3_head_for_a_target_folder(tmp_path):
    from nanospec_vllm.tools.eagle import train as tr

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(SMALL))
    out = tr.train_eagle([str(target), "--arch", "eagle3", "--random-weights", "--draft-vocab", "100",
                          "--out", str(tmp_path / "h")])
    cfg = json.loads((out / "config.json").read_text())
    t = load_file(str(out / "model.safetensors"))
    check_tensors3(cfg, t)
    assert cfg["draft_vocab_size"] == 100 and cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert {1, 2} <= set((torch.arange(100) + t["d2t"]).tolist())  # BOS/EOS always in the draft vocabulary
    full = tr.train_eagle([str(target), "--arch", "eagle3", "--random-weights", "--draft-vocab", "0",
                           "--out", str(tmp_path / "f")])
    assert "lm_head.weight" not in load_file(str(full / "model.safetensors"))
    assert json.loads((full / "card.json").read_text())["kind"] == "eagle3-random-full"
