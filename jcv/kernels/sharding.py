"""shard_map and SPMD helpers for the FFI calls of :mod:`jcv.kernels.onednn` and
:mod:`jcv.kernels.batchnorm`: varying-axis types and the batch axis of a sharding."""
from __future__ import annotations

import jax

__all__ = ["batch_axis", "match_vma", "varying_like"]


def _vma(x) -> frozenset:
  """The shard_map axes x varies over (jax 0.10: ``manual_axis_type.varying``; older: ``vma``)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def match_vma(*arrays):
  """Casts arrays to vary over the union of their shard_map axes (no-op outside shard_map).

  A custom_vjp's gradients must have their inputs' types, so a replicated kernel used with a
  per-device batch is made per-device first (its transpose is the psum autodiff inserts).
  """
  axes = frozenset().union(*map(_vma, arrays))
  return tuple(jax.lax.pcast(a, tuple(sorted(axes - _vma(a))), to="varying") if axes - _vma(a) else a
               for a in arrays)


def varying_like(out, *operands):
  """``out`` typed to vary over the shard_map axes its operands vary over (ffi_call drops that
  type, which custom_vjp checks against the primal's inputs); a no-op outside shard_map."""
  axes = frozenset().union(*map(_vma, operands)) - _vma(out)
  return jax.lax.pcast(out, tuple(sorted(axes)), to="varying") if axes else out


def batch_axis(sharding):
  """The mesh axis the leading (batch) dimension is sharded over, or None."""
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec is not None and len(spec) else None
