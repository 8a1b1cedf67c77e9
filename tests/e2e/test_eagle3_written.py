"""EAGLE-3 heads written by ``nanospec_vllm.tools.eagle.format3`` on the real vLLM engine (0.5B target).

A random head is accepted almost never, so it cannot tell a right draft-vocabulary map from a wrong one. These
heads draft something known instead: "repeat the last token". vLLM's Qwen2 hands an EAGLE-3 head the residual
stream entering each aux layer; aux layer 24 of 24 is the target's last pre-norm state. With
``fc = [0, 0, I]`` (pass that state through), attention and MLP outputs zero (``o_proj = down_proj = 0``), the
head's ``norm`` = the target's final norm and its lm_head = the target's rows, the head computes the target's own
logits at the last verified position, whose argmax is the token just emitted; fed back, the same state drafts it
again. So the drafts are ``[last] * K``, and vLLM's accepted count can be predicted from the output alone: at each
step, the run of copies of the last token that follows (capped at K), when the draft vocabulary holds it.

The reduced vocabulary (:func:`~nanospec_vllm.tools.eagle.format3.draft_vocab`) holds the digits and special ids
plus 4,000 random ids above 20,000, so the digits' rows have non-zero ``d2t`` offsets: a map applied wrongly
anywhere (writer, vLLM, NanoSpec's draft-row index) drafts other ids, which the prompts (long runs of one digit)
reject. The test checks that the prediction holds with the right ``d2t``, fails with ``d2t`` shifted by one,
and that NanoSpec (shipped defaults) keeps the acceptance and the tokens; the same for a full-vocabulary head
(no ``d2t``, the target's lm_head shared). With every id active, NanoSpec's drafts on this accepted head equal
vLLM's head's position by position (the debug recorder's ``drafts``), and a bug planted in NanoSpec's own ``d2t``
row map (``engine_job.py``'s ``d2t-shift``) breaks that equality and the acceptance.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nanospec_vllm.tools.eagle.format import write_head
from nanospec_vllm.tools.eagle.format3 import check_tensors3, draft_vocab, eagle3_config, random_tensors3

from .conftest import run_engine, worker_key

pytestmark = pytest.mark.e2e
K = 3
MAX_TOKENS = 48
PROMPTS = ["Write the digit 0 exactly 80 times in a row, with no spaces and nothing else.",
           "Print sixty ones in a row, like 1111111111, and no other text.",
           "Output the digit 7 repeated 50 times without any separators."]
DIGITS = list(range(15, 25))  # Qwen2 tokenizer: "0".."9" are single tokens 15..24


def _target_tensors(target) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names = set(st.keys())
            for k in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
                if k in names:
                    out[k] = st.get_tensor(k)
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def repeat_head(dest, target, vocab: dict | None, shift: int = 0):
    """The "repeat the last token" EAGLE-3 head (see the module docstring); ``vocab`` None: full vocabulary."""
    tcfg = json.loads((target / "config.json").read_text())
    n, h = tcfg["num_hidden_layers"], tcfg["hidden_size"]
    cfg = eagle3_config(tcfg, None if vocab is None else len(vocab["ids"]), aux_layers=[2, n // 2, n])
    t = random_tensors3(cfg, seed=1)
    tt = _target_tensors(target)
    fc = torch.zeros(h, 3 * h)
    fc[:, 2 * h:] = torch.eye(h)
    t["fc.weight"] = fc.to(torch.bfloat16)
    t["midlayer.self_attn.o_proj.weight"].zero_()
    t["midlayer.mlp.down_proj.weight"].zero_()
    t["norm.weight"] = tt["model.norm.weight"].to(torch.bfloat16)
    if vocab is not None:
        t["lm_head.weight"] = tt["lm_head.weight"][vocab["ids"]].to(torch.bfloat16)
        ids = vocab["ids"] + shift
        t["d2t"] = ids - torch.arange(len(ids))
        t2d = torch.zeros_like(vocab["t2d"])
        t2d[ids] = True
        t["t2d"] = t2d
    return write_head(dest, cfg, t, check=check_tensors3)


def predicted(outputs: list[list[int]], in_vocab, k: int = K) -> int:
    """Accepted drafts if every draft is the last emitted token: per step, the following run of copies (<= k)."""
    total = 0
    for out in outputs:
        p = 0
        while p < len(out) - 1:
            a = 0
            if in_vocab(out[p]):
                while a < k and p + 1 + a < len(out) and out[p + 1 + a] == out[p]:
                    a += 1
            total += a
            p += a + 1
    return total


@pytest.fixture(scope="module")
def setup(qwen05b, tmp_path_factory):
    work = tmp_path_factory.mktemp("eagle3-written")
    tcfg = json.loads((qwen05b / "config.json").read_text())
    v = tcfg["vocab_size"]
    counts = torch.zeros(v, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    counts[torch.randperm(v - 20_000, generator=g)[:4000] + 20_000] = 1
    counts[DIGITS] = 10
    vocab = draft_vocab(counts, 4000 + len(DIGITS) + 2, pinned=[151643, 151645])
    heads = {"reduced": repeat_head(work / "reduced", qwen05b, vocab),
             "shifted": repeat_head(work / "shifted", qwen05b, vocab, shift=1),
             "full": repeat_head(work / "full", qwen05b, None)}
    return work, vocab, heads


def _run(qwen05b, work, head, nanospec=None, **job) -> dict:
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": K}
    if nanospec is not None:
        spec["nanospec"] = nanospec
    return run_engine(dict(job, model=str(qwen05b), prompts=PROMPTS, max_tokens=MAX_TOKENS, spec=spec), work)


def _acc(res) -> tuple[int, int]:
    m = res["metrics"]
    return int(m["vllm:spec_decode_num_accepted_tokens"]), int(m["vllm:spec_decode_num_draft_tokens"])


def test_writers_heads_have_the_layout_vllm_was_given(setup):
    _, vocab, heads = setup
    d2t_digits = vocab["d2t"][: len(DIGITS)]
    assert (vocab["ids"][: len(DIGITS)] == torch.tensor(DIGITS)).all() and (d2t_digits == 15).all()
    with safe_open(str(heads["full"] / "model.safetensors"), "pt") as st:
        names = set(st.keys())
    assert "lm_head.weight" not in names and "d2t" not in names


def test_reduced_vocabulary_d2t_drafts_what_was_predicted_and_nanospec_keeps_it(qwen05b, setup):
    work, vocab, heads = setup
    off = _run(qwen05b, work, heads["reduced"])
    acc_off, drafts_off = _acc(off)
    in_vocab = set(vocab["ids"].tolist()).__contains__
    want = predicted(off["tokens"], in_vocab)
    assert want >= 30, f"the prompts gave too few repeated digits to test with: {off['tokens']}"
    # near-ties in bf16 may flip a few drafts: the prediction must hold within 10%
    assert abs(acc_off - want) <= 0.1 * want, (acc_off, want, drafts_off)

    shifted = _run(qwen05b, work, heads["shifted"])
    acc_shift, drafts_shift = _acc(shifted)
    assert drafts_shift > 0 and acc_shift <= 0.1 * want, (acc_shift, want)  # a wrong map is caught

    on = _run(qwen05b, work, heads["reduced"], nanospec={})
    acc_on, drafts_on = _acc(on)
    print(f"reduced: predicted {want}, accepted {acc_off}/{drafts_off}; shifted d2t {acc_shift}/{drafts_shift}; "
          f"NanoSpec {acc_on}/{drafts_on}")
    assert on["tokens"] == off["tokens"]
    assert drafts_on > 0 and acc_on >= 0.9 * acc_off, (acc_on, acc_off)
    (pool,) = on["pool"]
    assert pool["head_rows"] == len(vocab["ids"]) and pool["row_index"] is True and pool["in_use"] == 0


def test_full_vocabulary_head_shares_the_targets_lm_head_and_nanospec_keeps_it(qwen05b, setup):
    work, _, heads = setup
    off = _run(qwen05b, work, heads["full"])
    acc_off, _ = _acc(off)
    want = predicted(off["tokens"], lambda _: True)
    assert want >= 30 and abs(acc_off - want) <= 0.1 * want, (acc_off, want)
    on = _run(qwen05b, work, heads["full"], nanospec={})
    acc_on, drafts_on = _acc(on)
    print(f"full: predicted {want}, accepted {acc_off}; NanoSpec {acc_on}/{drafts_on}")
    assert on["tokens"] == off["tokens"]
    assert drafts_on > 0 and acc_on >= 0.9 * acc_off, (acc_on, acc_off)
    (pool,) = on["pool"]
    assert pool["head_rows"] == 151_936 and pool["row_index"] is False


def _drafts(res) -> list[list[list[int]]]:
    """Per request (in prompt order), each drafting step's draft ids, from the worker's debug recorder."""
    (dbg,) = res["debug"]
    return [dbg["drafts"][worker_key(dbg["drafts"], ext)] for ext in res["request_ids"]]


def test_every_id_active_drafts_vllms_ids_position_by_position_and_a_wrong_d2t_fails(qwen05b, setup):
    work, _, heads = setup
    every = work / "every-id.txt"
    every.write_text("\n".join(str(i) for i in range(151_936)))
    # every id active, scored in the weight's dtype (dense strategy: vLLM's bf16 ties reproduced), nothing guarded
    cfg = {"hot_set_path": str(every), "hot_set_size": None, "capacity": 151_937, "target_topk": 0,
           "dense_fallback_ratio": 1e-6, "always_active_special_ids": False, "guard_coverage": 0}
    job = {"env": {"NANOSPEC_DEBUG_RECORD": 1}}
    n = len(PROMPTS)
    vllm_head = _run(qwen05b, work, heads["reduced"], cfg, switches=[0] * n, **job)  # switched off: vLLM drafts
    mine = _run(qwen05b, work, heads["reduced"], cfg, switches=[1] * n, **job)
    bad = _run(qwen05b, work, heads["reduced"], cfg, switches=[1] * n, inject="d2t-shift", **job)
    t_v, t_m, t_b = (r["pool"][0]["totals"] for r in (vllm_head, mine, bad))
    assert t_v["sparse_rows"] == 0 and t_m["sparse_rows"] > 0 and t_m["fallback"] == 0, (t_v, t_m)
    assert t_b["sparse_rows"] > 0 and t_b["no_step"] == t_m["no_step"] == 0, t_b
    acc_v, drafts_v = _acc(vllm_head)
    acc_m, drafts_m = _acc(mine)
    acc_b, drafts_b = _acc(bad)
    print(f"every id active: vLLM's head {acc_v}/{drafts_v}, NanoSpec {acc_m}/{drafts_m}, "
          f"NanoSpec with d2t+1 {acc_b}/{drafts_b}")
    assert acc_v >= 30, "the repeat head must be accepted for this test to have power"
    assert mine["tokens"] == vllm_head["tokens"] == bad["tokens"]  # lossless even with the planted bug
    d_v, d_m, d_b = _drafts(vllm_head), _drafts(mine), _drafts(bad)
    steps = sum(len(d) for d in d_v)
    assert steps > 0 and d_m == d_v, "NanoSpec with every id active must draft vLLM's head's ids, step by step"
    assert (acc_m, drafts_m) == (acc_v, drafts_v)
    # the planted bug: drafts differ at most positions and acceptance collapses
    same = sum(a == b for rv, rb in zip(d_v, d_b) for sv, sb in zip(rv, rb) for a, b in zip(sv, sb))
    assert same < 0.5 * steps * K, (same, steps)
    assert acc_b <= 0.2 * acc_v, (acc_b, acc_v)
