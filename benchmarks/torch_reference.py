"""PyTorch reference for benchmarks/run.py: ConvNeXt-Tiny inference and training timings.

Run by run.py as a child process (so PyTorch's OpenMP threads and TensorFlow's thread
pools never share a process) that answers one JSON command per stdin line with one JSON
line on stdout. Not meant to be run by hand, though `echo '{"cmd": "info"}' | python
benchmarks/torch_reference.py` works.

The model is timm's `convnext_tiny(num_classes=1)` when timm imports. On these machines it
does not: timm imports torchvision, and PyPI's torchvision wheels (CUDA builds) fail to
import beside the local CPU-only torch 2.13.0 ("operator torchvision::nms does not
exist"). Then the model is `TimmConvNeXtTiny` below, a plain-PyTorch copy of timm's
convnext_tiny forward pass (same layers in the same order, channels-last LayerNorm and
nn.Linear MLP as timm's default `conv_mlp=False`, exact GELU, layer scale), with the same
27,820,897 parameters as kiqa's ConvNeXt-Tiny with its one-output head. `info` says
which one ran.
"""

import json
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

DEPTHS = (3, 3, 9, 3)
DIMS = (96, 192, 384, 768)
EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (timm.layers.LayerNorm2d)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """timm ConvNeXtBlock with conv_mlp=False: dw 7x7, LN (NHWC), Linear-GELU-Linear, gamma."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


class TimmConvNeXtTiny(nn.Module):
    """timm convnext_tiny's forward pass: stem, 4 stages, pool + LayerNorm + Linear head."""

    def __init__(self, num_classes=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, DIMS[0], kernel_size=4, stride=4), LayerNorm2d(DIMS[0], eps=EPS))
        stages = []
        for i, (depth, dim) in enumerate(zip(DEPTHS, DIMS)):
            layers = []
            if i > 0:
                layers += [LayerNorm2d(DIMS[i - 1], eps=EPS), nn.Conv2d(DIMS[i - 1], dim, kernel_size=2, stride=2)]
            layers += [Block(dim) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head_norm = LayerNorm2d(DIMS[-1], eps=EPS)
        self.fc = nn.Linear(DIMS[-1], num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = self.head_norm(x.mean((2, 3), keepdim=True)).flatten(1)
        return self.fc(x)


def build_model():
    """(model, description): timm's convnext_tiny if importable, else the copy above."""
    try:
        import timm

        model = timm.create_model("convnext_tiny", pretrained=False, num_classes=1)
        return model, f"timm {timm.__version__} convnext_tiny(num_classes=1)"
    except Exception as err:  # ImportError, or torchvision's RuntimeError at import
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return TimmConvNeXtTiny(), f"plain-PyTorch copy of timm convnext_tiny (timm not importable: {reason})"


class Runner:
    def __init__(self, threads):
        self.threads = threads
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.model, self.source = build_model()
        self.model.eval()
        self.models = {}

    def _model(self, precision, training):
        key = (precision, training)
        if key not in self.models:
            model, _ = build_model()
            model.load_state_dict(self.model.state_dict())
            if precision == "bf16":
                model = model.to(memory_format=torch.channels_last)
            model.train(training)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4) if training else None
            self.models[key] = (model, optimizer)
        return self.models[key]

    def info(self, _):
        return {
            "torch_version": torch.__version__,
            "model": self.source,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "threads": self.threads,
            "mkldnn_bf16_supported": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()),
        }

    def _inputs(self, precision, batch, size):
        x = torch.rand(batch, 3, size[0], size[1]) * 255.0
        if precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def infer(self, command):
        torch.set_num_threads(command.get("threads", self.threads))
        model, _ = self._model(command["precision"], training=False)
        x = self._inputs(command["precision"], command["batch"], command["size"])
        times, cpu = [], time.process_time()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=command["precision"] == "bf16"):
            for _ in range(command["iters"]):
                start = time.perf_counter()
                model(x).float().sum().item()
                times.append(time.perf_counter() - start)
        return {"seconds": times, "cpu_seconds": time.process_time() - cpu}

    def train(self, command):
        torch.set_num_threads(command.get("threads", self.threads))
        model, optimizer = self._model(command["precision"], training=True)
        x = self._inputs(command["precision"], command["batch"], command["size"])
        y = torch.rand(command["batch"], 1)
        times, cpu = [], time.process_time()
        for _ in range(command["iters"]):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=command["precision"] == "bf16"):
                out = model(x)
            loss = F.mse_loss(out.float(), y)
            loss.backward()
            optimizer.step()
            loss.item()
            times.append(time.perf_counter() - start)
        return {"seconds": times, "cpu_seconds": time.process_time() - cpu}


def main():
    runner = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if runner is None:
                runner = Runner(command.get("threads", torch.get_num_threads()))
            reply = getattr(runner, command["cmd"])(command)
        except Exception as err:  # reported to run.py, which records it and goes on
            reply = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
