"""Synchronized BatchNorm for request-sorted training, on CUDA and on CPU (gloo).

A request-sorted batch holds few users, so per-device batch statistics swing with whoever
is in the batch. Synchronizing BN statistics across all ranks makes the "statistical
batch" the global batch. On CUDA `nn.SyncBatchNorm` does that. On CPU it refuses to train
("expected input tensor to be on GPU"), so `CPUSyncBatchNorm` does the same math over
`torch.distributed` (gloo): the forward all_reduces (sum, sum of squares, count) per channel,
the backward all_reduces (sum dy, sum dy * xhat), so gradients equal those of one BatchNorm
over the concatenated global batch, whatever the local batch size of each rank.

As in `nn.SyncBatchNorm`, the weight/bias gradients each rank returns are local (its rows
only); DDP then averages them across ranks like any other parameter gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dim except the channel dim 1: [N, C] -> (0,), [N, C, H, W] -> (0, 2, 3)."""
    return [0] + list(range(2, x.dim()))


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel [C] tensor to broadcast against x [N, C, ...]."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def global_batch_stats(x: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [C], biased var [C], count) over the rows of every rank in `group`.

    Sums are accumulated in float64 so E[x^2] - E[x]^2 does not cancel away for float32
    inputs; one all_reduce carries sum, sum of squares and the local count.
    """
    dims = _reduce_dims(x)
    x64 = x.detach().to(torch.float64)
    local_count = torch.tensor([x.numel() // x.shape[1] if x.shape[1] else 0],
                               dtype=torch.float64, device=x.device)
    packed = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), local_count])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    c = x.shape[1]
    count = packed[2 * c]
    if count.item() <= 1:
        raise ValueError(f"synchronized BatchNorm needs more than 1 value per channel across ranks, got {int(count.item())}")
    mean = packed[:c] / count
    var = (packed[c:2 * c] / count - mean * mean).clamp(min=0.0)
    return mean, var, count


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with global mean/invstd, and the global backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        xhat = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        y = xhat
        if weight is not None:
            y = y * _channel_view(weight, x)
        if bias is not None:
            y = y + _channel_view(bias, x)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = count
        ctx.group = group
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        dims = _reduce_dims(dy)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_weight = sum_dy_xhat.clone() if weight is not None else None
        grad_bias = sum_dy.clone() if ctx.has_bias else None
        # Mean and variance are global, so their gradient terms need global sums.
        c = sum_dy.shape[0]
        packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
        mean_dy = (packed[:c] / ctx.count).to(dy.dtype)
        mean_dy_xhat = (packed[c:] / ctx.count).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight
        grad_x = _channel_view(scale, dy) * (dy - _channel_view(mean_dy, dy) - xhat * _channel_view(mean_dy_xhat, dy))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span every rank of a process group (gloo/CPU).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm1d/2d/3d`. Eval mode uses
    the running statistics; training without an initialized process group behaves like a
    plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _momentum_factor(self) -> float:
        """Momentum, or 1/num_batches for a cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        synced = use_batch_stats and dist.is_available() and dist.is_initialized()
        if not synced:
            factor = 0.0
            if self.training and self.track_running_stats and self.num_batches_tracked is not None:
                factor = self._momentum_factor()
            return F.batch_norm(
                x,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight, self.bias, use_batch_stats, factor, self.eps)

        group = self.process_group if self.process_group is not None else dist.group.WORLD
        mean, var, count = global_batch_stats(x, group)
        if self.training and self.track_running_stats and self.running_mean is not None:
            factor = self._momentum_factor()
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        invstd = torch.rsqrt(var + self.eps).to(x.dtype)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, mean.to(x.dtype), invstd, count.item(), group)


def _is_on_cuda(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.is_cuda for t in tensors)


def _to_cpu_sync(bn: _BatchNorm, process_group) -> CPUSyncBatchNorm:
    """A CPUSyncBatchNorm holding the same parameters and buffers as `bn`."""
    new = CPUSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                           process_group=process_group)
    if bn.affine:
        with torch.no_grad():
            new.weight = bn.weight
            new.bias = bn.bias
    new.running_mean = bn.running_mean
    new.running_var = bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _replace_batchnorms(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, _PLAIN_BATCHNORMS):
        return _to_cpu_sync(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorms(child, process_group))
    return module


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every BatchNorm in `module` synchronize its statistics across ranks.

    Without an initialized process group (and none given) the module is returned unchanged:
    a single process has nothing to synchronize. On CUDA this is torch's
    `nn.SyncBatchNorm.convert_sync_batchnorm`; on CPU every BatchNorm1d/2d/3d becomes a
    `CPUSyncBatchNorm` sharing the same parameters and buffers. Replaces in place where it
    can; use the returned module (the root itself may be a BatchNorm).
    """
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return module
    if _is_on_cuda(module):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _replace_batchnorms(module, process_group)
