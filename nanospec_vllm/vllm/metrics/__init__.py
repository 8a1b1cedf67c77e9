"""NanoSpec statistics, split by the process that runs each part.

* :mod:`.worker` (model-runner process): :class:`StepStats` counts on the device and drains once per step into
  a small dict that rides on ``ModelRunnerOutput.nanospec_stats``;
* :mod:`.transport` (engine core and front end): how pending payloads merge, and the field they travel in: the
  scheduler patch puts them on ``SchedulerStats.nanospec_stats``, a dataclass field NanoSpec adds to vLLM's
  ``SchedulerStats`` (so vLLM's msgpack transport carries it) and that no vLLM code reads;
* :mod:`.frontend` (API server / ``LLM`` process): the ``StatLoggerManager.record`` patch takes that payload off
  and feeds :class:`FrontendMetrics` (Prometheus objects named ``nanospec_*``, and the periodic log line).

Metrics: ``nanospec_slots_in_use`` (gauge), ``nanospec_active_vocab_size`` (histogram of set sizes at draft time,
one observation per NanoSpec request per draft step), ``nanospec_target_tokens_total`` and
``nanospec_target_tokens_covered_total`` (tokens the target emitted at drafted positions, and how many were in
the active set when drafted), ``nanospec_ids_dropped_live`` (ids refused by full sets of live requests),
``nanospec_fallbacks_total`` (draft calls that had to use the full head), ``nanospec_guarded_drafts_total`` and
``nanospec_guard_fires_total`` (request draft steps the break-even guard sent to the full head, and how often a
request tripped it), ``nanospec_sparse_rows_total`` (request rows the sparse head scored, summed over draft
positions), ``nanospec_hooks_outside_step_total`` (draft hooks vLLM called outside ``sample_tokens``: vLLM's head
drafted them; 0 normally), ``nanospec_head_path_steps_total{path}`` (draft steps per sparse-head path:
per_request, union, dense) and ``nanospec_kernel{impl}`` (1 for the sparse head implementation in use).

Importing this package imports neither torch nor prometheus_client; each submodule imports what it needs.
"""

from .transport import SIZE_BUCKETS, STATS_FIELD, attach, merge_payloads, take

__all__ = ["SIZE_BUCKETS", "STATS_FIELD", "attach", "merge_payloads", "take"]
