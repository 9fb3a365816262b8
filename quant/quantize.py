"""A quantized frozen base: NF4 with double quantization (QLoRA) and int8, written out in plain PyTorch.

QLoRA (Dettmers et al., 2023) fine-tunes LoRA adapters on top of a base whose weights are stored in 4 bits and
dequantized, layer by layer, only while a matmul needs them. The adapters stay in full precision.

NF4, blockwise. W is flattened and cut into blocks of 64 weights; each block is divided by its absmax, so its
values lie in [-1, 1], and each value is replaced by the index of the nearest of 16 levels. Pretrained weights are
close to normal, N(0, sigma); divided by the absmax they still follow one fixed bell shape. Levels placed at the
quantiles of N(0, 1) (inverse CDF at evenly spaced probabilities, rescaled to [-1, 1]) put the same share of
weights into each of the 16 bins: every code is used equally often, which is what makes 4 bits carry the most
information about a normal weight (the "information-theoretically optimal" data type of the paper). NF4 is
asymmetric, 8 levels above zero and 7 below plus an exact 0, so that zero (padding, pruned weights) is exact.
Two 4-bit indices are packed into one byte, the first in the high nibble (bitsandbytes' layout).

Double quantization. Each block also needs its absmax: an fp32 per 64 weights is 32/64 = 0.5 bits per weight.
QLoRA quantizes these absmax values again: subtract their mean, then quantize them to 8 bits in groups of 256
with bitsandbytes' dynamic 8-bit map (a sign, a run of zeros as an exponent, the rest a fraction: fine steps near
0, coarse ones near 1), keeping one fp32 absmax per group and the fp32 mean per tensor. Bits per weight:

    4 (the code)  +  8/64 (8-bit absmax per block)  +  32/(64*256) (fp32 absmax per group)  = 4.127
    (4.5 without double quantization; the one fp32 mean per tensor is negligible)

that is 0.516 bytes per weight instead of 4 (fp32) or 2 (bf16).

int8. One fp32 absmax per output row; q = round(127 * W / absmax) in [-127, 127]. 8 + 32/in bits per weight.
Weight-only: activations stay in full precision and the matmul runs on the dequantized weight (LLM.int8()'s
outlier decomposition, which matters when activations are quantized too, is not implemented).

QuantLinear dequantizes in its forward and again in its backward, which computes dx = dy W only: a frozen base
has no weight gradient, and since W needs no gradient the layer saves nothing for backward (no x, and no
full-precision W: autograd through F.linear(x, dequantize()) would keep one per layer until the backward).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from tools.errors import UserError
from tools.resident import peak_rss_bytes

BLOCK = 64  # weights per NF4 block
GROUP = 256  # block absmax values per group of the double quantization
METHODS = ("nf4", "int8")
DEFAULT_SKIP = ("lm_head",)  # kept in full precision: usually tied to the embedding, and the most sensitive


# ---- the two code tables ------------------------------------------------------------------------------------------
def nf4_levels(offset=0.9677083):
    """The 16 NF4 levels: quantiles of N(0, 1), 8 on the positive side and 7 on the negative, scaled to [-1, 1].

    The outermost quantile is taken at probability `offset` rather than 1 (where it would be infinite); QLoRA's
    value puts the extreme levels at about +-1.85 standard deviations before rescaling.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 quantiles > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 quantiles < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()  # (16,), levels[0] = -1, levels[7] = 0, levels[15] = 1


def dynamic_map(max_exponent_bits=7, total_bits=8):
    """bitsandbytes' signed dynamic 8-bit map (Dettmers, 2016): 256 sorted values in [-1, 1].

    For exponent i = 0..6 the values 10^(i-6) * m for m the midpoints of a linspace(0.1, 1) with 2^i + 1 points,
    with both signs; then 0 and 1. Small magnitudes get exponents, large ones get fraction bits.
    """
    values = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + total_bits - 1 - max_exponent_bits) + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / 2.0 * 10 ** (-(max_exponent_bits - 1) + i)).tolist()
        values += means + [-m for m in means]
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))  # none left over for 8 bits, kept for other widths
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


NF4 = nf4_levels()
DYNAMIC = dynamic_map()
# dequantizing a packed byte b gives (NF4[b >> 4], NF4[b & 15]): one gather per byte from this (256, 2) table
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)


def nearest(scaled, levels):
    """Index (uint8) of the nearest of the sorted `levels` for each value of `scaled`: search the midpoints."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def absmax_quantize(values, block, levels):
    """Blockwise absmax quantization of a 1-D tensor: (codes uint8 (n_blocks, block), absmax fp32 (n_blocks,)).

    Zeros pad the last block; they change neither its absmax nor any other code."""
    blocks = F.pad(values, (0, -values.numel() % block)).view(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # each block now in [-1, 1]
    return nearest(scaled, levels), absmax


# ---- quantized weights --------------------------------------------------------------------------------------------
class NF4Weight(nn.Module):
    """An (out, in) weight in NF4 with double-quantized absmax. Buffers, so .to(device) and state_dict see them."""
    method = "nf4"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        n = weight.numel()
        codes, absmax = absmax_quantize(weight.detach().reshape(-1).float(), BLOCK, NF4)  # (n_blocks, 64), (n_blocks,)
        codes = codes.view(-1)
        self.register_buffer("codes", ((codes[0::2] << 4) | codes[1::2])[: (n + 1) // 2])  # (ceil(n/2),) uint8
        absmax_mean = absmax.mean()  # absmax values are all positive: centre them to use the map's sign bit
        absmax_codes, absmax_scale = absmax_quantize(absmax - absmax_mean, GROUP, DYNAMIC)
        absmax_codes = absmax_codes.view(-1)[: absmax.numel()]
        self.register_buffer("absmax_codes", absmax_codes)  # (n_blocks,) uint8
        self.register_buffer("absmax_scale", absmax_scale)  # (n_groups,) fp32
        self.register_buffer("absmax_mean", absmax_mean)  # () fp32

    def block_absmax(self):
        """The fp32 absmax of each 64-weight block, back from its 8-bit code: (n_blocks,)."""
        n_blocks = self.absmax_codes.numel()
        scaled = DYNAMIC.to(self.absmax_scale.device)[self.absmax_codes.long()]  # (n_blocks,) in [-1, 1]
        groups = F.pad(scaled, (0, -n_blocks % GROUP)).view(-1, GROUP) * self.absmax_scale[:, None]  # (n_groups, 256)
        return groups.view(-1)[:n_blocks] + self.absmax_mean

    def dequantize(self) -> torch.Tensor:
        """W (out, in) in the weight's original dtype; computed in fp32."""
        n = self.shape[0] * self.shape[1]
        pairs = NF4_PAIRS.to(self.codes.device).index_select(0, self.codes.int())  # (n/2, 2): both nibbles
        values = F.pad(pairs.view(-1), (0, -pairs.numel() % BLOCK)).view(-1, BLOCK)  # (n_blocks, 64) in [-1, 1]
        return (values * self.block_absmax()[:, None]).view(-1)[:n].view(self.shape).to(self.dtype)

    @property
    def device(self):
        return self.codes.device

    def extra_repr(self):
        return f"shape={self.shape}, dtype={self.dtype}, {8 * self.nbytes() / (self.shape[0] * self.shape[1]):.3f} " \
               f"bits/weight"

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Weight(nn.Module):
    """An (out, in) weight as int8 with one fp32 absmax per output row."""
    method = "int8"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        w = weight.detach().float()
        row_absmax = w.abs().amax(dim=1)  # (out,)
        scale = torch.where(row_absmax > 0, 127.0 / row_absmax, torch.zeros_like(row_absmax))  # an all-zero row: 0
        self.register_buffer("codes", torch.round(w * scale[:, None]).to(torch.int8))  # (out, in) in [-127, 127]
        self.register_buffer("row_absmax", row_absmax)  # (out,) fp32

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * (self.row_absmax / 127.0)[:, None]).to(self.dtype)  # (out, in)

    device, extra_repr, nbytes = NF4Weight.device, NF4Weight.extra_repr, NF4Weight.nbytes


QUANTIZERS = {"nf4": NF4Weight, "int8": Int8Weight}


# ---- the layer ----------------------------------------------------------------------------------------------------
class DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized when needed; backward dx = dy W only (W is frozen, b usually too).

    custom_fwd/custom_bwd: under CUDA autocast the GEMMs run in bf16 in both directions, as in lora/layer.py.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, qweight, bias):
        ctx.qweight = qweight  # the packed weight, not a full-precision copy: dequantized again in backward
        ctx.has_bias = bias is not None
        return F.linear(x, qweight.dequantize(), bias)  # (..., out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        need_x, _, need_b = ctx.needs_input_grad
        dx = grad_out @ ctx.qweight.dequantize().to(grad_out.dtype) if need_x else None  # (..., out) @ (out, in)
        db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if need_b and ctx.has_bias else None  # (out,)
        return dx, None, db


def dequant_linear(x, qweight, bias=None):
    return DequantLinear.apply(x, qweight, bias)


def dense(weight):
    """A frozen weight as an (out, in) tensor: the tensor itself, or a quantized weight dequantized (fp32 compute)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


def frozen_linear(x, weight, bias=None):
    """x W^T + b for a frozen W: F.linear, or for a quantized W the linear above, which dequantizes in forward and
    backward rather than keeping a full-precision copy of W for the backward."""
    return F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else dequant_linear(x, weight, bias)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is quantized (NF4Weight or Int8Weight); the bias stays as it was.

    Like nn.Linear it has `weight` and `bias`, so LoRALinear wraps it the same way (lora/layer.py)."""

    def __init__(self, weight: nn.Module, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str):
        return cls(QUANTIZERS[method](linear.weight), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.dequantize()  # (out, in)

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer multiplies by, dequantized: what model/lm.py's chunked loss asks a head
        for (an nn.Linear's is its `weight`; here `weight` is packed)."""
        return self.dequantize()

    def forward(self, x):
        return dequant_linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"method={self.weight.method}"


# ---- quantizing a model -------------------------------------------------------------------------------------------
def check_method(method):
    if method not in METHODS:
        raise UserError(f"quantize method {method!r} is unknown: use one of {', '.join(METHODS)}")
    return method


def quantizable(model, skip=DEFAULT_SKIP):
    """Names of the nn.Linear layers quantize() replaces: all but `skip` (names or '.'-suffixes, as LoRA targets)
    and any whose weight is shared with another module (a tied head stays tied to its embedding)."""
    from model.modules import name_matches, tied_owners
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UserError(f"{type(model).__name__} is already quantized; quantize a full-precision model once")
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if adapted:
        raise UserError(f"{type(model).__name__} has LoRA layers ({adapted[0]}, ...): quantize the base first, "
                         f"then apply_lora (QLoRA trains full-precision adapters on a quantized base)")
    owners = tied_owners(model)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not name_matches(n, tuple(skip))
            and len(owners[id(m.weight)]) == 1]


@torch.no_grad()
def quantize(model: nn.Module, method: str, skip=DEFAULT_SKIP) -> nn.Module:
    """Replace every nn.Linear (but `skip` and tied weights) by a frozen QuantLinear, in place, one at a time:
    each full-precision weight is dropped as soon as its packed copy exists. Returns the model."""
    check_method(method)
    for name in quantizable(model, skip):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear.from_linear(model.get_submodule(name), method))
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (in place; for export)."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantize(), requires_grad=False)
        linear.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def quantized_bytes(model):
    """(bytes, weights) over the model's quantized weights: bytes / weights is the storage per weight."""
    qweights = [m for m in model.modules() if isinstance(m, tuple(QUANTIZERS.values()))]  # in a LoRA layer too
    return sum(w.nbytes() for w in qweights), sum(w.shape[0] * w.shape[1] for w in qweights)


# ---- loading a checkpoint quantized, tensor by tensor -------------------------------------------------------------
def load_quantized(spec, method, skip=DEFAULT_SKIP, dtype=None, verbose=True, **overrides):
    """A Hugging Face folder of any family in model.MODELS (or cached hub name), or a .gguf file, its Linear layers quantized as
    they are read.

    The model is built on the meta device (no memory), then filled one tensor at a time (formats/stream.py; for a
    .gguf, formats/gguf.py dequantizes llama.cpp's blocks one tensor at a time first, so its weights are rounded
    twice: to the file's type, then to `method`): a weight to quantize exists in full precision only until its
    packed copy is made. Peak memory is the packed model, the unquantized tensors (embeddings, norms, biases,
    skipped layers) and one layer's weight with its temporaries. `overrides` may set dropout, as for from_pretrained.
    """
    if str(spec).endswith(".gguf"):
        from formats.gguf import meta_model_and_gguf_tensors
        model, tensors, describe = meta_model_and_gguf_tensors(spec, **overrides)
    else:
        from formats.stream import meta_model_and_hf_tensors
        model, tensors, describe = meta_model_and_hf_tensors(spec, **overrides)
    return fill_quantized(model, tensors, method, skip, dtype, describe, verbose)


@torch.no_grad()
def fill_quantized(model, tensors, method, skip=DEFAULT_SKIP, dtype=None, describe="checkpoint", verbose=True):
    """Materialize a meta-device `model` from an iterable of (name, tensor), quantizing its Linear weights
    (all but `skip` and tied ones) as they arrive. Other tensors become Parameters in `dtype` (default fp32)."""
    check_method(method)
    dtype = dtype or torch.float32
    rss_before = peak_rss_bytes()
    targets = set(quantizable(model, skip))
    params = dict(model.named_parameters(remove_duplicate=False))
    names_of = {}  # id(meta parameter) -> every name it has (a tied weight has two)
    for name, p in params.items():
        names_of.setdefault(id(p), []).append(name)
    loaded, packed = set(), {}
    for name, tensor in tensors:
        if name not in params:
            raise UserError(f"{describe}: tensor {name} does not belong to {type(model).__name__}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UserError(f"{describe}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(params[name].shape)}")
        module_name, _, kind = name.rpartition(".")
        if module_name in targets and kind == "weight":
            packed[module_name] = QUANTIZERS[method](tensor.to(dtype))  # the full-precision copy is dropped here
            loaded.add(name)
            continue
        value = nn.Parameter(tensor.to(dtype, copy=True))
        for alias in names_of[id(params[name])]:  # every module holding it: ties survive
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, value)
            loaded.add(alias)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"{describe}: no tensor for {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    for module_name, qweight in packed.items():
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(qweight, model.get_submodule(module_name).bias))
    if verbose:
        nbytes, n = quantized_bytes(model)
        other = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"loaded {describe} with {len(packed)} Linear layers in {method}: {nbytes / 2**20:,.1f} MiB for "
              f"{n:,} weights ({nbytes / n:.3f} bytes each) + {other / 2**20:,.1f} MiB unquantized; peak RSS while "
              f"loading {peak_rss_bytes() / 2**20:,.0f} MiB (before: {rss_before / 2**20:,.0f} MiB)")
    return model
