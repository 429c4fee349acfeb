"""Schedule `sdpa`: an attention the graph writes with softmax, run as one SDPA call.

    s = scale * q @ k^T + bias[h] + mask[b mod windows] + general[b, h]
    out = softmax(s) @ v  ->  scaled_dot_product_attention(q, k, v, attn_mask=the terms summed)

The launcher reads q, k and v through the views the fused kernel uses (no layout copies), sums
the additive terms into one float attn_mask, calls SDPA (on a GPU its flash, memory-efficient
or cuDNN backend) and writes the output in the layout the projection reads. It launches no
Triton kernel of ours, so the static check has nothing to compile.

SDPA gives 0 for a row whose scores are all -inf; the graph's softmax gives NaN. For finite q
and k such a row is one whose terms are all -inf. Otherwise a q row holding NaN or Inf makes
every score of its row non-finite, and a k row holding one makes its column's scores
non-finite: eager's row is then NaN unless some score is finite, so the launcher writes NaN
where the q row is not finite or where every key is hidden by a -inf term or not finite
(exact, and without a host synchronisation).

Refused (InvalidSchedule, so the candidate is absent): the graph already calls SDPA (its
"aten" is that call), the backward, cosine attention and a logit scale (SDPA has no such
operand), a boolean select (masked_fill replaces a score, SDPA's mask adds to it: they differ
for an infinite score) and no keys.
"""

from __future__ import annotations

import inspect

from .. import score_terms
from ..devices import Device
from ..schedule import InvalidSchedule, Schedule, schedule_space
from ..spec import AttentionSpec
from . import template as T
from . import window_attention

KERNELS: tuple[str, ...] = ()  # no Triton kernel: SDPA's own
LIBRARY = True  # runs a library's kernel, not ours: no candidate under cpu="interpret"
SCORE_TERMS = "\n\n\n".join(
    inspect.getsource(getattr(score_terms, name)).rstrip() for name in ("per_head", "per_window")
)


@schedule_space("sdpa")
def SPACE(spec: AttentionSpec, s: Schedule, device: Device | None) -> None:
    if spec.sdpa:
        raise InvalidSchedule("the graph calls SDPA: its aten candidate is that call")
    if spec.grad:
        raise InvalidSchedule("the backward: SDPA's is not a separate op here")
    if spec.cosine or spec.logit_scale:
        raise InvalidSchedule("cosine attention and a logit scale are not SDPA operands")
    if spec.select:
        raise InvalidSchedule("a boolean select replaces scores; SDPA's mask adds to them")
    if spec.keys == 0:
        raise InvalidSchedule("no keys")


TEMPLATE = '''${header}
import math

import torch
import torch.nn.functional as F

TOKENS = ${tokens}  # queries
KEY_TOKENS = ${key_tokens}  # keys and values
HEADS = ${heads}
HEAD_DIM = ${head_dim}  # q and k
V_HEAD_DIM = ${v_head_dim}  # v and the output
${layout_constants}
MASK_REPEAT = ${mask_repeat}  # the mask is added this many times
SAFE_SOFTMAX = ${safe_softmax}  # the graph's softmax gives 0 for a row of all -inf, as SDPA
SELECT = None
OUTPUT = ${output}


# ---- the score terms as the fused kernel indexes them (convcompiler/score_terms.py) ----
${score_terms}


${operands}


${output_view}


def _attn_mask(B, bias, mask, general):
    """The additive terms summed into one float attn_mask in q's dtype ([1 or B, H, N, Nk]),
    or None. A finite sum below the dtype's range stays finite (as in the graph, whose
    wider-typed terms promote the scores), -inf stays -inf."""
    total = None
    if bias is not None:
        total = bias.unsqueeze(0).float()
    if mask is not None:
        nw = mask.shape[0]
        windows = (mask.float() * MASK_REPEAT).view(1, nw, 1, TOKENS, KEY_TOKENS)
        per_batch = windows if total is None else windows + total.unsqueeze(0)
        total = per_batch.expand(B // nw, nw, HEADS, TOKENS, KEY_TOKENS).reshape(
            B, HEADS, TOKENS, KEY_TOKENS)
    if general is not None:
        total = general.float() if total is None else total + general.float()
    if total is None:
        return None
    low = torch.finfo(DTYPE).min
    return torch.where(total == float("-inf"), total, total.clamp(min=low)).to(DTYPE)


def launch(q, k, v, bias=None, mask=None, general=None, logit_scale=None, select=None):
    # ---- 1. check constraints; the operands and terms as the fused kernel views them ----
    q, k, v = _qkv(q, k, v)
    B = q.shape[0]
    bias, mask, general, logit_scale, select, NW, _ = _terms(
        B, bias, mask, general, logit_scale, select)
    if logit_scale is not None:
        raise ValueError("a logit scale is not an SDPA operand")
    y, canonical = _output(B, q, OUT_DTYPE)
    if y.numel() == 0:
        return y

    # ---- 2. one SDPA call (the backend is SDPA's choice) ----
    attn_mask = _attn_mask(B, bias, mask, general)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=SCALE)

    # ---- 3. the graph's softmax: NaN for a row with no finite score ----
    if not SAFE_SOFTMAX:
        hidden = ~torch.isfinite(k).all(-1)[:, :, None, :]  # [B, H, 1, Nk]
        if attn_mask is not None:
            hidden = hidden | (attn_mask == float("-inf"))
        no_score = hidden.all(-1) | ~torch.isfinite(q).all(-1)  # [B, H, N]
        out = torch.where(no_score[..., None], float("nan"), out)
    canonical.copy_(out)
    return y
'''


def render(spec: AttentionSpec, schedule: Schedule) -> T.KernelSource:
    hooks = window_attention.hooks(spec, schedule, "multi-head attention as one SDPA call")
    text = T.render(TEMPLATE, **{**hooks, "score_terms": SCORE_TERMS})
    return T.KernelSource(f"{spec.geometry()}_{schedule.name}", text, schedule, spec.key(), KERNELS)
