"""The digits CNN used by examples/digits-cnn.yaml and by `slipstream demo` (defined in slipstream.demo.digits).

Entry points:  model.py:build (the trained torch module), model.py:train_data, model.py:eval_data.
Run it to see the model's held-out accuracy:  .venv/bin/python examples/digits_cnn/model.py
"""

from __future__ import annotations

from slipstream.demo.digits import DigitsCNN, build, eval_data, held_out, train_data

__all__ = ["DigitsCNN", "build", "eval_data", "train_data"]

if __name__ == "__main__":
    import torch

    net = build()
    x, y = held_out()
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    print(f"held-out accuracy {accuracy:.4f}")
