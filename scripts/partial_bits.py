#!/usr/bin/python3
"""Bits per element of a two-rank i8 partial sum (docs/protocol.md 5.9, 8.5) on real
gradients: an MLP on Fashion-MNIST, two ranks' gradients of different batches at a few
steps of SGD, flattened; per 8,192-element block each rank quantizes at its own block
exponent, the rack sums aligned; then the bytes of version 4 (one two's complement
width per block) and version 5 (zigzag, a width per 128 lanes) over the flat job's two
i8 contributions."""
import gzip, math, sys
import numpy as np, torch

def images(path):
    with gzip.open(path) as f:
        d = np.frombuffer(f.read(), np.uint8, offset=16)
    return torch.tensor(d.reshape(-1, 784), dtype=torch.float32) / 255.0

def labels(path):
    with gzip.open(path) as f:
        return torch.tensor(np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64))

root = "/usr/share/datasets/fashion-mnist/"
x, y = images(root + "train-images-idx3-ubyte.gz"), labels(root + "train-labels-idx1-ubyte.gz")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
B = 64

def grad(i):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[i * B:(i + 1) * B]), y[i * B:(i + 1) * B])
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double().numpy()

def exponent(v):
    m = np.max(np.abs(v))
    return None if m == 0 else math.floor(math.log2(m))

def bits(g0, g1):
    n = len(g0)
    v4 = v5 = 0
    for s in range(0, n, 8192):
        qs = []
        for g in (g0[s:s + 8192], g1[s:s + 8192]):
            e = exponent(g)
            if e is None:
                continue
            q = np.clip(np.rint(g * 2.0 ** (6 - e)), -127, 127).astype(np.int64)
            qs.append((max(e, -120), q))
        if not qs:
            v4 += 8; v5 += 8 * (1 + (min(8192, n - s) + 127) // 128)
            continue
        unit = min(e for e, _ in qs)
        lanes = sum(q << (e - unit) for e, q in qs)
        m = len(lanes)
        w4 = max(1, int(np.max(lanes ^ (lanes >> 63))).bit_length() + 1)
        v4 += 24 + ((m * w4 + 7) // 8) * 8
        z = (lanes << 1) ^ (lanes >> 63)
        v5 += 24
        for a in range(0, m, 128):
            w = int(np.max(z[a:a + 128])).bit_length()
            v5 += 8 + 128 * w
    return v4 / n, v5 / n

for step in range(201):
    if step in (0, 10, 50, 200):
        g0, g1 = grad(2 * step), grad(2 * step + 1)
        b4, b5 = bits(g0, g1)
        print(f"step {step}: {len(g0)} elements; bits per element up: version 4 {b4:.2f}, "
              f"version 5 {b5:.2f}; flat sends 16 (two i8 contributions): "
              f"ratio {b4 / 16:.2f} -> {b5 / 16:.2f}")
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[step * B:(step + 1) * B]), y[step * B:(step + 1) * B])
    loss.backward()
    opt.step()
