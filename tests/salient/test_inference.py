"""The one inference wrapper every model stage runs: uint8 in, the model's outputs under the
configured precision; compiled models see one static batch shape; a worker takes two items at once."""

import threading

import pytest
import torch

from salient import models
from salient.config import ComputeConfig
from salient.errors import ConfigError
from salient.inference import Inference
from salient.stage import ITEMS_PER_WORKER, LocalExecutor
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", num_classes=5)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)


def test_uint8_pixels_give_the_plain_models_outputs_on_unit_images(checkpoint):
    plain = models.load(checkpoint, "tiny_resnet")  # no BatchNorm folding, no channels-last
    inf = Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(), device="cpu", need_discovery=True)
    x = pixels(6)
    with torch.inference_mode():
        ref = plain(x.float() / 255.0)
    out = inf(x)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_configured_precision_is_used(checkpoint):
    inf = Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(precision="bf16"), device="cpu", need_discovery=True)
    out = inf(pixels(2))
    assert out.logits.dtype == torch.bfloat16 and out.maps.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(precision="fp16"), device="cpu")


@pytest.mark.heavy  # torch.compile takes a minute or more on two cores
def test_a_compiled_model_pads_the_last_batch_and_agrees_with_eager(checkpoint):
    eager = Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(batch_size=4), device="cpu", need_discovery=True)
    compiled = Inference.load(
        checkpoint, "tiny_resnet", "auto", ComputeConfig(batch_size=4, compile="default"), device="cpu", need_discovery=True
    )
    for n in (4, 3, 1):  # a full batch, then shorter last batches: one static shape for the compiled model
        x = pixels(n, seed=n)
        want, got = eager(x), compiled(x)
        assert got.logits.shape == (n, 5) and got.maps.shape[0] == n
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-3, atol=1e-3 * float(want.logits.abs().max()))


def test_a_local_worker_runs_two_items_at_once_and_retries_failures():
    inside = threading.Barrier(ITEMS_PER_WORKER, timeout=30)
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def work(n: int) -> int:
        with lock:
            attempts[n] = attempts.get(n, 0) + 1
        if n < ITEMS_PER_WORKER:
            inside.wait()  # fails unless the first items run at the same time
        if n == 5 and attempts[n] == 1:
            raise RuntimeError("first try of item 5 fails")
        return n * n

    seen = []
    result = LocalExecutor().pool(lambda threads: work, list(range(8)), on_result=lambda item, r: seen.append((item, r)))
    assert not result.failed
    assert sorted(result.results) == [n * n for n in range(8)]
    assert sorted(seen) == [(n, n * n) for n in range(8)]
    assert attempts[5] == 2
    failed = LocalExecutor().pool(lambda threads: lambda n: 1 / 0, [1, 2], max_attempts=2)
    assert [item for item, _ in failed.failed] in ([1, 2], [2, 1]) and all("ZeroDivisionError" in r for _, r in failed.failed)


def test_padded_batches_give_the_features_of_unpadded_ones(checkpoint):
    """On CUDA every batch is padded to batch_size (cudnn.benchmark tunes once per shape): the rows
    of a short batch come out as they would alone."""
    plain = Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(batch_size=8), device="cpu", need_discovery=True)
    padded = Inference.load(checkpoint, "tiny_resnet", "auto", ComputeConfig(batch_size=8), device="cpu", need_discovery=True)
    padded.pads = True  # as on CUDA
    assert not plain.pads
    padded(pixels(8, seed=9))  # stale rows in the buffer from a full batch before
    for n in (3, 1, 8):
        x = pixels(n, seed=n)
        want, got = plain(x), padded(x)
        assert got.features.shape == (n, want.features.shape[1]) and got.maps.shape[0] == n
        torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    ref = padded.normalized(((pixels(2).float() / 255.0) - padded.mean) / padded.std)
    torch.testing.assert_close(ref.logits, plain(pixels(2)).logits, rtol=1e-4, atol=1e-5)


def test_cuda_graph_modes_run_every_forward_pass_on_one_thread(checkpoint, monkeypatch):
    """CUDA graphs replay only on the thread that recorded them; a worker calls its model from two
    threads at once (two items per worker)."""
    threads = set()

    def compile(fn, **kwargs):
        def forward(x):
            threads.add(threading.get_ident())
            assert torch.is_inference_mode_enabled()
            return fn(x)

        return forward

    monkeypatch.setattr(torch, "compile", compile)
    inf = Inference.load(
        checkpoint, "tiny_resnet", "auto", ComputeConfig(batch_size=4, compile="reduce-overhead"), device="cpu", need_discovery=True,
    )
    callers = []

    def call(seed):
        callers.append(threading.get_ident())
        with inf.lock:
            assert inf(pixels(3, seed)).logits.shape == (3, 5)

    workers = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(callers)) == 4 and len(threads) == 1 and threads.isdisjoint(callers)
