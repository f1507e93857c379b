"""tinynp: a toy deep-learning framework of plain Python classes over numpy, standing in for a
third-party framework in the plugin test (tests/test_plugin.py).

- A ``Tensor`` is a numpy array with a ``trainable`` flag and a ``grad``; ``backward`` gives
  gradients to trainable tensors only, and ``SGD`` (momentum, weight decay) skips a tensor
  without one, so a frozen tensor stays bit-identical.
- A ``Module`` keeps its tensors and submodules as attributes, in assignment order; running
  statistics are plain arrays (buffers, not tensors).
- ``module.inference = True`` holds a module in inference mode (BatchNorm uses its running
  statistics, which stop moving), with everything under it, whatever ``train()`` says.
"""

from __future__ import annotations

import numpy as np


class Tensor:
    def __init__(self, data):
        self.data = np.asarray(data, dtype=np.float32)
        self.trainable = True
        self.grad = None


def _accumulate(tensor, grad):
    if tensor.trainable:  # like requires_grad: a frozen tensor gets no gradient
        tensor.grad = grad if tensor.grad is None else tensor.grad + grad


class Module:
    training = True
    inference = False

    def named_children(self):
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def named_tensors(self):
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Tensor)]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def parameters(self):
        seen = {}
        for _, module in self.named_modules():
            for _, t in module.named_tensors():
                seen.setdefault(id(t), t)
        return list(seen.values())

    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        return self.run(np.asarray(x, dtype=np.float32), not self.training)

    def run(self, x, inference):
        return self.forward(x, inference or self.inference)

    def forward(self, x, inference):
        return x

    def backward(self, dy):
        return dy


class Sequential(Module):
    def __init__(self, **layers):
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x, inference):
        for _, layer in self.named_children():
            x = layer.run(x, inference)
        return x

    def backward(self, dy):
        for _, layer in reversed(self.named_children()):
            if dy is None:
                break
            dy = layer.backward(dy)
        return dy


class Linear(Module):
    def __init__(self, n_in, n_out, rng):
        bound = 1 / np.sqrt(n_in)
        self.weight = Tensor(rng.uniform(-bound, bound, (n_out, n_in)))
        self.bias = Tensor(rng.uniform(-bound, bound, n_out))

    def forward(self, x, inference):
        self._x = x
        return x @ self.weight.data.T + self.bias.data

    def backward(self, dy):
        _accumulate(self.weight, dy.T @ self._x)
        _accumulate(self.bias, dy.sum(0))
        return dy @ self.weight.data


class Conv2d(Module):
    """A valid, stride-1 convolution over NCHW input; an input layer (no input gradient)."""

    def __init__(self, c_in, c_out, k, rng):
        bound = 1 / np.sqrt(c_in * k * k)
        self.k = k
        self.weight = Tensor(rng.uniform(-bound, bound, (c_out, c_in, k, k)))
        self.bias = Tensor(rng.uniform(-bound, bound, c_out))

    def forward(self, x, inference):
        windows = np.lib.stride_tricks.sliding_window_view(x, (self.k, self.k), axis=(2, 3))
        n, c, h, w = windows.shape[:4]
        self._cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n, h, w, -1)
        out = self._cols @ self.weight.data.reshape(len(self.bias.data), -1).T + self.bias.data
        return out.transpose(0, 3, 1, 2)

    def backward(self, dy):
        dy = dy.transpose(0, 2, 3, 1)
        grad = np.tensordot(dy, self._cols, axes=([0, 1, 2], [0, 1, 2]))
        _accumulate(self.weight, grad.reshape(self.weight.data.shape))
        _accumulate(self.bias, dy.sum((0, 1, 2)))
        return None


class BatchNorm2d(Module):
    def __init__(self, channels, momentum=0.1, eps=1e-5):
        self.weight = Tensor(np.ones(channels))
        self.bias = Tensor(np.zeros(channels))
        self.running_mean = np.zeros(channels, dtype=np.float32)
        self.running_var = np.ones(channels, dtype=np.float32)
        self.momentum, self.eps = momentum, eps

    def forward(self, x, inference):
        axes = (0, 2, 3)
        if inference:
            mean, var = self.running_mean, self.running_var
        else:
            mean, var = x.mean(axes), x.var(axes)
            m = x.size // x.shape[1]
            self.running_mean = ((1 - self.momentum) * self.running_mean + self.momentum * mean).astype(np.float32)
            self.running_var = ((1 - self.momentum) * self.running_var
                                + self.momentum * var * m / (m - 1)).astype(np.float32)
        self._batch = not inference
        self._inv = 1 / np.sqrt(var + self.eps)[None, :, None, None]
        self._xhat = (x - mean[None, :, None, None]) * self._inv
        return self.weight.data[None, :, None, None] * self._xhat + self.bias.data[None, :, None, None]

    def backward(self, dy):
        axes = (0, 2, 3)
        _accumulate(self.weight, (dy * self._xhat).sum(axes))
        _accumulate(self.bias, dy.sum(axes))
        dxhat = dy * self.weight.data[None, :, None, None]
        if not self._batch:
            return dxhat * self._inv
        m = dy.size // dy.shape[1]
        return self._inv / m * (m * dxhat - dxhat.sum(axes, keepdims=True)
                                - self._xhat * (dxhat * self._xhat).sum(axes, keepdims=True))


class ReLU(Module):
    def forward(self, x, inference):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class GlobalAvgPool(Module):
    def forward(self, x, inference):
        self._shape = x.shape
        return x.mean((2, 3))

    def backward(self, dy):
        n, c, h, w = self._shape
        return np.broadcast_to(dy[:, :, None, None] / (h * w), self._shape)


def cross_entropy(logits, labels):
    """The mean loss and its gradient with respect to the logits."""
    shifted = logits - logits.max(1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(1, keepdims=True)
    n = len(labels)
    loss = -np.log(probs[np.arange(n), labels]).mean()
    probs[np.arange(n), labels] -= 1
    return loss, probs / n


class SGD:
    """SGD with momentum and weight decay, as torch.optim.SGD: tensors without a gradient are skipped."""

    def __init__(self, tensors, lr, momentum=0.0, weight_decay=0.0):
        self.tensors, self.lr, self.momentum, self.weight_decay = list(tensors), lr, momentum, weight_decay
        self.buffers = {}

    def zero_grad(self):
        for t in self.tensors:
            t.grad = None

    def step(self):
        for t in self.tensors:
            if t.grad is None:
                continue
            d = t.grad + self.weight_decay * t.data
            buf = self.buffers.get(id(t))
            buf = d if buf is None else self.momentum * buf + d
            self.buffers[id(t)] = buf
            t.data = (t.data - self.lr * buf).astype(np.float32)
