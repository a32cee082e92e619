"""What an :class:`~lightning_trust.explain.Attribution` pass explains, decided and checked once before
training: the attributed input and the others, the Captum method and layer, the baseline, the
target, and whether the model is a classifier or a causal LM.

One tiny forward on the first validation batch (two rows, isolated: no trace on training) gives the
output's shape, so a ``target`` that is not a class, a layer path that does not exist, a baseline
that does not fit the input, or a module whose validation never runs fail at setup with the fix,
not as a raw error at the first explanation pass.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_trust.explain import Attribution
    >>> class Data:  # a Trainer stand-in that only has a datamodule
    ...     datamodule = type("DM", (), {"val_dataloader": lambda self: DataLoader(
    ...         TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)})()
    >>> make_plan(Attribution(), torch.nn.Linear(4, 2), Data()).num_outputs
    2
    >>> make_plan(Attribution(target=5), torch.nn.Linear(4, 2), Data())
    Traceback (most recent call last):
    ...
    ValueError: `target=5` is not a class of the model: its output has 2 classes (indices 0..1); set `target` to one of them, 'pred' (the prediction) or 'true' (the label).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.loaders import find_loader
from lightning_trust.core.passes import fork_rngs, isolated_eval
from lightning_trust.explain.inputs import (
    InputsForward,
    Key,
    embedding_layer,
    find_config_value,
    find_hf_model,
    module_path,
    resolve_layer,
    split_inputs,
)
from lightning_trust.explain.llm import LLM_METHODS
from lightning_trust.explain.methods import METHODS, TOKEN_BASELINES, load_baseline

__all__ = ["Plan", "check_runs_at_validation", "estimate_pass", "make_plan"]

#: methods that differentiate the inputs themselves (impossible on integer token ids)
_INPUT_GRADIENT = ("saliency", "input_x_gradient", "deeplift", "deeplift_shap", "gradient_shap")


@dataclass
class Plan:
    """The decisions of :func:`make_plan` a pass follows."""

    kind: str  # "model" (scores per sample) or "llm" (a causal LM: generated tokens attributed to the prompt)
    key: Key  # the attributed input's keyword or position (None: a single tensor)
    names: tuple[Any, ...]  # the other inputs, in the order Captum passes them
    method: str  # the Captum method run (integrated_gradients on token ids runs over the embeddings)
    layer: Optional[str]  # dotted path of the layer attributed to, from the LightningModule
    token: bool  # the attributed input holds integer token ids
    token_id: Optional[int] = None  # the baseline token of "pad"/"mask"/a number on token inputs
    zero_embedding: bool = False
    num_outputs: Optional[int] = None  # scores per sample of the model's output
    patch_size: Optional[int] = None  # the vision transformer's patch size (patch heatmaps)
    vocab_size: Optional[int] = None
    pass_estimate: Optional[float] = None  # seconds one pass is expected to take (None: no estimate)
    estimate_seconds: float = 0.0  # what timing the estimate cost

    def forward(self, module: nn.Module) -> InputsForward:
        """``module`` called on ``(attributed, *others)`` as its forward takes them."""
        return InputsForward(module, self.key, self.names)


def check_runs_at_validation(callback: Any, trainer: Any, module: nn.Module) -> None:
    """Refuse a fit where passes are due at validation end but the module has no ``validation_step``
    (Lightning then runs no validation: the callback would silently do nothing)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if "validation_end" in callback.stages and not is_overridden("validation_step", module):
        raise ValueError(
            f"Attribution runs at validation end (`run_on={list(callback.stages)}`), but "
            f"{type(module).__name__} has no `validation_step`, so Lightning runs no validation and nothing would be "
            "explained: add a `validation_step` to the module, or set `run_on: fit_end`."
        )


def _first_batch(trainer: Any) -> Any:
    loader, _ = find_loader(trainer, ("val", "test"))
    if loader is None:
        raise RuntimeError(
            "Attribution found no validation (or test) DataLoader to draw its samples from; give the Trainer "
            "validation data or a datamodule with `val_dataloader`."
        )
    with fork_rngs(devices=[]):  # iterating draws a base seed from torch's global RNG
        return next(iter(loader))


def make_plan(callback: Any, module: nn.Module, trainer: Any) -> Plan:
    """Decide and check what ``callback``'s passes explain on ``module`` (see the module docstring)."""
    contract = BatchContract.resolve(callback.batch_keys, trainer)
    batch = _first_batch(trainer)
    key, main, others = split_inputs(contract.inputs(batch), callback.input)
    token = callback.modality == "text" or (callback.modality == "auto" and not main.is_floating_point())
    method = _method(callback.method, token, key)
    spec = METHODS[method]
    layer = None
    vocab = None
    if spec.layer:
        found: nn.Module
        if callback.layer:
            found, layer = resolve_layer(module, callback.layer), callback.layer
        elif token:
            layer, found = embedding_layer(module)
        else:
            raise ValueError(f"method {method!r} attributes to a layer: set `layer` to its dotted module path.")
        vocab = getattr(found, "num_embeddings", None)
    plan = Plan("model", key, tuple(others), method, layer, token, vocab_size=vocab)
    scores = _tiny_forward(plan, module, trainer, main, others)
    rows = min(2, len(main))
    if token and scores.ndim == 3:
        _as_llm(plan, callback, module)
    elif scores.ndim >= 1 and scores.shape[0] != rows:
        raise ValueError(
            f"The model's scores have shape {tuple(scores.shape)} for {rows} samples; Captum needs one row per sample: "
            "return (batch, classes) scores from `forward` (or wrap the module so it does)."
        )
    plan.num_outputs = int(scores.shape[1]) if scores.ndim >= 2 and plan.kind == "model" else 1
    started = time.perf_counter()
    plan.pass_estimate = estimate_pass(callback, plan, module, trainer, main, others)
    plan.estimate_seconds = time.perf_counter() - started
    _check_target(callback, plan, contract, batch)
    _check_baseline(callback, plan, main, module, trainer)
    if not token and main.ndim == 4:
        size = find_config_value(module, "patch_size")
        plan.patch_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size else None
    return plan


def _method(method: str, token: bool, key: Key) -> str:
    if not token:
        return method
    if method == "integrated_gradients":
        return "layer_integrated_gradients"  # IG of token ids is IG over their embeddings
    if method in _INPUT_GRADIENT:
        name = f"`{key}`" if isinstance(key, str) else "the input"
        raise ValueError(
            f"method {method!r} differentiates the inputs, but {name} holds integer token ids; use "
            "method='layer_integrated_gradients' (or 'integrated_gradients': over the input embeddings) or a "
            "perturbation method ('feature_ablation', 'occlusion', 'shapley_value_sampling')."
        )
    return method


def _tiny_forward(plan: Plan, module: nn.Module, trainer: Any, main: Tensor, others: dict[Any, Tensor]) -> Tensor:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    rows = slice(0, min(2, len(main)))
    with isolated_eval(module, trainer) as inner:
        return plan.forward(inner)(main[rows].to(device), *(others[n][rows].to(device) for n in plan.names))


#: gradient evaluations per sample of a pass, by method (the others: no estimate before their first pass)
_EVALUATIONS = {"saliency": 1, "input_x_gradient": 1, "deeplift": 2, "deeplift_shap": 2, "layer_gradcam": 1}
_STEPS = {"integrated_gradients": ("n_steps", 50), "layer_integrated_gradients": ("n_steps", 50),
          "gradient_shap": ("n_samples", 5)}  # fmt: skip
_ROWS = 64  # rows of the timed forward+backward (Captum evaluates all samples x steps in large batches)


def estimate_pass(
    callback: Any, plan: Plan, module: nn.Module, trainer: Any, main: Tensor, others: dict[Any, Tensor]
) -> Optional[float]:
    """Seconds a pass is expected to take, before any has run: one forward+backward of ``_ROWS`` rows
    (the first validation rows repeated, isolated) timed and scaled to ``num_samples`` x the method's
    evaluations per sample (``n_steps``), plus the forwards of ``infidelity``. ``None`` where the cost
    does not follow from a gradient's (perturbation methods, causal LMs): that first pass runs."""
    if plan.kind != "model":
        return None
    if plan.method in _STEPS:
        option, default = _STEPS[plan.method]
        evaluations = int(callback.method_kwargs.get(option, default))
    elif plan.method in _EVALUATIONS:
        evaluations = _EVALUATIONS[plan.method]
    else:
        return None
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    index = torch.arange(_ROWS) % min(2, len(main))
    with torch.inference_mode(False), isolated_eval(module, trainer, grad=True) as inner:  # test hooks: inference
        x = main[index].to(device).clone()  # a normal tensor, even if the batch was loaded under inference mode
        rest = [others[n][index].to(device).clone() for n in plan.names]
        started = time.perf_counter()
        if x.is_floating_point():
            x.requires_grad_(True)
            wrt: list[Tensor] = [x]
        else:  # token ids: the gradient flows to the embeddings (here: to every parameter, an upper bound)
            wrt = [p for p in inner.parameters() if p.requires_grad]
        scores = plan.forward(inner)(x, *rest)
        if wrt:
            torch.autograd.grad(scores.float().sum(), wrt, allow_unused=True)
        per_row = (time.perf_counter() - started) / _ROWS
    quality = not plan.token and not METHODS[plan.method].layer  # infidelity perturbs float inputs
    forwards = callback.infidelity_samples if quality else 0
    return per_row * callback.num_samples * (evaluations + forwards / 2)


def _as_llm(plan: Plan, callback: Any, module: nn.Module) -> None:
    hf = find_hf_model(module)
    if hf is None or not callable(getattr(hf, "generate", None)):
        raise ValueError(
            "The model returns token-level scores (batch, tokens, vocabulary) but holds no Hugging Face model with "
            "`generate()` for Attribution's causal-LM path; return (batch, classes) scores from `forward`."
        )
    if callback.method not in LLM_METHODS:
        raise ValueError(
            f"method {callback.method!r} cannot explain a causal LM; use one of {list(LLM_METHODS)} (Captum's "
            "LLMGradientAttribution / LLMAttribution)."
        )
    if callback.target != "pred":
        raise ValueError(
            f"`target={callback.target!r}`: a causal LM's explained target is the text it generates; use "
            "target='pred' (set `max_new_tokens` for its length)."
        )
    plan.kind = "llm"
    plan.layer = module_path(module, hf.get_input_embeddings()) if plan.method == "layer_integrated_gradients" else None
    plan.layer = callback.layer or plan.layer


def _check_target(callback: Any, plan: Plan, contract: BatchContract, batch: Any) -> None:
    target = callback.target
    if isinstance(target, int) and plan.num_outputs is not None and target >= plan.num_outputs:
        n = plan.num_outputs
        raise ValueError(
            f"`target={target}` is not a class of the model: its output has {n} "
            f"{'classes' if n != 1 else 'score'} (indices 0..{n - 1}); set `target` to one of them, 'pred' (the "
            "prediction) or 'true' (the label)."
        )
    if target == "true" and not contract.has_target(batch):
        raise ValueError("`target='true'` needs targets in the batches, which have none; use 'pred' or a class index.")


def _check_baseline(callback: Any, plan: Plan, main: Tensor, module: nn.Module, trainer: Any) -> None:
    baseline, token = callback.baseline, plan.token
    if isinstance(baseline, str) and baseline in TOKEN_BASELINES and not token:
        raise ValueError(
            f"baseline={baseline!r} is for token inputs; the attributed input holds {main.dtype} values: use 'zeros', "
            "'mean', 'blur', 'train', a number or a tensor file."
        )
    if token and baseline in ("mean", "blur", "train"):
        raise ValueError(
            f"baseline={baseline!r} needs float inputs, but the attributed input holds token ids; use 'pad', 'mask', "
            "'zero_embedding' (layer methods), 'zeros' (id 0) or a token id number."
        )
    if baseline == "blur" and main.ndim != 4:
        raise ValueError(f"baseline='blur' is for images (N, C, H, W), got inputs {tuple(main.shape)}; use 'zeros'.")
    if baseline == "zero_embedding" and (plan.method != "layer_integrated_gradients" or plan.kind == "llm"):
        raise ValueError(
            "baseline='zero_embedding' is for method 'layer_integrated_gradients' (or 'integrated_gradients') on a "
            "classifier; use 'pad' or 'mask' here."
        )
    plan.zero_embedding = baseline == "zero_embedding"
    if token and isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if baseline != int(baseline) or baseline < 0 or (plan.vocab_size is not None and baseline >= plan.vocab_size):
            raise ValueError(
                f"baseline={baseline!r} is not a token id of the model (0..{(plan.vocab_size or 1) - 1}); set "
                "`baseline` to a token id, 'pad' or 'mask'."
            )
        plan.token_id = int(baseline)
    if baseline in ("pad", "mask"):
        plan.token_id = _special_id(str(baseline), module, trainer)
    if isinstance(baseline, str) and baseline.endswith((".pt", ".pth", ".npy")):
        base = load_baseline(baseline)
        shape = tuple(main.shape[1:])
        if tuple(base.shape) != shape and tuple(base.shape[1:]) != shape:
            raise ValueError(
                f"Baseline file {baseline!r} has shape {tuple(base.shape)}; expected one input {shape} or a stack of "
                f"them (K, {', '.join(map(str, shape))}): save a baseline of the input's shape."
            )
        if token and base.is_floating_point():
            raise ValueError(
                f"Baseline file {baseline!r} holds {base.dtype} values but the input holds token ids; save integer ids."
            )
    if plan.kind == "llm" and plan.token_id is None:
        plan.token_id = 0 if baseline == "zeros" else None


def _special_id(kind: str, module: nn.Module, trainer: Any) -> int:
    name = f"{kind}_token_id"
    datamodule = getattr(trainer, "datamodule", None)
    for source in (datamodule, getattr(datamodule, "tokenizer", None)):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    value = find_config_value(module, name)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"baseline={kind!r} needs the {kind} token's id, which neither the datamodule (`{name}`), its tokenizer nor "
        f"the model's config gives; set `baseline` to the id number, or give the datamodule a `{name}`."
    )
