"""Markers, tolerances and shared parametrizations for the test suite."""

import os

# Triton kernels must be defined under the interpreter to run on CPU tensors; the variable is
# read when a kernel is decorated, so it is set before any test module imports the package.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_DTYPES = FLOAT_DTYPES + (torch.int8,)
PATTERNS = ("1:2", "2:4", "1:4", "2:8", "4:8", "3:8", "1:16", "8:16", "2:3", "5:6")
CUTLASS_CASES = ((torch.float16, "2:4"), (torch.bfloat16, "2:4"), (torch.int8, "2:4"), (torch.float32, "1:2"))


def tiny_bert_config(**overrides):
    """A BertConfig small enough for CPU tests, built locally (no download)."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=16)
    return transformers.BertConfig(**{**sizes, **overrides})


def random_weight(shape, dtype, generator=None, zero_fraction=0.0):
    """A weight with ties and zeros in it when asked, in any supported dtype."""
    if dtype == torch.int8:
        w = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    else:
        w = torch.randn(shape, generator=generator).to(dtype)
    if zero_fraction:
        w[torch.rand(shape, generator=generator) < zero_fraction] = 0
    return w


def assert_matmul_close(actual, x, w_dense, bias=None):
    """Compare ``actual`` with ``x @ w_dense.T + bias`` at a tolerance derived from the dtype.

    Ground truth is float64. The allowed error is twice the error of plain torch computing the
    same product in the input dtype, plus one unit in the last place of the output's magnitude,
    so a kernel that rounds like torch passes and one that drops or misplaces a term fails.
    """
    truth = x.double() @ w_dense.double().T
    if bias is not None:
        truth = truth + bias.double()
    if x.dtype == torch.int8:
        assert actual.dtype == torch.int32
        assert torch.equal(actual.double(), truth), "int8 x int8 -> int32 must be exact"
        return
    assert actual.dtype == x.dtype
    plain = (x @ w_dense.T + (bias if bias is not None else 0)).double()
    ulp = torch.finfo(x.dtype).eps * truth.abs().max().clamp_min(1.0)
    allowed = 2 * (plain - truth).abs().max() + ulp
    err = (actual.double() - truth).abs().max()
    assert err <= allowed, f"max error {err:.3e} > allowed {allowed:.3e} for {x.dtype}"


class TinyTransformerNames(torch.nn.Module):
    """Names like a Transformer's: an embedding projection, blocks of Linears, a pooler and a head."""

    def __init__(self, d=16, hidden=32, classes=4):
        super().__init__()
        self.embed = torch.nn.Linear(8, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"up": torch.nn.Linear(d, hidden), "down": torch.nn.Linear(hidden, d)})
            for _ in range(2)
        )
        self.pooler = torch.nn.Linear(d, d)
        self.classifier = torch.nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block["down"](torch.nn.functional.gelu(block["up"](h)))
        return self.classifier(torch.tanh(self.pooler(h)))


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """Runs a test at 1 and at 2 torch threads (the CPU kernels split output rows over threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
