"""A slow, exact, pure-torch reference forward of a Llama model under UTIO layer plans.

Weights come straight from the model's safetensors (not through transformers or vLLM),
so this is an independent check of both: at full depth it must match transformers, and
under plans it spells out the semantics UTIO's executor follows inside vLLM:

* a plan ``(keep_first, keep_last)`` runs layers ``[0, keep_first)`` and
  ``[L - keep_last, L)`` and skips the span between (``keep_first + keep_last >= L``
  is full depth, ``keep_last == 0`` is truncation);
* every position writes K/V at every layer, from its current residual stream; a
  position that skips a layer has a frozen stream, so its K/V there come from the
  frozen stream ("frozen-state KV fill");
* a plan's exit correction is added where its stream rejoins (before layer
  ``L - keep_last``), or before the final norm for truncation plans:
  ``S <- S + correction.delta(S)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm_utio.corrections import Correction

Plan = tuple[int, int]  # (keep_first, keep_last)


@dataclass(frozen=True)
class ReferenceConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ReferenceConfig:
        """Read an HF ``config.json``; refuse anything this reference does not implement."""
        if cfg.get("model_type") != "llama":
            raise NotImplementedError(f"reference supports model_type 'llama', not {cfg!r:.80}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise NotImplementedError("attention/MLP biases are not implemented")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=_rope_theta(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    """Theta of plain (unscaled, full-width) RoPE; other RoPE variants are refused."""
    params = cfg.get("rope_parameters") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise NotImplementedError("per-layer-type rope_parameters are not implemented")
    for source in (params, cfg.get("rope_scaling") or {}):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"rope_type {kind!r} (only 'default')")
    for source in (cfg, params):
        if float(source.get("partial_rotary_factor", 1.0)) != 1.0:
            raise NotImplementedError("partial rotary embeddings are not implemented")
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    return float(theta)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor


@dataclass
class ReferenceOutput:
    logits: torch.Tensor  # [T, V], fp32
    # Filled when keep_kv: K (post-RoPE) and V of every position at every layer,
    # [L, T, kv_heads, head_dim], and the residual stream entering each layer (after
    # any rejoin correction there) plus the one entering the final norm, [L + 1, T, H].
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    streams: torch.Tensor | None = None


def _load_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                tensors[key] = f.get_tensor(key).to(dtype)
    return tensors


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ReferenceLlama:
    """Llama weights as plain tensors, and a forward that follows per-position plans."""

    def __init__(
        self, config: ReferenceConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> None:
        self.config = config
        self.dtype = dtype
        w = {k.removeprefix("model."): v.to(dtype) for k, v in weights.items()}
        self.embed = w["embed_tokens.weight"]
        self.final_norm = w["norm.weight"]
        # Tied models may still ship an lm_head copy; the config decides which is used.
        self.lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.layers = [
            _Layer(
                *(
                    w[f"layers.{i}.{name}.weight"]
                    for name in (
                        "input_layernorm",
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.o_proj",
                        "post_attention_layernorm",
                        "mlp.gate_proj",
                        "mlp.up_proj",
                        "mlp.down_proj",
                    )
                )
            )
            for i in range(config.num_layers)
        ]
        # RoPE frequencies in fp32 whatever the weight dtype, as transformers does.
        d = config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        self.inv_freq = 1.0 / (config.rope_theta**exponents)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32
    ) -> ReferenceLlama:
        path = Path(path)
        config = ReferenceConfig.from_hf(json.loads((path / "config.json").read_text()))
        return cls(config, _load_safetensors(path, dtype), dtype)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    # --- building blocks ---------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, then back to the compute dtype (matters only below fp32).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * normed.to(x.dtype)

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # NeoX layout: halves, not pairs
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [T, heads, d]; cos/sin [T, d]
        return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]

    def _kv(
        self, layer: _Layer, stream: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._rms_norm(stream, layer.input_norm)
        shape = (stream.shape[0], self.config.num_kv_heads, self.config.head_dim)
        k = (x @ layer.k_proj.T).view(shape)
        v = (x @ layer.v_proj.T).view(shape)
        return self._rope(k, cos, sin), v

    def kv_from_stream(
        self, layer: int, stream: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (post-RoPE) and V that ``layer`` writes for residual streams ``stream`` [N, H]
        at ``positions`` [N] (default ``0..N-1``): [N, kv_heads, head_dim] each."""
        if positions is None:
            positions = torch.arange(stream.shape[0])
        cos, sin = self._rope_tables(positions)
        return self._kv(self.layers[layer], stream.to(self.dtype), cos, sin)

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, future: torch.Tensor
    ) -> torch.Tensor:
        """Causal GQA attention: q [T, heads, d], k/v [T, kv_heads, d] -> [T, heads * d];
        ``future`` [T, T] is True where a key lies after the query."""
        t = q.shape[0]
        group = self.config.num_heads // self.config.num_kv_heads
        # Query head h reads KV head h // group (transformers' repeat_kv order).
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * self.config.head_dim**-0.5
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(self.dtype)
        return (probs @ v).transpose(0, 1).reshape(t, -1)

    def _layer_update(
        self,
        layer: _Layer,
        stream: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        future: torch.Tensor,
    ) -> torch.Tensor:
        """The stream after the whole layer, as if every position ran it."""
        cos, sin = rope
        x = self._rms_norm(stream, layer.input_norm)
        q = (x @ layer.q_proj.T).view(stream.shape[0], self.config.num_heads, -1)
        h = stream + self._attention(self._rope(q, cos, sin), *kv, future) @ layer.o_proj.T
        x = self._rms_norm(h, layer.post_norm)
        return h + (F.silu(x @ layer.gate_proj.T) * (x @ layer.up_proj.T)) @ layer.down_proj.T

    # --- plans -------------------------------------------------------------------
    def _check_plans(self, plans: Sequence[Plan] | None, t: int) -> list[Plan]:
        if plans is None:
            return [(self.num_layers, 0)] * t
        plans = [(int(f), int(last)) for f, last in plans]
        if len(plans) != t:
            raise ValueError(f"{len(plans)} plans for {t} positions")
        if any(f < 0 or last < 0 for f, last in plans):
            raise ValueError("keep_first and keep_last must be >= 0")
        return plans

    def _correction_layer(self, plan: Plan) -> int | None:
        """Where a plan's correction applies: its rejoin layer, L (before the final norm)
        for truncation, or None at full depth."""
        keep_first, keep_last = plan
        if keep_first + keep_last >= self.num_layers:
            return None
        return self.num_layers - keep_last

    # --- forward -----------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor,
        plans: Sequence[Plan] | None = None,
        corrections: Mapping[Plan, Correction] | None = None,
        keep_kv: bool = True,
    ) -> ReferenceOutput:
        """Run ``token_ids`` [T] (one sequence, positions 0..T-1) under per-position
        ``plans``; ``corrections`` maps a plan to the correction of its positions."""
        if token_ids.ndim != 1:
            raise ValueError("token_ids must be one sequence, shape [T]")
        t, num_layers = int(token_ids.shape[0]), self.num_layers
        plans = self._check_plans(plans, t)
        keep = torch.tensor(plans, dtype=torch.long).view(t, 2)
        layer_ids = torch.arange(num_layers)[None, :]
        runs = (layer_ids < keep[:, :1]) | (layer_ids >= num_layers - keep[:, 1:])  # [T, L]
        # layer index (L = before the final norm) -> [(positions, correction)]
        fixes: dict[int, list[tuple[torch.Tensor, Correction]]] = {}
        for plan, corr in (corrections or {}).items():
            at = self._correction_layer(plan)
            rows = torch.tensor([i for i, p in enumerate(plans) if p == plan], dtype=torch.long)
            if at is not None and len(rows):
                fixes.setdefault(at, []).append((rows, corr))

        cos, sin = self._rope_tables(torch.arange(t))
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        stream = self.embed[token_ids]
        keys, values, streams = [], [], []
        for index, layer in enumerate(self.layers):
            stream = self._apply_fixes(stream, fixes.get(index, ()))
            # K/V from every position's current stream, frozen or not.
            k, v = self._kv(layer, stream, cos, sin)
            if keep_kv:
                keys.append(k)
                values.append(v)
                streams.append(stream)
            running = runs[:, index]
            if not running.any():
                continue
            # Every position goes through the layer and only running ones keep the result:
            # matmul shapes then do not depend on the plans, so a position whose inputs are
            # unchanged gets bit-identical outputs (what the tests rely on).
            updated = self._layer_update(layer, stream, (k, v), (cos, sin), future)
            stream = torch.where(running[:, None], updated, stream)
        stream = self._apply_fixes(stream, fixes.get(num_layers, ()))
        logits = (self._rms_norm(stream, self.final_norm) @ self.lm_head.T).float()
        if not keep_kv:
            return ReferenceOutput(logits)
        streams.append(stream)
        return ReferenceOutput(logits, torch.stack(keys), torch.stack(values), torch.stack(streams))

    __call__ = forward

    def _apply_fixes(
        self, stream: torch.Tensor, fixes: Sequence[tuple[torch.Tensor, Correction]]
    ) -> torch.Tensor:
        for rows, corr in fixes:
            stream = stream.index_add(0, rows, corr.delta(stream[rows]))
        return stream

    def log_probs_of_targets(
        self,
        token_ids: torch.Tensor,
        plans: Sequence[Plan] | None = None,
        corrections: Mapping[Plan, Correction] | None = None,
    ) -> torch.Tensor:
        """[T - 1] fp32: log p(token t+1 | tokens <= t), position t under ``plans[t]``.
        Perplexity is ``exp(-mean)``."""
        logits = self.forward(token_ids, plans, corrections, keep_kv=False).logits
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        return log_probs.gather(1, token_ids[1:, None]).squeeze(1)
