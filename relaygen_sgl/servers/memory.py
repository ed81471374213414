"""What one SGLang 0.5.23 server of a preset holds on its GPU, in the order SGLang allocates it,
and so how many KV tokens it gets and how many trajectories of the preset's budget fit at once.
`up --dry-run`, `relaygen doctor`, `up` and launch/serve.sh all size servers here.

SGLang's order for one server (one GPU rank), and what this module counts for each step:
  1. the CUDA context, cuBLAS/NCCL and distributed init: before SGLang's memory baseline
     (distributed/bootstrap.py measure_pre_model_load_memory), so `pre` = free at start -
     context. Estimated (data/memory.toml [estimates]).
  2. the weights: parameters from the model's config (data/memory.toml) x dtype bytes / tp.
  3. the KV pool: (free after the weights) - pre x (1 - mem_fraction_static)
     (mem_cache/kv_cache_configurator.py _profile_available_bytes), divided by the bytes of one
     token (model_executor/pool_configurator.py: kv heads per rank x (k + v head dim) x layers x
     dtype bytes, plus the draft's layers for EAGLE/STANDALONE), then capped by
     --max-total-tokens. Weights + KV = fraction x pre: the fraction is of the memory free when
     THAT server starts, not of the card.
  4. after the pool, outside every fraction (SGLang leaves pre x (1 - fraction) for them):
     the request-to-token table ((max_running_requests + 1) x (context + 4 + draft tokens) x
     int32, mem_cache/memory_pool.py ReqToTokenPool; exact), FlashInfer's workspace (512 MiB
     for Qwen2/3, layers/attention/flashinfer_backend.py; none counted for FA3), the CUDA graphs
     (decode batch sizes x 2 MiB + prefill buckets x 8 MiB: SGLang's own reserve_for_graph_mb in
     arg_groups/memory_hook.py), the activations of one prefill chunk (estimated from the
     model's widths) and SGLang's constant 512 MiB of metadata and slack (memory_hook.py), plus
     tp/8 GiB for tensor parallelism (memory_hook.py).

On a shared device (one GPU, both servers) the second server starts once the first answers,
so it sees what the first left: free - (context + weights + KV + after-pool) of the first.
Both servers get the same number of KV tokens (a trajectory lives on both), pinned with
--max-total-tokens; what is left beyond both and the preset's runtime_reserve_gib stays free.
Every number here is an estimate from SGLang's allocation code; none was measured on a GPU."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from relaygen_sgl.core.config import ROLES, Preset, data_path, parallel_sizes
from relaygen_sgl.core.errors import ConfigError

GIB = float(1 << 30)
MIB = float(1 << 20)
# SGLang 0.5.23's constants (file paths inside the sglang package)
SLACK_GIB = 512 / 1024  # arg_groups/memory_hook.py: "Constant meta data (e.g., from attention backend) + activation
# slack"
DECODE_GRAPH_MIB = 2  # memory_hook.py reserve_for_graph_mb: per decode batch size captured (max_bs x 2)
PREFILL_GRAPH_MIB = 8  # memory_hook.py reserve_for_graph_mb: per prefill bucket captured
FLASHINFER_QWEN_MIB = 512  # layers/attention/flashinfer_backend.py: workspace for Qwen2/Qwen3 models
FLASHINFER_MIB = 384  # environ.py SGLANG_FLASHINFER_WORKSPACE_SIZE default
REQ_EXTRA_TOKENS = 4  # mem_cache/allocation_sizing.py get_req_to_token_extra_context_len (+ draft tokens)
SPECULATIVE_RUNNING = 48  # arg_groups/speculative_hook.py: max_running_requests when unset
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class Model:
    """A model's architecture, as its config.json gives it (data/memory.toml)."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    eagle3_draft_vocab: int = 0  # an EAGLE-3 head (see data/memory.toml)
    params_b: float | None = None
    source: str = ""

    @property
    def params(self) -> int:
        """Parameters SGLang loads onto the GPU (tied embeddings once; an EAGLE-3 head borrows
        the target's embeddings)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        width_in = 2 * h if self.eagle3_draft_vocab else h  # EAGLE-3: embeddings + target hidden
        layer = (width_in * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h
                 + (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0))
        if self.eagle3_draft_vocab:
            return self.layers * layer + 3 * h * h + self.eagle3_draft_vocab * h + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    def kv_bytes(self, dtype_bytes: int, tp: int = 1) -> int:
        """One token's K and V on one rank (pool_configurator.py _compute_cell_size:
        get_num_kv_heads(tp) = max(1, kv_heads // tp))."""
        return self.layers * max(1, self.kv_heads // tp) * self.head_dim * 2 * dtype_bytes

    def activation_bytes(self, dtype_bytes: int, tp: int = 1) -> int:
        """An estimate of one prefill token's live activations at a layer's peak: q/k/v and
        the attention output, the MLP's gate+up and its product, two hidden-size residuals."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (2 * q // tp + 2 * kv // tp + 3 * self.intermediate // tp + 2 * self.hidden) * dtype_bytes


@dataclass(frozen=True)
class Card:
    """A GPU as the plan sees it: its memory and SGLang's default attention backend there."""
    key: str
    name: str
    total_mib: float
    attention: str  # "fa3" | "flashinfer"
    free_mib: float | None = None  # measured (nvidia-smi); None: an idle card, estimated

    @property
    def free_gib(self) -> float:
        free = self.free_mib if self.free_mib is not None else self.total_mib - estimates().idle_reserved_mib
        return free / 1024

    @property
    def measured(self) -> bool:
        return self.free_mib is not None

    def describe(self) -> str:
        if self.measured:
            return f"{self.free_gib:.1f} GiB free (nvidia-smi)"
        return f"an idle {self.key} ({self.free_gib:.1f} GiB free, estimated)"


@dataclass(frozen=True)
class Estimates:
    idle_reserved_mib: float
    cuda_context_gib: float


@cache
def _data() -> dict[str, Any]:
    return tomllib.loads(data_path("memory.toml").read_text(encoding="utf-8"))


@cache
def estimates() -> Estimates:
    return Estimates(**_data()["estimates"])


@cache
def models() -> dict[str, Model]:
    raw = _data()["models"]
    out = {}
    for name, spec in raw.items():
        base = {k: v for k, v in raw[spec["like"]].items() if k != "params_b"} if "like" in spec else {}
        fields = {k: v for k, v in {**base, **spec}.items() if k != "like"}
        out[name] = Model(name=name, **fields)
    return out


def model(name: str) -> Model:
    found = models().get(name)
    if found is None:
        raise ConfigError(f"no architecture for {name!r} in launch/memory.toml: add its config.json numbers "
                          f"(known: {', '.join(sorted(models()))})")
    return found


@cache
def cards() -> dict[str, Card]:
    return {key: Card(key=key, **spec) for key, spec in _data()["cards"].items()}


def measured_card(name: str, total_mib: float, free_mib: float) -> Card:
    """A GPU nvidia-smi reported: Hopper (H100, H200, H20, GH200) gets FA3, others FlashInfer."""
    hopper = any(tag in name.upper() for tag in ("H100", "H200", "H800", "H20", "GH200"))
    return Card(key=name or "GPU", name=name or "GPU", total_mib=total_mib, attention="fa3" if hopper else "flashinfer",
                free_mib=free_mib)


def preset_cards(preset: Preset) -> tuple[Card, ...]:
    """The cards a GPU preset names (`cards` in presets.toml): the ones its plan fits."""
    found = cards()
    unknown = [c for c in preset.cards if c not in found]
    if unknown:
        raise ConfigError(f"preset {preset.name}: unknown cards {unknown}; known: {', '.join(found)}")
    return tuple(found[c] for c in preset.cards)


# ---------------------------------------------------------------- a server's shape, from its args
def _flag(args: Sequence[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in names:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _int(args: Sequence[str], *names: str) -> int | None:
    value = _flag(args, *names)
    return None if value is None else int(value)


@dataclass(frozen=True)
class Shape:
    """What a server's command line decides about its memory."""
    model: Model
    tp: int
    dtype_bytes: int
    kv_dtype_bytes: int
    context: int  # --context-length, else the model's: the most one trajectory can hold
    fraction: float | None  # --mem-fraction-static given in the preset
    max_total_tokens: int | None
    max_running_requests: int | None
    chunked_prefill: int | None  # None: SGLang's default for the card
    decode_max_bs: int | None
    draft: Model | None = None
    draft_tokens: int = 0
    cpu: bool = False

    @property
    def kv_bytes(self) -> int:
        cell = self.model.kv_bytes(self.kv_dtype_bytes, self.tp)
        if self.draft is not None:  # pool_configurator.py: the draft's layers at the target's per-layer size
            cell += cell * self.draft.layers // self.model.layers
        return cell

    @property
    def weights_gib(self) -> float:
        params = self.model.params + (self.draft.params if self.draft is not None else 0)
        return params * self.dtype_bytes / self.tp / GIB


def shape(preset: Preset, role: str, kv_tokens: int | None = None) -> Shape:
    """The memory-relevant part of a role's server command (its preset args, and `up
    --kv-tokens`, which becomes --max-total-tokens)."""
    spec = preset.roles[role]
    args = spec.args
    name = spec.local_model or spec.model or ""
    dtype = _flag(args, "--dtype") or "bfloat16"
    kv_dtype = _flag(args, "--kv-cache-dtype") or "auto"
    if dtype not in DTYPE_BYTES or (kv_dtype != "auto" and kv_dtype not in DTYPE_BYTES):
        raise ConfigError(f"preset {preset.name}.{role}: dtype {dtype}/{kv_dtype} has no size here; choose one of "
                          f"{', '.join(DTYPE_BYTES)}")
    m = model(name)
    draft_name = _flag(args, "--speculative-draft-model-path")
    speculative = _flag(args, "--speculative-algorithm") is not None
    cap = _int(args, "--max-total-tokens")
    if kv_tokens:
        cap = kv_tokens
    context = _int(args, "--context-length") or m.context
    running = _int(args, "--max-running-requests")
    return Shape(model=m, tp=parallel_sizes(args)["tp"],
                 dtype_bytes=DTYPE_BYTES[dtype], kv_dtype_bytes=DTYPE_BYTES[dtype if kv_dtype == "auto" else kv_dtype],
                 context=context, fraction=float(f) if (f := _flag(args, "--mem-fraction-static")) else None,
                 max_total_tokens=cap, max_running_requests=running if running or not speculative else
                 SPECULATIVE_RUNNING, chunked_prefill=_int(args, "--chunked-prefill-size"),
                 decode_max_bs=_int(args, "--cuda-graph-max-bs-decode"),
                 draft=model(draft_name) if draft_name else None,
                 draft_tokens=_int(args, "--speculative-num-draft-tokens") or 0, cpu=preset.device == "cpu")


# ---------------------------------------------------------------- after the pool
def sglang_defaults(card: Card, tp: int) -> tuple[int, int]:
    """SGLang 0.5.23's chunked prefill size and decode CUDA-graph batch size for a card
    (arg_groups/memory_hook.py handle_gpu_memory_settings, by nvidia-smi's total memory)."""
    mib = card.total_mib
    if mib < 20 * 1024:
        return 2048, 8
    if mib < 35 * 1024:
        return 4096, 48 if tp < 4 else 160
    if mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160
    if mib < 160 * 1024:
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def sglang_fraction(s: Shape, card: Card) -> float:
    """SGLang 0.5.23's own --mem-fraction-static when none is given (memory_hook.py
    handle_gpu_memory_settings): (total - reserved) / total, reserved = 512 MiB + 1.5 MiB per
    token of the prefill chunk (at least 2048) + tp/8 GiB + its CUDA-graph reserve, and at least
    10 GiB on a card of more than 60 GiB."""
    chunk, decode_bs = sglang_defaults(card, s.tp)
    chunk = s.chunked_prefill or chunk
    decode_bs = s.decode_max_bs or decode_bs
    reserved = (512 + max(chunk, 2048) * 1.5 + s.tp / 8 * 1024 + decode_bs * DECODE_GRAPH_MIB
                + prefill_buckets(chunk) * PREFILL_GRAPH_MIB)
    if card.total_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((card.total_mib - reserved) / card.total_mib, 3)


def prefill_buckets(max_tokens: int) -> int:
    """How many prefill CUDA graphs SGLang captures up to `max_tokens` (arg_groups/cuda_graph_hook.py
    generate_prefill_cuda_graph_batch_sizes; breakable prefill graphs are on by default on CUDA)."""
    sizes = (list(range(4, 33, 4)) + list(range(48, 257, 16)) + list(range(288, 513, 32))
             + list(range(576, 1025, 64)) + list(range(1280, 4097, 256)) + list(range(4608, max_tokens + 1, 512)))
    return sum(1 for s in sizes if s <= max_tokens)


def request_rows(s: Shape, kv_tokens: int) -> int:
    """Rows of the request-to-token table (kv_cache_configurator.py resolve_max_num_reqs)."""
    if s.max_running_requests is not None:
        return min(s.max_running_requests, kv_tokens // 2)
    estimated = max(min(int(kv_tokens / s.context * 512), 4096), 2048)
    return min(estimated, kv_tokens // 2)


@dataclass(frozen=True)
class After:
    """GiB a server allocates after its KV pool, which no --mem-fraction-static counts."""
    req_to_token: float  # exact (SGLang's formula)
    attention: float  # FlashInfer's workspace (exact); FA3's metadata is inside `slack`
    cuda_graphs: float  # SGLang's own reserve_for_graph_mb
    activations: float  # one prefill chunk (estimate)
    slack: float  # SGLang's constant 512 MiB
    parallel: float  # tp/8 GiB (SGLang's "adjustments for large parallel size")

    @property
    def total(self) -> float:
        return self.req_to_token + self.attention + self.cuda_graphs + self.activations + self.slack + self.parallel

    def to_dict(self) -> dict[str, float]:
        return {"req_to_token": round(self.req_to_token, 2), "attention_workspace": round(self.attention, 2),
                "cuda_graphs": round(self.cuda_graphs, 2), "activations": round(self.activations, 2),
                "sglang_slack": round(self.slack, 2), "tensor_parallel": round(self.parallel, 2),
                "total": round(self.total, 2)}


def after_pool(s: Shape, card: Card, kv_tokens: int) -> After:
    chunk, decode_bs = sglang_defaults(card, s.tp)
    chunk = s.chunked_prefill or chunk
    decode_bs = s.decode_max_bs or (min(decode_bs, s.max_running_requests) if s.max_running_requests else decode_bs)
    prefill_max = min(chunk, s.max_total_tokens) if s.max_total_tokens else chunk
    rows = request_rows(s, kv_tokens)
    req = (rows + 1) * (s.context + REQ_EXTRA_TOKENS + s.draft_tokens) * 4 / GIB
    attention = 0.0 if card.attention == "fa3" else FLASHINFER_QWEN_MIB * MIB / GIB
    graphs = (decode_bs * DECODE_GRAPH_MIB + prefill_buckets(prefill_max) * PREFILL_GRAPH_MIB) * MIB / GIB
    activations = chunk * s.model.activation_bytes(s.dtype_bytes, s.tp) / GIB
    return After(req, attention, graphs, activations, SLACK_GIB, s.tp / 8 if s.tp > 1 else 0.0)


# ---------------------------------------------------------------- one server
def trajectories_text(n: int) -> str:
    return f"{n} trajector{'y' if n == 1 else 'ies'}"


@dataclass(frozen=True)
class ServerMemory:
    """One server of a role, sized: what it finds free, holds, and can serve."""
    role: str
    kv_tokens: int
    kv_bytes: int  # per token, per rank
    trajectory_tokens: int  # the most one trajectory can hold (its context length)
    free_gib: float | None = None  # free on its GPU when it starts
    context_gib: float | None = None
    weights_gib: float | None = None
    fraction: float | None = None
    after: After | None = None
    pinned: bool = False  # its --max-total-tokens is set by the plan (a shared device)
    why: str = ""

    @property
    def kv_gib(self) -> float:
        return self.kv_tokens * self.kv_bytes / GIB

    @property
    def trajectories(self) -> int:
        return self.kv_tokens // self.trajectory_tokens

    @property
    def holds_gib(self) -> float:
        """What it holds once up: context + weights + KV + what it allocates after the pool."""
        return (self.context_gib or 0.0) + (self.weights_gib or 0.0) + self.kv_gib + (self.after.total if self.after
                                                                                          else 0.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kv_tokens": self.kv_tokens, "kv_gib": round(self.kv_gib, 2),
                               "kv_bytes_per_token": self.kv_bytes, "trajectory_tokens": self.trajectory_tokens,
                               "trajectories": self.trajectories}
        if self.free_gib is not None:
            out |= {"free_at_start_gib": round(self.free_gib, 2), "cuda_context_gib": self.context_gib,
                    "weights_gib": round(self.weights_gib or 0.0, 2), "mem_fraction_static": self.fraction,
                    "after_pool_gib": self.after.to_dict() if self.after else None,
                    "holds_gib": round(self.holds_gib, 2)}
        if self.why:
            out["why"] = self.why
        return out


def _pre(free_gib: float) -> float:
    return free_gib - estimates().cuda_context_gib


def size(s: Shape, card: Card, role: str, free_gib: float | None = None, fraction: float | None = None) -> ServerMemory:
    """SGLang's own rule for a server with a given fraction (the preset's), on `free_gib` free."""
    if s.cpu:
        if not s.max_total_tokens:
            raise ConfigError(f"the {role} CPU server needs --max-total-tokens (its pool is sized from host memory "
                              "otherwise)")
        return ServerMemory(role, s.max_total_tokens, s.kv_bytes, s.context,
                            why=f"--max-total-tokens {s.max_total_tokens} on the CPU")
    free = card.free_gib if free_gib is None else free_gib
    f = next(x for x in (fraction, s.fraction, sglang_fraction(s, card)) if x is not None)
    budget = f * _pre(free) - s.weights_gib
    tokens = max(0, int(budget * GIB // s.kv_bytes))
    if s.max_total_tokens:
        tokens = min(tokens, s.max_total_tokens)
    why = (f"SGLang: KV = {f} x ({free:.2f} free - {estimates().cuda_context_gib} context) - {s.weights_gib:.2f} "
           f"weights = {budget:.2f} GiB / {s.kv_bytes} B per token")
    return ServerMemory(role, tokens, s.kv_bytes, s.context, free, estimates().cuda_context_gib, s.weights_gib, f,
                        after_pool(s, card, tokens), why=why)


def _fraction_for(s: Shape, free_gib: float, tokens: int) -> float:
    """The least --mem-fraction-static (3 decimals, rounded up) that holds the weights and
    `tokens` of KV; with --max-total-tokens pinned at `tokens` SGLang allocates no more."""
    need = s.weights_gib + tokens * s.kv_bytes / GIB
    return math.ceil(need / _pre(free_gib) * 1000) / 1000


def sized(s: Shape, card: Card, role: str, free_gib: float, tokens: int, why: str) -> ServerMemory:
    f = _fraction_for(s, free_gib, tokens)
    return ServerMemory(role, tokens, s.kv_bytes, s.context, free_gib, estimates().cuda_context_gib, s.weights_gib,
                        f, after_pool(s, card, tokens), pinned=True, why=why)


def tokens_left(s: Shape, card: Card, free_gib: float, reserve_gib: float) -> int:
    """KV tokens a server can take from `free_gib`, leaving its own context and after-pool
    allocations and `reserve_gib` free (the request table's rows depend on the tokens: twice)."""
    tokens = 0
    for _ in range(3):
        room = _pre(free_gib) - s.weights_gib - after_pool(s, card, max(tokens, 2)).total - reserve_gib
        tokens = max(0, int(room * GIB // s.kv_bytes))
    return min(tokens, s.max_total_tokens) if s.max_total_tokens else tokens


# ---------------------------------------------------------------- a preset
@dataclass(frozen=True)
class MemoryPlan:
    """The first server of each role, sized; `source` says where the free memory came from."""
    preset: str
    servers: dict[str, ServerMemory]
    source: str
    shared: bool = False
    reserve_gib: float | None = None  # shared device: left free beyond both servers
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def trajectories(self) -> int:
        """Trajectories of the budget that fit at once: each lives on both servers."""
        return min(s.trajectories for s in self.servers.values())

    @property
    def fits(self) -> bool:
        return self.trajectories >= 1

    @property
    def verdict(self) -> str:
        parts = [f"{r} {s.kv_tokens:,} KV tokens ({s.trajectories} x {s.trajectory_tokens:,})"
                 for r, s in self.servers.items()]
        head = f"{', '.join(parts)} on {self.source}: "
        if self.fits:
            return head + f"{trajectories_text(self.trajectories)} of the budget at once"
        short = [r for r, s in self.servers.items() if s.trajectories < 1]
        return head + (f"no trajectory of the budget fits (the {' and '.join(short)} server"
                       f"{'s' if len(short) > 1 else ''} hold{'' if len(short) > 1 else 's'} fewer KV tokens than "
                       f"its context)")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "trajectories": self.trajectories, "verdict": self.verdict}
        if self.reserve_gib is not None:
            out["reserve_gib"] = self.reserve_gib
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def need_gib(preset: Preset, card: Card, kv_tokens: int | None = None) -> float:
    """Free memory a shared-device preset needs: both contexts, each role's memory_gib floor
    (its weights + the least KV it must get), both after-pool allocations and the reserve."""
    total = preset.runtime_reserve_gib
    for role in ROLES:
        s = shape(preset, role, kv_tokens)
        floor_tokens = int(((preset.roles[role].memory_gib or 0.0) - s.weights_gib) * GIB // s.kv_bytes)
        total += estimates().cuda_context_gib + (preset.roles[role].memory_gib or 0.0) + \
            after_pool(s, card, max(floor_tokens, 2)).total
    return total


def plan_shared(preset: Preset, card: Card, free_gib: float | None = None, kv_tokens: int | None = None,
                source: str | None = None) -> MemoryPlan:
    """Both servers on one GPU with `free_gib` free before the first starts: the same number of
    KV tokens for each (pinned with --max-total-tokens), the rest of the card left free beyond
    what SGLang allocates after each pool and the preset's runtime_reserve_gib. ConfigError (one
    line) when a role would get less than its memory_gib (weights + the least KV it must get)."""
    free = card.free_gib if free_gib is None else free_gib
    first, second = (shape(preset, role, kv_tokens) for role in ROLES)
    ctx = estimates().cuda_context_gib
    tokens = 0
    for _ in range(3):  # the request tables grow with the tokens (when max_running_requests is unset)
        fixed = (2 * ctx + first.weights_gib + second.weights_gib + preset.runtime_reserve_gib
                 + after_pool(first, card, max(tokens, 2)).total + after_pool(second, card, max(tokens, 2)).total)
        tokens = max(0, int((free - fixed) * GIB // (first.kv_bytes + second.kv_bytes)))
    for role, s in zip(ROLES, (first, second)):
        if s.weights_gib + tokens * s.kv_bytes / GIB < (preset.roles[role].memory_gib or 0.0) - 1e-9:
            parts = " + ".join(f"{r} {preset.roles[r].memory_gib:g}" for r in ROLES)
            raise ConfigError(f"preset {preset.name} needs {need_gib(preset, card, kv_tokens):.1f} GiB free on its GPU "
                              f"(memory_gib {parts}, CUDA contexts, what SGLang allocates after each KV pool and "
                              f"{preset.runtime_reserve_gib:g} reserve), it has {free:.1f} GiB free")
    if kv_tokens:  # `up --kv-tokens`: the user's cap, even below a trajectory; the rest stays free
        tokens = min(tokens, kv_tokens)
    large = sized(first, card, ROLES[0], free, tokens,
                  why=f"starts first, with {free:.1f} GiB free; holds weights + {tokens:,} KV tokens: "
                      "mem_fraction_static x (the memory free at its start - CUDA context), --max-total-tokens "
                      f"{tokens}")
    left = free - large.holds_gib
    small = last_on_device(second, card, ROLES[1], left, preset.runtime_reserve_gib,
                           why=f"starts once the {ROLES[0]} server answers, with about {left:.1f} GiB free "
                               f"({free:.1f} - {large.holds_gib:.1f} the {ROLES[0]} server holds)")
    return MemoryPlan(preset.name, {ROLES[0]: large, ROLES[1]: small}, source or card.describe(), shared=True,
                      reserve_gib=preset.runtime_reserve_gib)


def last_on_device(s: Shape, card: Card, role: str, free_gib: float, reserve_gib: float, why: str) -> ServerMemory:
    """The last server on a shared GPU, sized from what is free when it starts: all of it but its
    own context, what it allocates after its pool and the reserve."""
    tokens = tokens_left(s, card, free_gib, reserve_gib)
    if tokens < 1:
        raise ConfigError(f"the {role} server would get no KV cache from {free_gib:.1f} GiB free (its weights "
                          f"{s.weights_gib:.1f} GiB, CUDA context {estimates().cuda_context_gib} GiB, "
                          f"{after_pool(s, card, 2).total:.1f} GiB after its pool, {reserve_gib:g} GiB reserve)")
    return sized(s, card, role, free_gib, tokens,
                 why=f"{why}; holds weights + {tokens:,} KV tokens, leaves its after-pool allocations and the "
                     f"{reserve_gib:g} GiB reserve free")


def plan_separate(preset: Preset, card_of: Mapping[str, Card], kv_tokens: int | None = None,
                  source: str | None = None) -> MemoryPlan:
    """Each role on its own GPUs, sized by SGLang's rule from the preset's fraction."""
    servers, notes = {}, []
    for role in ROLES:
        s = shape(preset, role, kv_tokens)
        card = card_of[role]
        mem = size(s, card, role)
        if mem.after is not None and mem.fraction is not None:
            room = _pre(card.free_gib) * (1 - mem.fraction)
            if mem.after.total > room:
                notes.append(f"the {role} server's after-pool allocations ({mem.after.total:.1f} GiB, estimated) "
                             f"exceed the {room:.1f} GiB its --mem-fraction-static leaves")
        servers[role] = mem
    src = source or ", ".join(dict.fromkeys(c.describe() for c in card_of.values()))
    return MemoryPlan(preset.name, servers, src, notes=tuple(notes))


def plan_cpu(preset: Preset, kv_tokens: int | None = None) -> MemoryPlan:
    servers = {role: size(shape(preset, role, kv_tokens), Card("cpu", "cpu", 0, "cpu"), role) for role in ROLES}
    return MemoryPlan(preset.name, servers, "the CPU (host memory)")


def plan_for_card(preset: Preset, card: Card, kv_tokens: int | None = None) -> MemoryPlan:
    """The plan on one kind of card (every GPU of the preset alike)."""
    if preset.device == "cpu":
        return plan_cpu(preset, kv_tokens)
    if preset.share_device:
        return plan_shared(preset, card, kv_tokens=kv_tokens)
    return plan_separate(preset, {role: card for role in ROLES}, kv_tokens)
