"""Layer backends: the implementations of one adapted layer's MoRA update, behind one
interface (`base.LayerBackend`, whose docstring states the semantics), one file per backend,
and one selector (`select.py`) that picks a backend once per forward pass.

    torch_backend.py  the tensor path (`experts.route` + `experts.apply_values`): any device
                      and dtype, differentiable; training uses it, and it serves wherever
                      no other backend applies.
    cpu_fused.py      the fused CPU extension (csrc/expert_layer.cpp): scores, routing,
                      update and statistics of a layer in one call, for CPU float32
                      inference (AVX2 build, else the portable build).
    triton_backend.py CUDA inference: scores by torch, then one Triton kernel per layer
                      (triton_kernel.py) for routing, update and statistics; "auto" tries
                      it for CUDA forwards only (CPU tests run it under TRITON_INTERPRET=1).
    trainable.py      `trainable_experts(pool, tensors, scale)`: experts being learned,
                      scored beside the frozen pool by the torch backend.

Per forward, `select.forward_plan` builds a `ForwardSpec` (device, dtype, grad mode, the
layout of tokens, sequences and visible slots), asks the backends of `select.AUTO_ORDER` in
turn (or the one named by `ForwardContext(backend=...)` / $MORA_BACKEND) and caches the
answer with the layout; every adapted layer then calls `plan.apply(x, y, layer)`.
`experts.mora_delta(..., backend=)` goes through the same selector.

No ctypes C library: the plain C routing library that used to serve machines without the
extension is gone. At decode sizes one C call per layer costs a fraction of the tensor
path's dozen small ops, so CPUs without AVX2 keep a C layer call, but as the extension's
portable build (cpu/build.py's `layer_kernels`: the same source, scores through at::mm) rather
than a second library with its own build, bindings and per-token routing entry point.

Adding a backend: one file with a `LayerBackend` subclass whose `prepare` refuses what it
cannot run, and its name in `select.BACKENDS` and `AUTO_ORDER` (and `AUTO_DEVICES` when
"auto" should try it only on some devices).
"""
