"""What each torch-level op does to the sequence: the rule table the layout analysis reads.

An op is *positional* along a dim when output position i depends only on input position i of
that dim (elementwise ops, linear layers, norms over other dims, reshapes that keep the dim).
A positional op can run on a sequence chunk unchanged. Everything else *mixes* the sequence
along the dims it acts on. Ops not in this table are refused when they touch a sharded value:
an unknown op is never assumed to be positional.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

# Elementwise (with broadcasting): positional along every dim.
POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.invert, operator.and_,
    operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg, torch.abs,
    torch.exp, torch.log, torch.rsqrt, torch.sqrt, torch.tanh, torch.sigmoid, torch.relu, torch.sin,
    torch.cos, torch.where, torch.clamp, torch.clip, torch.maximum, torch.minimum, torch.erf,
    torch.square, torch.masked_fill, torch.lerp, torch.addcmul, torch.addcdiv, torch.reciprocal,
    torch.sign, torch.log1p, torch.expm1, torch.nan_to_num, torch.ones_like, torch.zeros_like,
    torch.full_like, torch.empty_like, torch.exp2, torch.multiply, torch.subtract, torch.divide,
    torch.negative, torch.absolute, torch.clamp_min, torch.clamp_max, torch.floor, torch.ceil,
    torch.round, torch.trunc, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.logical_xor, torch.sinh, torch.cosh,
    torch.atan, torch.log2, torch.log10, torch.sqrt, torch.fmod, torch.remainder,
    F.silu, F.gelu, F.relu, F.dropout, F.sigmoid, F.tanh, F.softplus, F.leaky_relu, F.elu,
    F.mish, F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.selu, F.celu, F.logsigmoid,
    torch._C._nn.gelu, torch._C._nn.silu, torch._C._nn.leaky_relu, torch._C._nn.softplus,
    torch._C._nn.hardtanh,
}
POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "abs", "exp", "log", "rsqrt", "sqrt", "tanh",
    "sigmoid", "relu", "sin", "cos", "float", "double", "half", "bfloat16", "to", "type_as",
    "type", "contiguous", "clone", "detach", "masked_fill", "clamp", "clip", "bool", "long",
    "int", "square", "reciprocal", "erf", "exp2", "expm1", "log1p", "sign", "floor", "ceil",
    "round", "trunc", "requires_grad_", "add_", "mul_", "sub_", "div_", "masked_fill_",
    "clamp_", "neg_", "float_power", "where", "lerp", "addcmul", "sigmoid_", "tanh_", "relu_",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "maximum",
    "minimum", "nan_to_num", "silu", "gelu",
    "new_zeros", "new_ones", "new_full", "new_empty", "expand_as",
}
# Shape ops: their output dims are mapped from input dims through the symbolic shapes.
VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}
RELAYOUT_METHODS = {"transpose", "permute", "unsqueeze", "squeeze", "t", "movedim", "swapaxes",
                    "expand", "contiguous", "swapdims", "mT"}
RELAYOUT_FUNCTIONS = {torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.t,
                      torch.movedim, torch.swapaxes, torch.stack, torch.view_as_complex, torch.view_as_real}
# Ops that take explicit size arguments: on a sharded value the sequence size becomes local.
SHAPE_ARG_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_full",
                     "new_empty", "unflatten"}
SHAPE_ARG_FUNCTIONS = {torch.reshape, torch.unflatten}
# New tensors of the sizes given: they read only the input's dtype and device, never its values.
FRESH_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}

# Ops acting along chosen dims: positional unless a dim they act on carries the sequence.
# Value: (positional index of the dim argument, its keyword name, default when absent)
# A default of None means "every dim".
DIM_FUNCTIONS = {
    torch.softmax: (1, "dim", -1), F.softmax: (1, "dim", -1), torch.log_softmax: (1, "dim", -1),
    F.log_softmax: (1, "dim", -1), torch.mean: (1, "dim", None), torch.sum: (1, "dim", None),
    torch.amax: (1, "dim", None), torch.amin: (1, "dim", None), torch.cumsum: (1, "dim", None),
    torch.cat: (1, "dim", 0), torch.concat: (1, "dim", 0), torch.norm: (2, "dim", None),
    torch.logsumexp: (1, "dim", None), torch.var: (1, "dim", None), torch.std: (1, "dim", None),
    torch.prod: (1, "dim", None), torch.cumprod: (1, "dim", None), torch.argmax: (1, "dim", None),
    torch.topk: (2, "dim", -1), torch.sort: (1, "dim", -1), torch.flip: (1, "dims", None),
    torch.roll: (2, "dims", None), torch.diff: (2, "dim", -1), F.normalize: (2, "dim", 1),
    F.glu: (1, "dim", -1), torch.split: (2, "dim", 0), torch.chunk: (2, "dim", 0),
    torch.narrow: (1, "dim", None), torch.max: (1, "dim", None), torch.min: (1, "dim", None),
    torch.any: (1, "dim", None), torch.all: (1, "dim", None), torch.count_nonzero: (1, "dim", None),
}
DIM_METHODS = {
    "softmax": (1, "dim", -1), "log_softmax": (1, "dim", -1), "mean": (1, "dim", None),
    "sum": (1, "dim", None), "amax": (1, "dim", None), "amin": (1, "dim", None),
    "cumsum": (1, "dim", None), "norm": (2, "dim", None), "logsumexp": (1, "dim", None),
    "var": (1, "dim", None), "std": (1, "dim", None), "prod": (1, "dim", None),
    "cumprod": (1, "dim", None), "argmax": (1, "dim", None), "topk": (2, "dim", -1),
    "sort": (1, "dim", -1), "flip": (1, "dims", None), "roll": (2, "dims", None),
    "split": (2, "dim", 0), "chunk": (2, "dim", 0), "narrow": (1, "dim", None),
    "max": (1, "dim", None), "min": (1, "dim", None), "any": (1, "dim", None),
    "all": (1, "dim", None), "unbind": (1, "dim", 0), "diff": (2, "dim", -1),
    "count_nonzero": (1, "dim", None),
}
# max/min of two tensors are elementwise (``torch.maximum``), of one a reduction (DIM_* above).
MAX_MIN = {torch.max, torch.min, "max", "min"}
SEQ_SUM_REDUCTIONS = {torch.sum, torch.mean, "sum", "mean"}
HISTC = {torch.histc, "histc"}  # counts over the sequence: rules.seq_reduction, the loss pass
SCATTER_ADD = {torch.scatter_add, "scatter_add", "scatter_add_"}  # into a value without the sequence: the same

LINEAR = {F.linear, torch._C._nn.linear}
MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}
# Along a dim of theirs (argument 1), element by element elsewhere: positional when that is not the sequence.
SCATTER_GATHER = {torch.gather, torch.scatter, torch.scatter_add, "gather", "scatter", "scatter_", "scatter_add",
                  "scatter_add_"}
ADDMM = {torch.addmm, "addmm"}  # bias + mat1 @ mat2 (GPT-2's Conv1D): a matmul of mat1's rows
EMBEDDING = {F.embedding, torch.embedding}
# Normalise over their trailing ``normalized_shape`` dims (group_norm, which also normalises over
# dim 1 and everything after it, is deliberately absent: refused on a sequence).
NORMS = {F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
CROSS_ENTROPY = {F.cross_entropy}
CONV1D = {torch.conv1d, F.conv1d}  # along the sequence: rules.convolution, the halo pass
PAD = {torch._C._nn.pad, F.pad}  # zeros along the sequence: rules.padding, the halo pass
# Calls with no tensor result that the analysis can ignore.
SIDE_EFFECTS = {torch._C._set_grad_enabled, torch._C._log_api_usage_once}


def op_name(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"{module}.{name}" if module and module != "_operator" else name


def target_key(node):
    return node.target  # strings for call_method, callables for call_function


def is_pointwise(node) -> bool:
    key = target_key(node)
    if key in MAX_MIN:
        other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
        value = other.meta.get("example_value", other.meta.get("val")) if hasattr(other, "meta") else None
        return isinstance(value, torch.Tensor)
    return key in (POINTWISE_METHODS if node.op == "call_method" else POINTWISE_FUNCTIONS)


def dim_spec(node):
    key = target_key(node)
    table = DIM_METHODS if node.op == "call_method" else DIM_FUNCTIONS
    return table.get(key)


def acting_dims(node, ndim: int):
    """The input dims a dim-taking op acts along (normalised), or None for every dim."""
    spec = dim_spec(node)
    index, name, default = spec
    if name in node.kwargs:
        value = node.kwargs[name]
    elif len(node.args) > index:
        value = node.args[index]
    else:
        value = default
    if node.target in ("sum", "mean", torch.sum, torch.mean) and not isinstance(value, (int, list, tuple)):
        value = None  # sum(dtype=...) and friends: every dim
    if value is None:
        return None
    dims = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(d, int) for d in dims):
        return None
    return {d % ndim if ndim else 0 for d in dims}


def is_view(node) -> bool:
    return (node.op == "call_method" and node.target in VIEW_METHODS) or (
        node.op == "call_function" and node.target in VIEW_FUNCTIONS)


def is_relayout(node) -> bool:
    return (node.op == "call_method" and node.target in RELAYOUT_METHODS) or (
        node.op == "call_function" and node.target in RELAYOUT_FUNCTIONS)


def takes_shape_args(node) -> bool:
    return (node.op == "call_method" and node.target in SHAPE_ARG_METHODS) or (
        node.op == "call_function" and node.target in SHAPE_ARG_FUNCTIONS)
