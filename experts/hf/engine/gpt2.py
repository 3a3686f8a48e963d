"""A lean GPT-2 kernel for the engine: k GPT-2s (k = 1: one model) run as one model with a leading expert axis.

Every layer runs once for all k (batched matmuls, one SDPA call over k x batch rows) with one stacked KV cache
per layer, written in place. It skips what the Hugging Face module does per call and the engine does not need
(module hooks, output containers, the mask builder, the logits of every prompt position when only the last is
sampled). The BTM forest uses it for its experts (experts.btm.mixture.runners); the engine uses it at k = 1
for a plain GPT-2 (experts.hf.engine.kv.HFAdapter), with the weights shared, not copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from experts.hf.engine.columns import ROOM, joined, place_rows

_SAME = ("n_layer", "n_embd", "n_head", "vocab_size", "activation_function", "layer_norm_epsilon",
         "scale_attn_weights", "scale_attn_by_inverse_layer_idx")


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # under transformer.h.<layer>


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def stacked_unsupported(models: list[Any]) -> str | None:
    """Why `StackedGPT2Runner` cannot run these models (None when it can)."""
    if not all(type(m).__name__ == "GPT2LMHeadModel" for m in models):  # before importing transformers
        return "not all experts are plain GPT2LMHeadModel"
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:  # pragma: no cover
        return "transformers has no GPT-2"
    if not all(type(m) is GPT2LMHeadModel for m in models):
        return "not all experts are plain GPT2LMHeadModel"
    c0 = models[0].config
    for m in models[1:]:
        for f in _SAME:
            if getattr(m.config, f, None) != getattr(c0, f, None):
                return f"experts differ in config.{f}"
    if any(getattr(m.config, "add_cross_attention", False) for m in models):
        return "cross-attention is not supported"
    if any(getattr(m.lm_head, "bias", None) is not None for m in models):
        return "lm_head has a bias"
    dtypes = {p.dtype for m in models for p in m.parameters()}
    if len(dtypes) != 1:
        return f"mixed parameter dtypes {dtypes}"
    return None


class StackedGPT2Runner:
    """k GPT-2s as one model with a leading expert axis; per-layer stacked KV caches.

    The state is a `StackedKV`: per layer, preallocated K and V buffers [k*B, heads, capacity,
    head_dim] written in place (capacity doubles as needed, up to the context), so a decode step
    copies one position instead of the whole cache. Like HF's DynamicCache, a state is consumed by
    the call that continues it. Weights are copied into stacked tensors (extra memory: one more
    copy of the k experts' parameters)."""

    name = "stacked"
    pads = True

    def __init__(self, models: list[Any]) -> None:
        why = stacked_unsupported(models)
        if why:
            raise ValueError(f"stacked backend unavailable: {why}")
        from transformers.activations import ACT2FN

        c = models[0].config
        self.k = len(models)
        self.n_layer, self.d, self.h = c.n_layer, c.n_embd, c.n_head
        self.dh = self.d // self.h
        self.eps = c.layer_norm_epsilon
        # GPT-2's "gelu_new" is the tanh approximation of GELU: torch's fused kernel computes the same formula in
        # one pass instead of the module's six elementwise ops (results equal within float rounding)
        self.act = _gelu_tanh if c.activation_function in _TANH_GELU else ACT2FN[c.activation_function]
        self.n_positions = min(m.config.n_positions for m in models)

        def st(get) -> torch.Tensor:
            with torch.no_grad():
                if self.k == 1:  # a view of the model's own tensor: no second copy of its weights
                    return get(models[0]).detach().unsqueeze(0).contiguous()
                return torch.stack([get(m).detach() for m in models]).contiguous()

        self.wte = st(lambda m: m.transformer.wte.weight)  # [k, V, d]
        self.wpe = st(lambda m: m.transformer.wpe.weight[: self.n_positions])  # [k, P, d]
        tied = all(m.lm_head.weight is m.transformer.wte.weight for m in models)
        head = self.wte if tied else st(lambda m: m.lm_head.weight)
        if self.k > 1:
            # the stacked copy kept as [k, d, V]: the head's bmm reads it contiguously (1.4x faster than through a
            # transposed view); a tied embedding becomes a view of it, so there is still one copy
            self.head_t = head.transpose(1, 2).contiguous()
            if tied:
                self.wte = self.head_t.transpose(1, 2)
        else:
            self.head_t = head.transpose(1, 2)  # a view of the model's own weight (k = 1 copies nothing)
        self._tied = tied
        # a tied forest's embedding rows are gathered from each expert's own [V, d] table (its weight, not a copy):
        # through the [k, V, d] view of head_t a row's values lie V apart, an 8x slower gather
        self._tables = [m.transformer.wte.weight.detach() for m in models] if tied and self.k > 1 else None
        self.layers = []
        for i in range(self.n_layer):
            b = [m.transformer.h[i] for m in models]

            def lst(get, b=b) -> torch.Tensor:
                with torch.no_grad():
                    if self.k == 1:
                        return get(b[0]).detach().unsqueeze(0).contiguous()
                    return torch.stack([get(x).detach() for x in b]).contiguous()

            scale = self.dh ** -0.5 if c.scale_attn_weights else 1.0
            if c.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self.layers.append(dict(
                ln1_w=lst(lambda x: x.ln_1.weight).unsqueeze(1),
                ln1_b=lst(lambda x: x.ln_1.bias).unsqueeze(1),
                qkv_w=lst(lambda x: x.attn.c_attn.weight),
                qkv_b=lst(lambda x: x.attn.c_attn.bias).unsqueeze(1),
                o_w=lst(lambda x: x.attn.c_proj.weight), o_b=lst(lambda x: x.attn.c_proj.bias).unsqueeze(1),
                ln2_w=lst(lambda x: x.ln_2.weight).unsqueeze(1),
                ln2_b=lst(lambda x: x.ln_2.bias).unsqueeze(1),
                fc_w=lst(lambda x: x.mlp.c_fc.weight), fc_b=lst(lambda x: x.mlp.c_fc.bias).unsqueeze(1),
                pr_w=lst(lambda x: x.mlp.c_proj.weight), pr_b=lst(lambda x: x.mlp.c_proj.bias).unsqueeze(1),
                scale=scale,
            ))
        self.lnf_w = st(lambda m: m.transformer.ln_f.weight).unsqueeze(1)
        self.lnf_b = st(lambda m: m.transformer.ln_f.bias).unsqueeze(1)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.head_t if self._tied else self.wte, self.wpe, self.lnf_w, self.lnf_b]
        out += [] if self._tied else [self.head_t]
        for layer in self.layers:
            out += [v for v in layer.values() if torch.is_tensor(v)]
        return out

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._tables is None:
            return self.wte[:, input_ids]
        return torch.stack([F.embedding(input_ids, t) for t in self._tables])

    def _ln(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(b, F.layer_norm(x, (self.d,), eps=self.eps), w)

    def _attn_mask(self, B: int, T: int, past: int, keys: torch.Tensor | None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for sdpa. With `keys` [B, past+T] (0 = padding) the mask is per row and additive (0 or
        -inf), [k*B, 1, T, S]; a padding query may see itself (no row of the softmax is empty: no NaN reaches the
        cache)."""
        if keys is None:
            if T == 1:
                return None, False
            if past == 0:
                return None, True
            i = torch.arange(T).unsqueeze(1)
            return torch.arange(past + T).unsqueeze(0) <= i + past, False  # [T, past+T]
        q = torch.arange(T).unsqueeze(1) + past
        col = torch.arange(past + T).unsqueeze(0)
        allowed = (col <= q).unsqueeze(0) & keys.bool()[:, None, :]  # [B, T, S]
        allowed = allowed | (col == q).unsqueeze(0)
        # additive (0 / -inf), built once for every layer: sdpa reads a float mask over the cache's strided view
        # about 1.4x faster than a boolean one
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        return bias.unsqueeze(0).expand(self.k, -1, -1, -1).reshape(self.k * keys.shape[0], 1, T, past + T), False

    def __call__(self, input_ids: torch.Tensor, state: StackedKV | None, use_cache: bool,
                 mask: torch.Tensor | None = None, positions: torch.Tensor | None = None, last_only: bool = False,
                 lora: Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, StackedKV | None]:
        """Logits [k, B, T, V] (T = 1 with `last_only`: the last position's) and the continued state.
        `lora(layer, name, x, y)`: projection `name` (one of PROJECTIONS) of layer `layer` gave `y` for input `x`
        ([k, B*T, *]); returns it with the rows' LoRA deltas added."""
        k, d, h, dh = self.k, self.d, self.h, self.dh
        B, T = input_ids.shape
        past = 0 if state is None else state.length
        if positions is None:
            if past + T > self.n_positions:
                raise ValueError(f"sequence of {past + T} tokens exceeds the context of {self.n_positions}")
            x = self._embed(input_ids) + self.wpe[:, past: past + T].unsqueeze(1)  # [k, B, T, d]
        else:
            if int(positions.max()) >= self.n_positions:
                raise ValueError(f"position {int(positions.max())} exceeds the context of {self.n_positions}")
            x = self._embed(input_ids) + self.wpe[:, positions]
        x = x.reshape(k, B * T, d)
        mask, causal = self._attn_mask(B, T, past, mask, x.dtype)
        if use_cache:
            state = self._reserve(state, k * B, past + T, x.dtype)
        for li, L in enumerate(self.layers):
            a = self._ln(x, L["ln1_w"], L["ln1_b"])
            qkv = torch.baddbmm(L["qkv_b"], a, L["qkv_w"])  # [k, BT, 3d]
            if lora is not None:
                qkv = lora(li, "attn.c_attn", a, qkv)
            qkv = qkv.view(k, B, T, 3, h, dh).permute(3, 0, 1, 4, 2, 5).reshape(3, k * B, h, T, dh)
            q, kk, vv = qkv[0], qkv[1], qkv[2]
            if use_cache:
                kb, vb = state.layers[li]
                kb[:, :, past: past + T] = kk
                vb[:, :, past: past + T] = vv
                kk, vv = kb[:, :, : past + T], vb[:, :, : past + T]
            elif state is not None:
                kk = torch.cat([state.layers[li][0][:, :, :past], kk], dim=2)
                vv = torch.cat([state.layers[li][1][:, :, :past], vv], dim=2)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=causal, scale=L["scale"])
            o = o.view(k, B, h, T, dh).permute(0, 1, 3, 2, 4).reshape(k, B * T, d)
            y = torch.baddbmm(L["o_b"], o, L["o_w"])
            x = x + (y if lora is None else lora(li, "attn.c_proj", o, y))
            m = self._ln(x, L["ln2_w"], L["ln2_b"])
            y = torch.baddbmm(L["fc_b"], m, L["fc_w"])
            m = self.act(y if lora is None else lora(li, "mlp.c_fc", m, y))
            y = torch.baddbmm(L["pr_b"], m, L["pr_w"])
            x = x + (y if lora is None else lora(li, "mlp.c_proj", m, y))
        kept = T
        if last_only and T > 1:  # the head for the sampled position only
            x, kept = x.view(k, B, T, d)[:, :, -1], 1
        x = self._ln(x, self.lnf_w, self.lnf_b)
        logits = torch.bmm(x, self.head_t).view(k, B, kept, -1)
        if not use_cache:
            return logits, None
        state.length = past + T
        return logits, state

    def _reserve(self, state: StackedKV | None, rows: int, need: int, dtype: torch.dtype) -> StackedKV:
        cap = 0 if state is None else state.layers[0][0].shape[2]
        if need <= cap:
            return state  # type: ignore[return-value]
        new_cap = max(need, 2 * cap, 64)  # padded batches may hold more columns than positions
        shape = (rows, self.h, new_cap, self.dh)
        layers = []
        for li in range(self.n_layer):
            kb, vb = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
            if state is not None and state.length:
                kb[:, :, : state.length] = state.layers[li][0][:, :, : state.length]
                vb[:, :, : state.length] = state.layers[li][1][:, :, : state.length]
            layers.append((kb, vb))
        return StackedKV(layers, 0 if state is None else state.length)


    # the engine's row and column operations on a StackedKV (rows are expert-major: j * B + b)
    def _rows(self, t: torch.Tensor, length: int) -> torch.Tensor:
        return t[:, :, :length].reshape(self.k, -1, *t.shape[1:2], length, t.shape[3])

    def select(self, state: StackedKV, rows: torch.Tensor) -> StackedKV:
        """One copy per buffer into buffers with room to grow (the next decode steps need no new buffer)."""
        layers = []
        for kb, vb in state.layers:
            pair = []
            for t in (kb, vb):
                if t.shape[2] - state.length <= ROOM:  # few spare columns: take them along
                    picked = t.view(self.k, -1, *t.shape[1:]).index_select(1, rows)
                else:
                    picked = joined([(self._rows(t, state.length).index_select(1, rows), 0)], 1, 3, ROOM)
                pair.append(picked.view(-1, *picked.shape[2:]))
            layers.append((pair[0], pair[1]))
        return StackedKV(layers, state.length)

    def join(self, a: StackedKV, pad_a: int, b: StackedKV, pad_b: int) -> StackedKV:
        """Rows expert-major in both: one copy of each into buffers with room to grow."""
        layers = []
        for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
            k_ = joined([(self._rows(ka, a.length), pad_a), (self._rows(kb, b.length), pad_b)], 1, 3, ROOM)
            v_ = joined([(self._rows(va, a.length), pad_a), (self._rows(vb, b.length), pad_b)], 1, 3, ROOM)
            layers.append((k_.view(-1, *k_.shape[2:]), v_.view(-1, *v_.shape[2:])))
        return StackedKV(layers, a.length + pad_a)

    def place(self, state: StackedKV, slots: torch.Tensor, new: StackedKV, pad: int) -> StackedKV:
        for (kb, vb), (nk, nv) in zip(state.layers, new.layers, strict=True):
            for buf, src in ((kb, nk), (vb, nv)):  # a view of the buffer (written in place), expert-major rows
                dst = buf.view(self.k, -1, *buf.shape[1:])[:, :, :, :state.length]
                place_rows(dst, slots, self._rows(src, new.length), pad, 1, 3)
        return state

    def trim_left(self, state: StackedKV, n: int) -> StackedKV:
        """Without the first `n` columns: one copy into buffers with room to grow."""
        if n <= 0:
            return state
        layers = []
        for kb, vb in state.layers:
            k_, v_ = (joined([(self._rows(t, state.length)[:, :, :, n:], 0)], 1, 3, ROOM) for t in (kb, vb))
            layers.append((k_.view(-1, *k_.shape[2:]), v_.view(-1, *v_.shape[2:])))
        return StackedKV(layers, state.length - n)


class StackedKV:
    """KV buffers of `StackedGPT2Runner`: `layers[l] = (K, V)`, valid up to `length` positions."""

    __slots__ = ("layers", "length")

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.layers = layers
        self.length = length

