"""The parts both attention templates (window_attention's forward, attention_backward's)
carry in their sources: the launcher's operand and term views (OPERANDS), the output in the
layout the projection reads (OUTPUT_VIEW: the forward's and attention_sdpa's) and the scores
of one query tile against one key tile with every term (SCORES), which both kernels compute
alike."""

# the constants both forward templates' launchers read (rendered first: see hooks())
LAYOUT_CONSTANTS = '''TRANSPOSED = ${transposed}  # operands stored [.., D, N]: read with their last two strides swapped
HEADS_AXIS = ${heads_axis}  # 5-D operands: their heads dim (the other two leading dims: the batch)
BATCH_SPLIT = ${batch_split}  # the batch's inner part ("t" in OUTPUT)
DTYPE = torch.${dtype}
OUT_DTYPE = torch.${out_dtype}  # the output's dtype (the graph may cast it in the region)
SCALE = ${scale}'''


OPERANDS = '''def _canonical(name, t, tokens, dim):
    """t as the kernel reads it, [B, H, tokens, dim]: a view, strides swapped if stored
    transposed; a 5-D t's leading dims other than the heads are viewed as one batch, a 3-D
    t ([B*H, N, D]) is one head of each of its batch."""
    if t.dim() == 5:
        t = t.movedim(HEADS_AXIS, 2)
        t = t.view(-1, *t.shape[2:])  # raises rather than copies: the match proved it a view
    elif t.dim() == 3 and HEADS == 1:  # [B*H, N, D]: heads merged into the batch
        t = t.unsqueeze(1)
    stored = (dim, tokens) if name in TRANSPOSED else (tokens, dim)
    if t.dim() != 4 or t.dtype != DTYPE or tuple(t.shape[1:]) != (HEADS, *stored):
        raise ValueError(f"{name} {tuple(t.shape)} {t.dtype}: expected [B, {HEADS}, "
                         f"{stored[0]}, {stored[1]}] {DTYPE}")
    return t.transpose(2, 3) if name in TRANSPOSED else t


def _qkv(q, k, v):
    """q, k, v as the kernels read them ([B, H, N|Nk, D] views), checked."""
    q = _canonical("q", q, TOKENS, HEAD_DIM)
    k = _canonical("k", k, KEY_TOKENS, HEAD_DIM)
    v = _canonical("v", v, KEY_TOKENS, V_HEAD_DIM)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError("q, k and v disagree on the batch")
    return q, k, v


def _terms(B, bias, mask, general, logit_scale, select):
    """The terms viewed as the kernels index them, the mask's period NW and every term's
    strides: bias (h, i, j), mask (w, i, j), general and select (b, h, i, j); 0 if absent."""
    zero3, zero4 = (0, 0, 0), (0, 0, 0, 0)
    bias_strides = mask_strides = zero3
    general_strides = select_strides = zero4
    NW = 1
    if bias is not None:
        bias = per_head(bias, HEADS, TOKENS, KEY_TOKENS)
        bias_strides = bias.stride()
    if mask is not None:
        mask = per_window(mask, TOKENS, KEY_TOKENS)
        NW = mask.shape[0]
        if B % NW:
            raise ValueError(f"batch {B} is not a multiple of the {NW} windows of the mask")
        mask_strides = mask.stride()
    if general is not None:
        general = general.expand(B, HEADS, TOKENS, KEY_TOKENS)
        general_strides = general.stride()
    if logit_scale is not None:
        logit_scale = logit_scale.reshape(-1)
        logit_scale = logit_scale.expand(HEADS).contiguous()
    if select is not None:
        if select.dtype != torch.bool or SELECT is None:
            raise ValueError(f"select: a bool mask for a spec with one, got {select.dtype}")
        select = select.expand(B, HEADS, TOKENS, KEY_TOKENS)
        select_strides = select.stride()
    strides = (*bias_strides, *mask_strides, *general_strides, *select_strides)
    return bias, mask, general, logit_scale, select, NW, strides'''


OUTPUT_VIEW = '''def _output(B, like, dtype=None):
    """(the output as the graph reads it, its [B, H, N, Dv] view for the kernel's strides).
    OUTPUT names the memory order of b, h, n, d (outermost first); commas group the dims of
    a contiguous result ("nb,hd": [N*B, H*Dv]); without commas the result is the [B, H, N, Dv]
    view itself. "bnc" is "b,n,hd"."""
    layout = "b,n,hd" if OUTPUT == "bnc" else OUTPUT
    order = layout.replace(",", "")
    sizes = {"b": B // BATCH_SPLIT, "t": BATCH_SPLIT, "h": HEADS, "n": TOKENS, "d": V_HEAD_DIM}
    memory = torch.empty([sizes[c] for c in order], device=like.device,
                         dtype=like.dtype if dtype is None else dtype)
    canonical = memory.permute([order.index(c) for c in "bthnd" if c in order])
    canonical = canonical.view(B, HEADS, TOKENS, V_HEAD_DIM)  # b and t adjacent: a view
    if "," not in layout:
        return canonical, canonical
    groups = [math.prod(sizes[c] for c in group) for group in layout.split(",")]
    return memory.view(groups), canonical'''


# the scores of one query tile against one key tile, with every term: shared by the forward
# kernel and the backward's (codegen/attention_backward.py), which recompute them alike
SCORES = '''@triton.jit
def _scores(q, k, offs_m, m_ok, offs_n, n_ok, bias_h, mask_w, general_bh, sel_bh,
            logit_scale, sbi, sbj, smi, smj, sgi, sgj, ssi, ssj,
            SCALE: tl.constexpr, MASK_REPEAT: tl.constexpr, KEEP: tl.constexpr,
            FILL: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # scale * q @ k^T (x logit_scale[h]), plus the bias[h, i, j], the mask[b mod NW, i, j]
    # and the general[b, h, i, j] terms, then the boolean select; -inf past the keys. The
    # *_h / *_w / *_bh pointers are the terms at this (b, h); None when absent.
    if WIDEN:
        work = tl.float64
    else:
        work = tl.float32
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(work) * SCALE
    pair = m_ok[:, None] & n_ok[None, :]
    if logit_scale is not None:  # per-head logit scale (SwinV2)
        s = s * logit_scale
    if bias_h is not None:  # relative position bias[h, i, j]
        s += tl.load(bias_h + offs_m[:, None] * sbi + offs_n[None, :] * sbj,
                     mask=pair, other=0.0).to(work)
    if mask_w is not None:  # shifted-window mask[b mod NW, i, j]
        s += tl.load(mask_w + offs_m[:, None] * smi + offs_n[None, :] * smj,
                     mask=pair, other=0.0).to(work) * MASK_REPEAT
    if general_bh is not None:  # any other additive mask[b, h, i, j]
        s += tl.load(general_bh + offs_m[:, None] * sgi + offs_n[None, :] * sgj,
                     mask=pair, other=0.0).to(work)
    if sel_bh is not None:  # a boolean mask[b, h, i, j], applied last
        sel = tl.load(sel_bh + offs_m[:, None] * ssi + offs_n[None, :] * ssj,
                      mask=pair, other=0) != 0
        if KEEP:
            s = tl.where(sel, s, FILL)
        else:
            s = tl.where(sel, FILL, s)
    return tl.where(n_ok[None, :], s, float("-inf"))'''
