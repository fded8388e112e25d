"""Wrap the target linear layers of a Hugging Face model with MoRA expert layers.

Like PEFT, the wrapper keeps the original module as `base_layer` and unpatching puts it
back; unlike PEFT there is no Python loop over adapters: every layer reads one slot buffer
of the shared `ExpertPool` and the `ForwardContext` of the current forward pass.

Supported: `nn.Linear` (Llama/Qwen/Mistral families, CLIP) and GPT-2's `Conv1D`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mora_runtime.experts.backends.select import forward_plan
from mora_runtime.experts.context import current_context, forward_context, use_snapshots
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import RoutingConfig
from mora_runtime.models.quantize import QuantizedLinear

# current_context, forward_context and use_snapshots (context.py) are part of this API: a
# patched model's forwards read the routing context they set.
__all__ = [
    "TARGET_PRESETS",
    "MoRALinear",
    "current_context",
    "default_targets",
    "find_target_modules",
    "forward_context",
    "linear_shape",
    "module_kind",
    "patch_model",
    "unpatch_model",
    "use_snapshots",
]

# Module-name suffixes adapted by default, per model family (docs/spec.md settings).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "llama-mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type == "gpt2":
        return TARGET_PRESETS["gpt2"]
    if model_type.startswith("clip"):
        return TARGET_PRESETS["clip"]
    return TARGET_PRESETS["llama"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [D, O], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features D, out_features O) of an adaptable module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, QuantizedLinear):
        return module.in_features, module.out_features
    return None


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def find_target_modules(
    model: nn.Module, targets: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Module path -> (D, O) for every adaptable module whose name matches `targets`."""
    targets = tuple(targets or default_targets(model))
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, MoRALinear):
            found[path] = linear_shape(module.base_layer)
            continue
        if ".base_layer" in path or not _matches(path, targets):
            continue
        shape = linear_shape(module)
        if shape is not None:
            found[path] = shape
    if not found:
        raise ValueError(f"no linear module of {type(model).__name__} matches {targets}")
    return found


def module_kind(path: str) -> str:
    """Bounded metric label for a module path: its last name, e.g. "q_proj"."""
    return path.rsplit(".", 1)[-1]


class MoRALinear(nn.Module):
    """y = base_layer(x) + the MoRA delta of this layer's experts (docs/spec.md step 6).

    The delta comes from the layer backend chosen once for the whole forward pass
    (mora_runtime/experts/backends: the fused CPU extension, or the tensor path on other devices,
    dtypes, with gradients or while training)."""

    def __init__(self, base_layer: nn.Module, pool: ExpertPool, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.kind = module_kind(path)
        # Plain attributes, not submodules: the pool is shared by every wrapped layer.
        object.__setattr__(self, "_pool", pool)
        object.__setattr__(self, "_layer", pool.layers[path])

    @property
    def pool(self) -> ExpertPool:
        return self._pool

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        plan = forward_plan(self._pool, x)  # selected once per forward, then cached
        if plan is None:
            return y  # no expert for any token: the base output, bit for bit
        return plan.apply(x, y, self._layer)


# Patching --------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def patch_model(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    capacity: int = 64,
    routing: RoutingConfig | None = None,
    pool: ExpertPool | None = None,
) -> ExpertPool:
    """Wrap every target module of `model`; returns the (new or given) pool it reads."""
    if getattr(model, "mora_pool", None) is not None:
        raise ValueError("model is already patched; unpatch it first")
    shapes = find_target_modules(model, targets)
    param = next(model.parameters())
    if pool is None:
        pool = ExpertPool(
            shapes, capacity=capacity, routing=routing, device=param.device, dtype=param.dtype
        )
    elif set(pool.layers) != set(shapes):
        raise ValueError("the given pool was built for different modules")
    for path in shapes:
        _set_submodule(model, path, MoRALinear(model.get_submodule(path), pool, path))
    object.__setattr__(model, "mora_pool", pool)
    return pool


def unpatch_model(model: nn.Module) -> None:
    """Put every original module back; the model is then exactly the unpatched model."""
    for path, module in list(model.named_modules()):
        if isinstance(module, MoRALinear):
            _set_submodule(model, path, module.base_layer)
    if "mora_pool" in model.__dict__:
        del model.__dict__["mora_pool"]
