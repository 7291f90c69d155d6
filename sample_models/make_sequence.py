"""Build text_gru.onnx (token ids → Embedding → GRU → Linear) and encoder.onnx (a pre-LN
transformer block on 4 tokens of 4 features): the sequence models of the README.

Random weights (torch seed 0), untrained; legacy exporter, opset 17, symbolic batch.
Each file is checked against torch in onnxruntime on a random input.
Run from the repo root:  .venv/bin/python sample_models/make_sequence.py
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _torch_common import describe, seed_everything

HERE = Path(__file__).parent
VOCAB, EMBED, HIDDEN, STEPS, CLASSES = 20, 5, 8, 6, 3
D, HEADS, TOKENS, FEATURES = 16, 2, 4, 4


class TextGRU(torch.nn.Module):
    """ids [N, 6] → Embedding(20, 5) → GRU(5 → 8) → Linear(8 → 3) on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, EMBED)
        self.rnn = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        self.out = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.out(y[:, -1])


class Attention(torch.nn.Module):
    """Multi-head self-attention written out, batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape

        def heads(z):
            return z.reshape(b, t, HEADS, d // HEADS).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // HEADS) ** 0.5, dim=-1)
        return self.o((weights @ v).transpose(1, 2).reshape(b, t, d))


class Encoder(torch.nn.Module):
    """x [N, 4, 4] → Linear → pre-LN block (attention, ReLU MLP) → mean over tokens → Linear(16 → 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.att, self.out = torch.nn.Linear(FEATURES, D), Attention(), torch.nn.Linear(D, 3)
        self.n1, self.n2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.f1, self.f2 = torch.nn.Linear(D, 24), torch.nn.Linear(24, D)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.att(self.n1(h))
        h = h + self.f2(torch.relu(self.f1(self.n2(h))))
        return self.out(h.mean(1))


def build(model: torch.nn.Module, example: torch.Tensor, name: str, input_name: str) -> None:
    path = HERE / name
    model.eval()
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=[input_name],
        output_names=["logits"],
        dynamic_axes={input_name: {0: "N"}, "logits": {0: "N"}},
    )
    m = onnx.load(str(path))
    m.producer_version = ""  # the bytes do not depend on the torch patch release
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    batch = torch.randint(0, VOCAB, (8, STEPS)) if input_name == "ids" else torch.rand(8, TOKENS, FEATURES)
    with torch.no_grad():
        ref = model(batch).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {input_name: batch.numpy()})[0]
    print(f"{name}: onnxruntime vs torch max abs diff {float(np.abs(got - ref).max()):.3g}")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    describe(m, path)


def main() -> None:
    seed_everything(0)
    build(TextGRU(), torch.randint(0, VOCAB, (1, STEPS)), "text_gru.onnx", "ids")
    seed_everything(0)
    build(Encoder(), torch.rand(1, TOKENS, FEATURES), "encoder.onnx", "x")


if __name__ == "__main__":
    main()
