"""A masked Vision Transformer built from timm's layers.

One backbone for every method: any patch size (1 included) and number of channels; sin-cos or
learned position embeddings (resized for other input sizes); optional [CLS], registers and CLIP
options (``pre_norm``, QuickGELU, ``patch_bias=False``); two maskings, usable together: ``mask``
(bool [B, N], iBOT/DINOv2: mask token before position embeddings) and ``idx_keep`` (I-JEPA/MSN:
kept indices, a list processed as one batch in the official ``apply_masks`` order).

Token order: [CLS], registers, patches. State-dict keys follow timm / the official I-JEPA and DINOv2
code, so official checkpoints load without renaming (see ``visrep.hub``).
Specification and notes: docs/models/vit.md
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, PatchEmbed, QuickGELU, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from visrep.distributed import is_fsdp_module

__all__ = ["ACT_LAYERS", "VisionTransformer", "clip_init_", "sincos_pos_embed_2d", "apply_masks",
           "repeat_interleave_batch",
           "VIT_SIZES", "HEADS_BY_DIM", "attention_backend", "block_tail", "run_blocks", "vit_from_config", "Normalize"]

# MLP activations by config name (CLIP / Llip towers use QuickGELU, x * sigmoid(1.702 x))
ACT_LAYERS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}

# The one size table: name -> (embed_dim, depth, num_heads) of the official factories (I-JEPA's
# vit_giant is 1408-d with mlp_ratio 48/11; DINOv2's vit_giant2 is 1536-d with 24 heads).
VIT_SIZES = {
    "pico": (96, 6, 3),
    "mini": (128, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16),
    "giant2": (1536, 40, 24),
}
# head count of each official width (used to rebuild a ViT from a checkpoint's tensor shapes)
HEADS_BY_DIM = {dim: heads for name, (dim, _, heads) in VIT_SIZES.items() if name != "mini"}


def swiglu_ffn(in_features: int, hidden_features: int, act_layer=None, **kwargs) -> GluMlp:
    """DINOv2's ``SwiGLUFFNFused`` from timm's ``GluMlp``: ``fc2(silu(x1) * x2)`` with ``[x1, x2] = fc1(x)``,
    hidden width ``(int(2/3 * hidden_features) + 7) // 8 * 8`` (4096 for ViT-g/14 at mlp_ratio 4).
    Official keys ``mlp.w12`` / ``mlp.w3`` are ours ``mlp.fc1`` / ``mlp.fc2`` (``visrep.hub``)."""
    hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
    return GluMlp(in_features, hidden_features=2 * hidden, act_layer=nn.SiLU, gate_last=False, **kwargs)


FFN_LAYERS = {"mlp": None, "swiglu": swiglu_ffn}  # None: timm's Mlp (fc1 -> act -> fc2)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Fixed 2-D sin-cos table [(1 +) H*W, D], computed in float64 (MAE / I-JEPA layout).

    The first D/2 channels encode the column (w) coordinate, the last D/2 the row (h); each half
    is [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (D/4)).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def one_d(pos: Tensor, dim: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_d(cols, embed_dim // 2), one_d(rows, embed_dim // 2)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.to(dtype)


def _as_list(masks: Tensor | Sequence[Tensor] | None) -> list[Tensor] | None:
    if masks is None:
        return None
    return [masks] if isinstance(masks, Tensor) else list(masks)


def apply_masks(x: Tensor, masks: Tensor | Sequence[Tensor]) -> Tensor:
    """Gather tokens ``x`` [B, N, D] at each index tensor [B, K]; concatenate mask-major [M*B, K, D].

    A 2-D ``x`` [N, D] is a table shared by the whole batch (position embeddings).
    """
    index = torch.cat(_as_list(masks), dim=0)                         # [M*B, K]
    if x.dim() == 2:
        return x[index]
    batch, n = x.shape[:2]
    offsets = torch.arange(batch, device=x.device).repeat(index.size(0) // batch) * n
    return x.reshape(batch * n, -1)[index + offsets.unsqueeze(1)]


def repeat_interleave_batch(x: Tensor, batch_size: int, repeat: int) -> Tensor:
    """[(G*B), ...] -> [(G*repeat*B), ...]: each consecutive block of B rows is repeated ``repeat`` times."""
    if repeat == 1:
        return x
    g = x.size(0) // batch_size
    x = x.reshape(g, 1, batch_size, *x.shape[1:]).expand(g, repeat, batch_size, *x.shape[1:])
    return x.reshape(g * repeat * batch_size, *x.shape[3:])


# On CPU, sequences at least this long use the flash kernel (tiled, no [N, N] attention matrix);
# shorter ones the composite "math" kernel, which is faster there (benchmarks/train_throughput.py).
CPU_FLASH_MIN_TOKENS = 128


def attention_backend(x: Tensor):
    """SDPA backend for a token tensor ``x`` [..., N, D]. On CPU: the composite "math" kernel (two
    matmuls and a softmax) below ``CPU_FLASH_MIN_TOKENS`` tokens, the flash kernel from there on
    (pixel tokens: 2.0x the images/s of "math" at 784 tokens and no [N, N] matrix; measured with
    ``benchmarks/train_throughput.py --size pico``); on GPU SDPA picks flash / memory-efficient
    kernels itself."""
    backends = cpu_attention_backends(x)
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()


def cpu_attention_backends(x: Tensor) -> list[SDPBackend] | None:
    """The SDPA kernels :func:`attention_backend` allows for ``x`` (None: SDPA's own choice)."""
    if x.device.type != "cpu":
        return None
    long = x.dim() >= 2 and x.shape[-2] >= CPU_FLASH_MIN_TOKENS
    return [SDPBackend.FLASH_ATTENTION if long else SDPBackend.MATH]


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, checkpointing: bool = False, **kwargs) -> Tensor:
    """``x`` through ``blocks`` in order (``kwargs`` to every block, e.g. ``is_causal``); with
    ``checkpointing`` (and gradients on) each block's activations are recomputed in the backward pass
    instead of stored (non-reentrant ``torch.utils.checkpoint``, RNG replayed): less memory for about
    one more forward pass (official for Llip H/14 and G/14, StoP)."""
    recompute = checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(_block_call, blk, x, use_reentrant=False, **kwargs) if recompute else blk(x, **kwargs)
    return x


def _block_call(blk: nn.Module, x: Tensor, **kwargs) -> Tensor:
    with attention_backend(x):  # the recomputation in backward must pick the same SDPA kernel
        return blk(x, **kwargs)


def block_tail(blk: Block, x: Tensor, start: int) -> Tensor:
    """``blk(x)[:, start:]`` without computing what is thrown away.

    Keys and values come from every token, but queries, the output projection and the MLP are
    computed only for tokens ``start:`` (e.g. the predictor's last block, whose context outputs are
    discarded). Supports timm's ``Block`` (LayerScale, drop-path, optional qk-norm). An FSDP2 unit
    (``train.parallel=fsdp``) runs its whole forward, whose hooks gather its parameters.
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None or is_fsdp_module(blk):
        return blk(x)[:, start:]
    B, N, _ = x.shape
    h = blk.norm1(x)
    d = attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, start:], w[:d], None if b is None else b[:d])
    kv = F.linear(h, w[d:], None if b is None else b[d:])
    q = q.reshape(B, N - start, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, N - start, d))))
    y = x[:, start:] + blk.drop_path1(blk.ls1(o))
    return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))


def _add_subset_residual(x: Tensor, branch, p: float) -> Tensor:
    """``branch`` on a random subset of ``max(int(b (1 - p)), 1)`` samples, added back scaled by
    ``b / subset`` (DINOv2's ``drop_add_residual_stochastic_depth``; the subset from torch's global RNG)."""
    b = x.shape[0]
    keep = max(int(b * (1 - p)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    residual = branch(x[idx])
    return torch.index_add(x.flatten(1), 0, idx, residual.to(x.dtype).flatten(1), alpha=b / keep).view_as(x)


class SubsetDropPathBlock(Block):
    """timm's ``Block`` (same keys) whose stochastic depth, in training, runs each residual branch on a
    random subset of the batch instead of zeroing per sample (``drop_path_mode="batch_subset"``: the
    official DINOv2 block on its training path, ``forward_nested`` over the crop lists, for any rate above
    0; its single-tensor ``forward`` uses the subset only above 0.1); in eval it is the plain block."""

    def __init__(self, *args, drop_path: float = 0.0, **kwargs):
        super().__init__(*args, drop_path=0.0, **kwargs)
        self.subset_drop = drop_path

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.training or not self.subset_drop or args or kwargs:
            return super().forward(x, *args, **kwargs)
        x = _add_subset_residual(x, lambda h: self.ls1(self.attn(self.norm1(h))), self.subset_drop)
        return _add_subset_residual(x, lambda h: self.ls2(self.mlp(self.norm2(h))), self.subset_drop)


def redraw_linear_(*modules: nn.Module) -> None:
    """Official ``init_model``: trunc_normal(0.02) for every ``nn.Linear`` weight, zero bias."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def init_transformer_(module: nn.Module, blocks: Sequence[nn.Module], rescale: bool = True) -> None:
    """trunc_normal(0.02) Linear/Conv, LN (1, 0); I-JEPA's 1/sqrt(2*layer) rescale of residual outputs."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if rescale:
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))


def clip_init_(vit: VisionTransformer) -> None:
    """CLIP's / open_clip's vision-tower initialisation (the official Llip ``VisualTransformer``): class /
    mixture tokens and learned positions ~ N(0, width^-1/2), PyTorch's default Linear / Conv init,
    ``nn.MultiheadAttention``'s (xavier-uniform packed q/k/v, zero biases)."""
    scale = vit.embed_dim ** -0.5
    for p in (vit.cls_token, vit.register_tokens, vit.pos_embed if vit.pos_embed_type == "learned" else None):
        if p is not None:
            nn.init.normal_(p, std=scale)
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    for blk in vit.blocks:
        nn.init.xavier_uniform_(blk.attn.qkv.weight)
        for b in (blk.attn.qkv.bias, blk.attn.proj.bias):
            if b is not None:
                nn.init.zeros_(b)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "sincos",
        class_token: bool = False,
        num_registers: int = 0,
        mask_token: bool = False,
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        drop_path_mode: str = "per_sample",
        norm_eps: float = 1e-6,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        interpolate_float32: bool = True,
        rescale_init: bool = True,
        patch_init: str = "trunc_normal",
        register_pos: bool = False,
        pre_norm: bool = False,
        act_layer: str = "gelu",
        patch_bias: bool = True,
        pixel_permutation: int | None = None,
        ffn: str = "mlp",
    ):
        super().__init__()
        # constructor arguments, enough to rebuild this module (exports, ``visrep.hub.load_exported``)
        self.arch = dict(img_size=list(img_size) if not isinstance(img_size, int) else img_size,
                         patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, pos_embed=pos_embed,
                         class_token=class_token, num_registers=num_registers, mask_token=mask_token,
                         init_values=init_values, norm_eps=norm_eps, interpolate_offset=interpolate_offset,
                         interpolate_antialias=interpolate_antialias, register_pos=register_pos,
                         pre_norm=pre_norm, act_layer=act_layer, patch_bias=patch_bias,
                         interpolate_float32=interpolate_float32, pixel_permutation=pixel_permutation,
                         ffn=ffn)
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = False  # activation checkpointing per block (a runtime switch, not arch)
        self.num_prefix = int(class_token) + num_registers
        if register_pos and pos_embed != "learned":
            raise ValueError("register_pos=True (position embeddings for registers) needs pos_embed='learned'")
        if ffn not in FFN_LAYERS:
            raise ValueError(f"ffn must be one of {sorted(FFN_LAYERS)}, got {ffn!r}")
        if act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer must be one of {sorted(ACT_LAYERS)}, got {act_layer!r}")
        # prefix tokens that have a row in the position table: [CLS] and (register_pos) the registers
        self.num_pos_prefix = int(class_token) + (num_registers if register_pos else 0)
        self.pos_embed_type = pos_embed
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_float32 = interpolate_float32

        # locality control (PiT): one fixed permutation of the pixel positions (drawn from this seed),
        # applied to every input image before patchifying, at training and evaluation alike
        self.pixel_permutation = pixel_permutation
        if pixel_permutation is not None:
            perm = torch.randperm(self.img_size[0] * self.img_size[1],
                                  generator=torch.Generator().manual_seed(pixel_permutation))
            self.register_buffer("pixel_perm", perm, persistent=False)
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim, strict_img_size=False,
                                      bias=patch_bias)
        self.grid = self.patch_embed.grid_size
        n_pos = self.grid[0] * self.grid[1] + self.num_pos_prefix
        if pos_embed == "sincos":
            table = sincos_pos_embed_2d(embed_dim, *self.grid, cls_token=class_token, dtype=torch.float32)
            self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        dpr = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth).tolist()
        if drop_path_mode not in ("per_sample", "batch_subset"):
            raise ValueError(f"drop_path_mode must be 'per_sample' or 'batch_subset', got {drop_path_mode!r}")

        def block_class(rate: float) -> type[Block]:  # DINOv2's training path (lists): any rate above 0
            return SubsetDropPathBlock if drop_path_mode == "batch_subset" and rate > 0 else Block

        self.blocks = nn.ModuleList(
            block_class(dpr[i])(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                                drop_path=dpr[i], norm_layer=norm_layer, act_layer=ACT_LAYERS[act_layer],
                                **({"mlp_layer": FFN_LAYERS[ffn]} if FFN_LAYERS[ffn] else {})) for i in range(depth))
        self.norm = norm_layer(embed_dim)
        self._init_weights(rescale_init)
        if patch_init == "xavier":
            # MAE's choice: the patch projection initialised like a Linear layer (xavier_uniform),
            # so that image content is not drowned by the position embeddings at the start.
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        elif patch_init != "trunc_normal":
            raise ValueError(f"patch_init must be 'trunc_normal' or 'xavier', got {patch_init!r}")

    def disable_drop_path(self) -> None:
        """No stochastic depth in any block (EMA teachers: the same weights, deterministic)."""
        for blk in self.blocks:
            blk.drop_path1, blk.drop_path2 = nn.Identity(), nn.Identity()
            if isinstance(blk, SubsetDropPathBlock):
                blk.subset_drop = 0.0

    # -- init ----------------------------------------------------------------------------------
    def _init_weights(self, rescale: bool) -> None:
        init_transformer_(self, self.blocks, rescale)
        for p in (self.cls_token, self.register_tokens, self.mask_token):
            if p is not None:
                trunc_normal_(p, std=0.02)
        if self.pos_embed_type == "learned":
            trunc_normal_(self.pos_embed, std=0.02)

    # -- position embeddings -------------------------------------------------------------------
    def patch_pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings of the patch tokens for a grid_h x grid_w grid: [1, H*W, D]."""
        pos = self.pos_embed[:, self.num_pos_prefix:]
        if (grid_h, grid_w) == tuple(self.grid):
            return pos
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_2d(self.embed_dim, grid_h, grid_w).to(pos).unsqueeze(0)
        # learned: bicubic resize in float32, as DINOv2 (scale factor (g + offset) / g_native); MSN
        # resizes in the model's dtype to the target grid (interpolate_float32=False, offset 0)
        gh, gw = self.grid
        grid = (pos.float() if self.interpolate_float32 else pos).reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        kwargs = ({"scale_factor": ((grid_h + self.interpolate_offset) / gh, (grid_w + self.interpolate_offset) / gw)}
                  if self.interpolate_offset else {"size": (grid_h, grid_w)})
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)

    # -- forward -------------------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor, idx_keep: Tensor | Sequence[Tensor] | None = None,
                       mask: Tensor | None = None) -> Tensor:
        """Patchify, substitute masked tokens, add positions, keep ``idx_keep``, prepend prefix tokens."""
        self._check_input(x)
        if self.pixel_permutation is not None:
            x = self.permute_pixels(x)
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)                                            # [B, N, D]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask= needs a model built with mask_token=True")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.patch_pos_embed(grid_h, grid_w)
        if idx_keep is not None:
            x = apply_masks(x, idx_keep)
        prefix = []
        if self.cls_token is not None:
            prefix.append((self.cls_token + self.pos_embed[:, :1]).expand(x.size(0), -1, -1))
        if self.register_tokens is not None:
            reg = self.register_tokens
            if self.num_pos_prefix > int(self.cls_token is not None):   # register_pos
                c = int(self.cls_token is not None)
                reg = reg + self.pos_embed[:, c:c + reg.shape[1]]
            prefix.append(reg.expand(x.size(0), -1, -1))
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        return self.norm_pre(x)

    def permute_pixels(self, x: Tensor) -> Tensor:
        """``x`` [B, C, H, W] with its pixel positions reordered by the model's fixed permutation."""
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ValueError(f"pixel_permutation is fixed for {tuple(self.img_size)} images, got {tuple(x.shape[-2:])}")
        return x.flatten(2)[:, :, self.pixel_perm].view_as(x)

    def _check_input(self, x: Tensor) -> None:
        in_chans = self.patch_embed.proj.in_channels
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(f"expected images [B, {in_chans}, H, W], got a tensor of shape {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}")

    def forward(self, x: Tensor, idx_keep: Tensor | Sequence[Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        """All output tokens after the final norm: [B (x n_masks), prefix + kept patches, D]."""
        x = self.prepare_tokens(x, idx_keep, mask)
        with attention_backend(x):
            return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Self-attention probabilities of every block, ``[B, heads, L, L]`` each (token order as
        the sequence: prefix tokens, then patches), recomputed from each block's input."""
        maps = []
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            a = blk.attn
            B, L, _ = x.shape
            qkv = a.qkv(blk.norm1(x)).reshape(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            maps.append((q @ k.transpose(-2, -1) * a.scale).softmax(-1))
            x = blk(x)
        return maps

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """DINOv2-style output dict: normed cls / register / patch tokens and the pre-norm sequence."""
        x = self.prepare_tokens(x, mask=mask)
        with attention_backend(x):
            x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x_norm = self.norm(x)
        c = int(self.cls_token is not None)
        return {
            "x_norm_clstoken": x_norm[:, 0] if c else None,
            "x_norm_regtokens": x_norm[:, c:self.num_prefix],
            "x_norm_patchtokens": x_norm[:, self.num_prefix:],
            "x_prenorm": x,
            "masks": mask,
        }

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last ``n`` blocks (or of the listed block indices), DINOv2 semantics."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        take = set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        x = self.prepare_tokens(x)
        outputs = []
        with attention_backend(x):
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i in take:
                    outputs.append(x)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, self.num_prefix:] for o in outputs]
        if reshape:
            patches = [p.reshape(p.size(0), grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def pooled(self, x: Tensor, pool: str = "avg") -> Tensor:
        """A single vector per image: average of patch tokens ('avg', I-JEPA probe) or the [CLS] token."""
        tokens = self.forward(x)
        if pool == "cls":
            if self.cls_token is None:
                raise ValueError("pool='cls' needs a model with a class token")
            return tokens[:, 0]
        return tokens[:, self.num_prefix:].mean(dim=1)


def vit_from_config(model_cfg, in_chans: int, image_size: int, **overrides) -> VisionTransformer:
    """The ViT a ``model:`` config section describes (``visrep.config.ModelConfig``), for
    ``in_chans`` x ``image_size`` inputs; ``overrides`` replace constructor arguments."""
    mc = model_cfg
    kwargs = dict(img_size=image_size, patch_size=mc.patch_size, in_chans=in_chans, embed_dim=mc.embed_dim,
                  depth=mc.depth, num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio, qkv_bias=mc.qkv_bias,
                  pos_embed=mc.pos_embed, class_token=mc.class_token, num_registers=mc.num_registers,
                  drop_path_rate=mc.drop_path_rate, init_values=mc.init_values, patch_init=mc.patch_init,
                  pixel_permutation=mc.pixel_permutation, ffn=mc.ffn)
    kwargs.update(overrides)
    vit = VisionTransformer(**kwargs)
    vit.grad_checkpointing = mc.grad_checkpointing
    return vit


class Normalize(nn.Module):
    """``uint8`` (or float in [0, 1]) images -> ``(x - mean) / std`` in float32 (or the given dtype).

    Mean and std are non-persistent buffers: they come from the data (``DataInfo``), not the weights.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        images = images.to(self.mean.device, non_blocking=True)
        if images.dtype == torch.uint8:  # our own float copy, normalised in place (the same values)
            if images.device.type == "cpu" and images.dim() >= 4 and images.numel() > 1 << 20:
                return self._normalize_uint8_cpu(images)
            return images.float().div_(255).sub_(self.mean).div_(self.std)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _normalize_uint8_cpu(self, images: Tensor) -> Tensor:
        """Chunks of about 1M values, each converted and normalised while in the cache: one pass over
        memory instead of four (on a CPU, a decoded batch is memory-bound)."""
        out = torch.empty(images.shape, dtype=torch.float32)
        rows = max(1, (1 << 20) // max(1, images[0].numel()))
        for i in range(0, images.shape[0], rows):
            out[i:i + rows].copy_(images[i:i + rows]).div_(255).sub_(self.mean).div_(self.std)
        return out


def encode_views(encoder: nn.Module, views: Sequence[Tensor], idx_keep: Tensor | None = None,
                 head: nn.Module | None = None) -> Tensor:
    """Official multi-crop forward: views of equal size run as one batch (concatenated view-major),
    ``idx_keep`` (patch indices [B_group, K]) masks the first run only; the [CLS] output after the
    final norm goes through ``head`` per run. Returns ``[sum of batch sizes, D]``."""
    out, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        x = views[start] if end == start + 1 else torch.cat(list(views[start:end]))
        keep = idx_keep if start == 0 else None
        if keep is not None and keep.shape[0] != x.shape[0]:
            keep = keep.repeat(x.shape[0] // keep.shape[0], 1)
        h = encoder(x, idx_keep=keep)[:, 0]
        out.append(head(h) if head is not None else h)
        start = end
    return torch.cat(out)
