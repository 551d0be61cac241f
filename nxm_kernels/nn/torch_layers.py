"""PyTorch's Transformer modules whose fused paths read a child Linear's ``.weight``.

``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``, for nested tensors) hand
``linear1.weight``, ``linear2.weight`` and ``self_attn.out_proj.weight`` to one fused kernel in
eval mode without grad, and ``nn.MultiheadAttention`` passes ``out_proj.weight`` to
``F.multi_head_attention_forward`` always. A ``SparseLinear`` there has no ``.weight``, so
:func:`prepare_parents` makes those parents call their children as modules:

- an encoder layer holding a ``SparseLinear`` declines its fused path (the flag it reads,
  ``activation_relu_or_gelu``, is cleared: it only chooses the fused kernel's activation, the
  regular path calls ``self.activation``), and its ``TransformerEncoder`` stops making nested
  tensors, which only that path can read;
- a ``MultiheadAttention`` whose ``out_proj`` is a ``SparseLinear`` becomes a
  :class:`SparseOutProjAttention` (its class is swapped, as ``torch.nn.utils.parametrize`` does:
  same parameters, buffers and ``state_dict`` keys), which computes the attention as
  ``F.multi_head_attention_forward`` does, then calls ``self.out_proj``.

The outputs are the regular path's. One difference from a dense model: with a
``src_key_padding_mask`` in eval mode, the dense model's nested-tensor path writes 0 at padded
positions, where the regular path writes the (unused) values it computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def unsupported_child(parent: nn.Module, child_name: str) -> str | None:
    """Why the Linear ``child_name`` of ``parent`` cannot become a ``SparseLinear``, or None."""
    if isinstance(parent, nn.MultiheadAttention) and (parent.bias_k is not None or parent.add_zero_attn):
        return (
            "its MultiheadAttention uses add_bias_kv or add_zero_attn, which the sparse attention path "
            "does not implement (it calls out_proj.weight directly)"
        )
    return None


def prepare_parents(model: nn.Module) -> None:
    """Make every PyTorch Transformer module of ``model`` that holds a SparseLinear call it as a
    module (idempotent; run after swapping layers, as ``sparsify`` does)."""
    from .linear import SparseLinear

    def holds_sparse(module):
        return any(isinstance(m, SparseLinear) for m in module.modules())

    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, SparseLinear):
            if not isinstance(module, SparseOutProjAttention):
                module.__class__ = _sparse_attention_class(type(module))
        elif isinstance(module, nn.TransformerEncoderLayer) and holds_sparse(module):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder) and holds_sparse(module):
            module.use_nested_tensor = False


class SparseOutProjAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that calls ``self.out_proj`` as a module (so it may be a
    ``SparseLinear``). The forward is ``F.multi_head_attention_forward``'s regular path, for
    attention without ``add_bias_kv`` and ``add_zero_attn``."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len, heads = key.shape[0], self.num_heads
        head_dim = embed_dim // heads
        q, k, v = self._project(query, key, value)

        key_padding_mask = _additive(key_padding_mask, query.dtype, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask too (nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the attention applies the causal mask itself
        else:
            attn_mask = _additive(attn_mask, query.dtype, "attn_mask")
            is_causal = is_causal and key_padding_mask is None
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scaled = q * math.sqrt(1.0 / head_dim)
            scores = (
                torch.baddbmm(attn_mask, scaled, k.transpose(-2, -1))
                if attn_mask is not None
                else torch.bmm(scaled, k.transpose(-2, -1))
            )
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (
                    attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, heads, -1, src_len)
                )
            q, k, v = (x.view(bsz, heads, -1, head_dim) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # one product, as the regular path does
                return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _sparse_attention_class(cls: type) -> type:
    """``SparseOutProjAttention``, or a subclass of it and of ``cls`` when ``cls`` is itself a
    subclass of ``nn.MultiheadAttention``."""
    if cls is nn.MultiheadAttention:
        return SparseOutProjAttention
    return type(f"Sparse{cls.__name__}", (SparseOutProjAttention, cls), {})


def _additive(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as an additive float mask; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
