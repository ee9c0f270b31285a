"""Local DP-SGD (record-level DP on each client) through opacus, over the adapters and the head only.

One step: Poisson-sample a batch (each example with probability q = batch_size / n), compute every example's
gradient of the trainable tensors, clip each to norm C, sum, add N(0, (sigma C)^2) noise, divide by the
expected batch size, AdamW step. opacus does the middle part; the accountant records (sigma, q) per step.

Why ``grad_sample_mode="hooks"``: with low-rank adapters the per-example gradients are small (B x r x d per
adapter factor) and every trainable tensor lives in a plain ``nn.Linear`` (A, R, B and the head), for which
opacus has a hand-written Linear grad sampler. On CPU it was the cheapest mode in docs/privacy.md's comparison (about
1.15-1.2x a non-DP step on tiny models, vs 1.5-1.9x for ghost clipping and functorch, which pay a second
backward or vmap); ``benchmarks/bench_dp.py`` measures 1.2-1.3x on the tiny BERT and 1.02-1.04x on MiniLM,
where the frozen backbone dominates. "functorch" is accepted too (same results, slower). Ghost clipping only
pays off when per-example gradients are huge (full fine-tuning), so it is not offered here.

Why ``wrap_model=False``: opacus then attaches its hooks to our model instead of wrapping it in a
``GradSampleModule``, so parameter names stay ours (no ``_module.`` prefix) for the adapter state we upload;
:func:`dp_session` removes the hooks and every attribute opacus put on modules and parameters afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from fedlora.accel import autocast, count_batch, micro_batches, model_device, rng_devices
from fedlora.config import TrainConfig
from fedlora.privacy.accountant import ClientAccountant
from fedlora.tasks.classification import classification_loss
from fedlora.train import BatchLoss, Proximal, check_finite

GRAD_SAMPLE_MODES = ("hooks", "functorch")
# Attributes opacus leaves behind after GradSampleHooks.cleanup() (which removes hooks, grad_sample & co):
_MODULE_LEFTOVERS = ("activations", "max_batch_len")
_PARAM_LEFTOVERS = ("summed_grad",)
_NOISE_STREAM = 2**32  # noise seed = seed + this: never equal to another client's sampling seed


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Silence two expected warnings: opacus' "Secure RNG turned off" (we seed on purpose, for reproducible
    experiments) and torch's "Full backward hook is firing ... no inputs require gradients" (the first
    adapter's input comes from frozen layers)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextlib.contextmanager
def dp_session(
    model: nn.Module,
    num_examples: int,
    batch_size: int,
    clip: float,
    noise_multiplier: float,
    accountant: ClientAccountant,
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    grad_sample_mode: str = "hooks",
) -> Iterator[tuple[DPOptimizer, DPDataLoader]]:
    """opacus' ``make_private`` on ``model`` (in place, no wrapper) for the duration of the block.

    Yields the ``DPOptimizer`` (clip + noise + accountant step on ``.step()``) and a Poisson loader over
    example indices with rate q = min(1, batch_size / num_examples). On exit: opacus hooks and attributes
    removed, ``.grad`` cleared, training mode restored; the model is a plain model again.

    opacus would derive q = 1 / len(loader) = 1 / ceil(n / batch_size) and average by int(n q); we build the
    Poisson loader ourselves and set both to q = batch_size / n and batch_size, the rate the client's budget
    planning uses (:func:`fedlora.privacy.noise_for_budget`).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r} is not supported here; use one of "
                         f"{GRAD_SAMPLE_MODES} (hooks is the fastest for adapters)")
    if clip <= 0:
        raise ValueError(f"privacy.clip={clip!r} must be > 0")
    if noise_multiplier < 0:
        raise ValueError(f"privacy.noise-multiplier={noise_multiplier!r} must be >= 0")
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"DP-SGD needs examples and a batch size >= 1 (got n={num_examples}, batch={batch_size})")
    q = min(1.0, batch_size / num_examples)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    loader = DPDataLoader(TensorDataset(torch.arange(num_examples)), sample_rate=q,
                          generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.train()  # opacus refuses a model in eval mode
    with _quiet_warnings():
        engine = PrivacyEngine(accountant=accountant.mechanism)
        accountant.bind_engine(engine)
        hooks, dp_opt, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=clip, poisson_sampling=False,  # the loader above already samples Poisson at q
            noise_generator=torch.Generator(device=device).manual_seed(seed + _NOISE_STREAM),
            grad_sample_mode=grad_sample_mode, wrap_model=False,
        )
        try:
            hooks.forbid_grad_accumulation()  # make_private does this only with poisson_sampling=True
            dp_opt.expected_batch_size = min(batch_size, num_examples)
            dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
            yield dp_opt, loader
        finally:
            hooks.cleanup()
            for module in model.modules():
                for attr in _MODULE_LEFTOVERS:
                    if attr in vars(module):
                        delattr(module, attr)
            for p in model.parameters():
                for attr in _PARAM_LEFTOVERS:
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None
            model.train(was_training)


def _noise_only_step(optimizer: DPOptimizer, prox: Proximal | None = None) -> None:
    """An empty Poisson batch still is a DP-SGD step: zero clipped sum + noise, counted by the accountant.
    Skipping it would change the mechanism the accountant assumes (and reveal that the batch was empty)."""
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    _step(optimizer, prox)


def _step(optimizer: DPOptimizer, prox: Proximal | None) -> None:
    """``DPOptimizer.step`` (clip, noise, accountant) with FedProx's data-free gradient added after the noise."""
    if optimizer.pre_step():
        if prox is not None:
            prox.add_gradient()
        optimizer.original_optimizer.step()


# The loss (a task's batch_loss) MUST be the batch mean of per-example losses: opacus' hooks
# (loss_reduction="mean") scale by the batch size to recover each example's own gradient, which is then clipped
# as a whole. The causal LM's is each sequence's mean over its target tokens, then the batch mean.
LossFn = BatchLoss


def train_local_dp(
    model: nn.Module,
    enc: dict[str, torch.Tensor],
    labels: torch.Tensor,
    train: TrainConfig,
    clip: float,
    noise_multiplier: float,
    accountant: ClientAccountant,
    seed: int = 0,
    grad_sample_mode: str = "hooks",
    loss_fn: LossFn = classification_loss,
) -> tuple[list[float], int, int]:
    """DP-SGD with AdamW over the trainable tensors for exactly ``train.local_steps`` steps: the counterpart of
    :func:`fedlora.train.optimise`, with the same return value (per-step losses of non-empty batches, correct,
    counted); the caller reads epsilon from ``accountant``. ``train.max_grad_norm`` does not apply: the
    per-example clip does.

    ``accountant`` gains the steps at (noise_multiplier, q = min(1, batch_size / n)), empty batches
    included. Same seed, same model and data -> identical result (Poisson sampling, noise and dropout are
    seeded; the caller's global RNG state is left as it was). ``train.precision='bf16'`` autocasts the forward
    pass on CUDA; opacus then clips per-example gradients computed from bf16 activations, accumulated in fp32.

    ``train.micro-batch-size`` m: each Poisson batch is processed in chunks of at most m examples, as opacus'
    BatchMemoryManager does: a chunk's per-example gradients are clipped into the running sum and freed (a
    skipped optimizer step), and only the last chunk adds the one noise draw, divides by the expected batch size,
    steps AdamW and counts the step in the accountant. Per-example gradients of at most m examples are held at
    once, and the result equals the un-split batch's (same sampling, clipping and noise; tests/test_privacy_dpsgd.py).
    """
    n = len(labels)
    steps, batch_size = train.local_steps, train.batch_size
    losses: list[float] = []
    correct = seen = 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    prox = Proximal(params, train.prox_mu)
    device = model_device(model)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)  # adapter/model dropout
        with dp_session(model, n, batch_size, clip, noise_multiplier, accountant, opt, seed,
                        grad_sample_mode) as (dp_opt, loader):
            done = 0
            while done < steps:
                for (idx,) in loader:  # one pass = int(1/q) Poisson batches; go round again as needed
                    dp_opt.zero_grad(set_to_none=True)
                    if len(idx) == 0:
                        _noise_only_step(dp_opt, prox)
                    else:
                        chunks = micro_batches(idx, train.micro_batch_size)
                        total = 0.0
                        for j, chunk in enumerate(chunks):
                            count_batch(enc, chunk)
                            with autocast(device, train.precision):
                                loss, c, k = loss_fn(model, enc, labels, chunk)
                            check_finite(loss, done)
                            loss.backward()
                            total += loss.item() if len(chunks) == 1 else loss.item() * len(chunk) / len(idx)
                            correct, seen = correct + c, seen + k
                            if j < len(chunks) - 1:  # clip this chunk's per-example gradients into the sum, free them
                                dp_opt.signal_skip_step(do_skip=True)
                                dp_opt.step()
                                dp_opt.zero_grad(set_to_none=True)
                        _step(dp_opt, prox)  # the last chunk: clip, one noise draw for the batch, FedProx, AdamW
                        losses.append(total)
                    done += 1
                    if done == steps:
                        break
    model.eval()
    return losses, correct, seen


def privatised_gradient(
    model: nn.Module,
    enc: dict[str, torch.Tensor],
    labels: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    expected_batch_size: int | None = None,
    seed: int = 0,
    grad_sample_mode: str = "hooks",
    loss_fn: LossFn = classification_loss,
) -> dict[str, torch.Tensor]:
    """The gradient opacus' DPOptimizer would hand to AdamW for this one batch (all rows of ``enc``):
    sum of per-example gradients each clipped to ``clip``, plus N(0, (sigma clip)^2) noise, divided by
    ``expected_batch_size`` (default: the batch's size). Parameters are not updated. For tests and checks."""
    n = len(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    expected = expected_batch_size or n
    with dp_session(model, max(n, expected), expected, clip, noise_multiplier, ClientAccountant("rdp"), opt, seed,
                    grad_sample_mode) as (dp_opt, _):
        dp_opt.zero_grad(set_to_none=True)
        loss_fn(model, enc, labels, torch.arange(n))[0].backward()
        dp_opt.pre_step()
        return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
