"""``evaluate_robustness``: clean, PGD, CW and AutoAttack accuracy of any classifier, class by class.

How examples are counted (the AutoAttack convention): an example is robust under an attack only if it
is classified correctly both clean and under the attack; only clean-correct examples are attacked.
``worst_of_all`` counts an example robust only if it survives every attack run.

AutoAttack runs component by component, each on the examples still robust, in chunks of
``batch_size`` formed in dataset order: the batches that one ``run_standard_evaluation(x, y,
batch_size=batch_size)`` call over all examples forms.

Results independent of the split (:mod:`hf_csr.evaluation.sharding`): the random starts of PGD / CW and
of AutoAttack's APGD components are keyed by ``(seed, attack, round, example index)``, so an example's
outcome does not depend on the batch size, the number of processes, the order of the shards or a
resume. FAB-T (one restart, no random start) is deterministic per example too. Square, FAB's random
restarts (untargeted ``fab``) and the ``rand`` version's EOT draw from torch's generator, reseeded with
``seed`` for every chunk: they depend on the chunk an example is in, i.e. on ``batch_size`` and on which
examples survived the earlier components -- but not on the number of processes, since the chunks are
the same ones (the report's ``metadata["randomness"]`` says which attacks are which).

With ``distributed=True`` every process of the ``torch.distributed`` group attacks every
``world_size``-th chunk, and the per-example outcomes are gathered on every process after each attack.

Resume (``resume_dir``): every finished chunk is saved atomically, keyed by a digest of the evaluation's
identity -- a hash of the model's weight bytes and config, the attacks and their settings, the threat
model, the seed, the number of examples and their labels -- and of the chunk's example indices, images
and labels; it is reloaded instead of recomputed, by whichever process attacks that chunk. A progress
folder left by an evaluation with another identity is cleared first, with a warning naming what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks import NORMS, attack_loss, attack_mode, pgd_attack
from ..data.core import to_unit_float
from ..utils import as_logits, atomic_save, atomic_write_json, check_pixel_values, inputs_prevalidated, parse_pixel_value
from ..validation import check_budget, check_choice, check_labels_in_range, check_positive_int
from ..validation import check_evaluation_inputs
from .report import AttackResult, RobustnessReport
from .sharding import Shards, example_keys, keyed_normal, keyed_uniform
from .specs import WORST_OF_ALL, AttackConfig, AutoAttackConfig, PGDConfig, parse_attacks

__all__ = ["DEFAULT_ATTACKS", "evaluate_robustness", "model_identity"]

#: Where an evaluation keeps its per-attack, per-batch progress inside its output folder by default
#: (``hf-csr evaluate`` and the trainer's final evaluation), removed once the results are saved.
PROGRESS_DIR = ".progress"

logger = logging.getLogger(__name__)

DEFAULT_ATTACKS = ("clean", "pgd20", "cw20", "autoattack")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Scales the margin before differentiation so that fp16 input gradients do not underflow to zero.
_FP16_GRAD_SCALE = 1024.0
_Payload = Dict[str, Any]


class _Logits(nn.Module):
    """``model`` returning a float logits tensor (AutoAttack needs one; ``ModelOutput`` models give none)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_logits(self.model(x)).float()


class _Images:
    """Batches of float [0, 1] images from a tensor or a dataset with ``.tensors(indices)``."""

    def __init__(self, images: Any, labels: Optional[torch.Tensor]) -> None:
        self.dataset = None
        if isinstance(images, torch.Tensor):
            check_pixel_values(images, name="images")
            if labels is None:
                raise ValueError("labels are required when images is a tensor; pass labels=(N,) class indices.")
            self.images = images
        elif callable(getattr(images, "tensors", None)):
            if labels is not None:
                raise ValueError("labels must be None when images is a dataset: its own labels are used.")
            self.dataset = images
            labels = getattr(images, "labels", None)
            if labels is None:
                labels = images.tensors()[1]
        else:
            raise ValueError(
                "images must be a float tensor (N, C, H, W) in [0, 1] (with labels) or a dataset with .tensors() "
                f"and .class_names such as hf_csr.data.load_image_dataset(...); got {type(images).__name__}."
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D tensor of integer class indices; got {tuple(labels.shape)} {labels.dtype}."
            )
        if self.dataset is None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; the two must have the same length.")
        if len(labels) == 0:
            raise ValueError("there are no examples to evaluate (the dataset is empty).")
        self.labels = labels.long().cpu()
        self.class_names = getattr(images, "class_names", None)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` (a 1-D index tensor), as float [0, 1]."""
        if self.dataset is None:
            return self.images[indices.to(self.images.device)]
        images = to_unit_float(self.dataset.tensors(indices)[0])
        check_pixel_values(images, name=f"images[{int(indices[0])}..{int(indices[-1])}]")
        return images


_PROGRESS_FOLDER = re.compile(r"[0-9a-f]{2}")
_PROGRESS_FILE = re.compile(r"\.?[0-9a-f]{64}\.pt(\..*\.tmp)?")


class _ProgressStore:
    """Finished chunks under ``directory``, written atomically and found by content digest.

    ``identity`` (the evaluation's, see :func:`_run_identity`) is kept in ``identity.json``; progress left
    by an evaluation with another identity is removed (by the main process) and a warning names what
    differs, so that nothing computed for another model, data set or setting is ever reused.
    """

    MANIFEST = "identity.json"

    def __init__(self, directory: Union[str, Path], identity: Dict[str, Any], shards: Shards) -> None:
        self.directory = Path(directory)
        self.identity = identity
        if shards.is_main:
            self._claim()
        shards.barrier()

    def _claim(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / self.MANIFEST
        previous = None
        if manifest.exists():
            try:
                previous = json.loads(manifest.read_text())
            except (OSError, ValueError):
                previous = {"unreadable": True}
        if previous == self.identity:
            return
        # only what this store writes is removed: <2 hex digits>/<sha256>.pt (and temporary files of those)
        stale = [path for folder in self.directory.iterdir() if _PROGRESS_FOLDER.fullmatch(folder.name)
                 and folder.is_dir() for path in folder.iterdir() if _PROGRESS_FILE.fullmatch(path.name)]
        if previous is not None or stale:
            if not isinstance(previous, dict):
                previous = {}
            differs = sorted(k for k in set(previous) | set(self.identity) if previous.get(k) != self.identity.get(k))
            logger.warning(
                "the progress in %s belongs to another evaluation (%s differ%s): starting afresh, its %d cached "
                "entries are removed.", self.directory, ", ".join(differs) or "identity unknown",
                "s" if len(differs) == 1 else "", sum(1 for path in stale if path.suffix == ".pt"),
            )
            for path in stale:
                path.unlink(missing_ok=True)
            for folder in {path.parent for path in stale}:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
        atomic_write_json(manifest, self.identity)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def load(self, key: str) -> Optional[_Payload]:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file is recomputed, never trusted
            logger.warning("ignoring unreadable progress file %s (%s); recomputing that batch", path, error)
            return None

    def save(self, key: str, payload: _Payload) -> None:
        atomic_save(payload, self._path(key))


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous()
            h.update(f"{part.dtype}{tuple(part.shape)}".encode())
            h.update(part.reshape(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


#: Config fields that say where or with what a config was saved, not what the model computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def model_identity(model: nn.Module) -> Dict[str, str]:
    """``{"class", "config", "weights"}``: the model's class, a SHA-256 of its config and of every tensor of
    its ``state_dict`` (name, dtype, shape and bytes). Two models share an identity only if they hold the
    same weights in the same places and the same configuration."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        h.update(f"{name}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00".encode())
        if tensor.numel():
            h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _digest(config),
        "weights": h.hexdigest(),
    }


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """AutoAttack reseeds torch's global RNG; keep the caller's state intact."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


class _MessageList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings(logger_name: str) -> Iterator[List[str]]:
    """Collect the WARNING records of ``logger_name`` (AutoAttack's checks log to 'auto-attack')."""
    handler = _MessageList()
    target = logging.getLogger(logger_name)
    target.addHandler(handler)
    try:
        yield handler.messages
    finally:
        target.removeHandler(handler)


def _resolve_autocast(autocast_dtype: Any) -> Optional[torch.dtype]:
    if autocast_dtype is None or autocast_dtype in (torch.bfloat16, torch.float16):
        return autocast_dtype
    if isinstance(autocast_dtype, str) and autocast_dtype.lower() in _AUTOCAST_DTYPES:
        return _AUTOCAST_DTYPES[autocast_dtype.lower()]
    raise ValueError(f"autocast_dtype must be None, 'bf16' or 'fp16' (or a torch dtype); got {autocast_dtype!r}.")


def _versions() -> Dict[str, str]:
    out = {}
    for package in ("hf_csr", "torch", "pyautoattack", "transformers", "timm"):
        try:
            out[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


class _Evaluation:
    """One evaluation run: the chunking, sharding, resuming and per-attack loops of :func:`evaluate_robustness`."""

    def __init__(self, net, images: _Images, *, norm, eps, batch_size, seed, device, dtype, progress, store,
                 shards: Shards):
        self.net, self.images, self.norm, self.eps, self.batch_size = net, images, norm, eps, batch_size
        self.seed, self.device, self.dtype, self.progress, self.store = seed, device, dtype, progress, store
        self.shards = shards
        self.batches = list(torch.arange(len(images)).split(batch_size))

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def run(self, label: str, chunks: Sequence[torch.Tensor], compute: Callable[..., _Payload],
            settings: Dict[str, Any]) -> List[_Payload]:
        """``compute(index, x, y, indices)`` for this process's chunks of example indices (chunk ``j`` goes to
        process ``j mod world_size``), reloaded from the store when there; every chunk's payload, gathered.

        A stored chunk is reused when the evaluation's identity (model, config, data, attacks, seed), the
        chunk's example indices, images and labels and ``settings`` are all the same.
        """
        settings = {**settings, "autocast": str(self.dtype)}
        mine = [index for index in range(len(chunks)) if self.shards.mine(index)]
        local, reloaded = {}, 0
        for index in tqdm(mine, desc=label, unit="batch", disable=not self.progress):
            indices = chunks[index]
            x, y = self.images.take(indices), self.images.labels[indices]
            key = _digest(self.store.identity, settings, indices, x, y) if self.store else None
            payload = self.store.load(key) if self.store else None
            reloaded += payload is not None
            if payload is None:
                with self.autocast():
                    payload = compute(index, x.to(self.device), y.to(self.device), indices)
                if self.store:
                    self.store.save(key, payload)
            local[index] = payload
        if self.store:
            where = "" if self.shards.world_size == 1 else f" (process {self.shards.rank} of {self.shards.world_size})"
            logger.info("%s: %d of %d batches reloaded from %s, %d computed%s", label, reloaded, len(mine),
                        self.store.directory, len(mine) - reloaded, where)
        gathered = self.shards.gather(local)
        return [gathered[index] for index in range(len(chunks))]

    def settings(self, attack: AttackConfig, **extra: Any) -> Dict[str, Any]:
        """What an attack's results depend on besides the model and the data."""
        return {"attack": attack.describe(self.eps), "norm": self.norm, "eps": self.eps, "seed": self.seed, **extra}

    def clean(self, attack: AttackConfig, check_gradients: bool) -> Tuple[torch.Tensor, int]:
        """Clean predictions and, with ``check_gradients``, the number of zero input gradients."""

        def compute(index, x, y, indices):
            if not check_gradients:
                with torch.no_grad():
                    return {"predictions": self.net(x).argmax(1).cpu()}
            x = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.net(x)
                if not logits.requires_grad:
                    raise ValueError(
                        "the model's logits do not depend differentiably on its input (no autograd graph: a forward "
                        "under torch.no_grad, a detach or a non-torch step), so gradient-based attacks (pgd, cw, "
                        "AutoAttack's APGD/FAB) cannot run; evaluate it with attacks=('clean', 'autoattack:square')."
                    )
                scale = _FP16_GRAD_SCALE if self.dtype == torch.float16 else 1.0
                (grad,) = torch.autograd.grad(attack_loss(logits, y, "cw") * scale, [x], allow_unused=True)
            zero = x.shape[0] if grad is None else int((grad.flatten(1) == 0).all(dim=1).sum())
            return {"predictions": logits.detach().argmax(1).cpu(), "zero_gradients": zero}

        settings = {"attack": attack.describe(self.eps), "check_gradients": check_gradients}
        payloads = self.run(attack.name, self.batches, compute, settings)
        predictions = torch.cat([p["predictions"] for p in payloads])
        return predictions, sum(int(p.get("zero_gradients", 0)) for p in payloads)

    def random_start(self, attack: PGDConfig, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The PGD start of examples ``indices`` (dataset positions): :func:`hf_csr.attacks.random_init`'s
        distribution, drawn from keys of ``(seed, attack, example)``."""
        if attack.random_start == "none":
            return torch.zeros_like(x)
        keys = example_keys(self.seed, f"{attack.name}/start", indices).to(x.device)
        shape = tuple(x.shape[1:])
        if self.norm == "Linf":
            return ((keyed_uniform(keys, shape) * 2 - 1) * self.eps).to(x.dtype)
        direction = keyed_normal(keys, shape)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape)))
        radius = keyed_uniform(example_keys(self.seed, f"{attack.name}/radius", indices).to(x.device), (1,) * len(shape))
        return (direction * radius * self.eps).to(x.dtype)

    def pgd(self, attack: PGDConfig, clean: torch.Tensor) -> torch.Tensor:
        def compute(index, x, y, indices):
            predictions = clean[indices].clone()
            attacked = (predictions == y.cpu()).nonzero().squeeze(1)
            if attacked.numel():
                idx = attacked.to(x.device)
                x_adv = pgd_attack(
                    self.net, x[idx], y[idx], eps=self.eps, step_size=self.eps * attack.step_fraction,
                    steps=attack.steps, norm=self.norm, loss=attack.loss,
                    noise=self.random_start(attack, x[idx], indices[attacked]), validate=False,
                )
                with torch.no_grad():
                    predictions[attacked] = self.net(x_adv).argmax(1).cpu()
            return {"predictions": predictions}

        payloads = self.run(attack.name, self.batches, compute, self.settings(attack, randomness="per-example"))
        return torch.cat([p["predictions"] for p in payloads])

    def autoattack(self, attack: AutoAttackConfig, clean: torch.Tensor, num_classes: int):
        """AutoAttack's components in turn, each on the examples still robust, in chunks of ``batch_size``.

        Returns the predictions, AutoAttack's warnings and the robust accuracy after each component.
        """
        from .keyed_apgd import key_examples

        adversary = attack.build(self.net, norm=self.norm, eps=self.eps, seed=self.seed, device=self.device,
                                 num_classes=num_classes)
        keyed = attack.keyed_components()
        labels = self.images.labels
        predictions, robust = clean.clone(), clean == labels
        warnings: List[str] = []
        accuracy_after: Dict[str, float] = {}
        for component in attack.components:
            # (an empty tensor splits into one empty chunk: once every example is broken, nothing is left to run)
            chunks = [chunk for chunk in robust.nonzero().squeeze(1).split(self.batch_size) if len(chunk)]

            def compute(index, x, y, indices):
                adversary.attacks_to_run = [component]
                for apgd in (adversary.apgd, adversary.apgd_targeted):
                    key_examples(apgd, seed=self.seed, stream=f"{attack.name}/{component}", indices=indices, x=x, y=y)
                with _forked_rng(self.device), _captured_warnings("auto-attack") as messages:
                    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
                return {"predictions": y_adv.cpu(), "warnings": messages}

            randomness = "per-example" if component in keyed else "per-chunk"
            payloads = self.run(f"{attack.name} {component}", chunks, compute,
                                self.settings(attack, component=component, randomness=randomness))
            if payloads:
                indices = torch.cat(chunks)
                adversarial = torch.cat([p["predictions"] for p in payloads])
                fooled = adversarial != labels[indices]
                predictions[indices[fooled]] = adversarial[fooled]
                robust[indices[fooled]] = False
            warnings = list(dict.fromkeys(warnings + [message for p in payloads for message in p["warnings"]]))
            accuracy_after[component] = int(robust.sum()) / len(robust)
        return predictions, warnings, accuracy_after


def _class_names(model: nn.Module, images: _Images, class_names: Optional[Sequence[str]], k: int) -> List[str]:
    names = class_names if class_names is not None else images.class_names
    if names is None:
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        names = [id2label.get(i, str(i)) for i in range(k)]
    names = [str(name) for name in names]
    if len(names) != k:
        raise ValueError(
            f"class count mismatch: the model outputs {k} logits but the dataset has {len(names)} classes "
            f"({names[:12]}{' ...' if len(names) > 12 else ''}); evaluate a model trained on this dataset's classes."
        )
    check_labels_in_range(images.labels, k, what="dataset")
    return names


def _worst_of_all(results: Sequence[AttackResult], labels: torch.Tensor) -> torch.Tensor:
    """Per example: the prediction of the first attack that breaks it, else the (correct) label."""
    predictions, broken = labels.clone(), torch.zeros_like(labels, dtype=torch.bool)
    for result in results:
        newly = ~result.robust & ~broken
        predictions[newly] = result.predictions[newly]
        broken |= newly
    return predictions


def _flags(results: Dict[str, AttackResult], zero_gradients: int, num_examples: int) -> List[str]:
    flags = []
    if zero_gradients:
        flags.append(
            f"gradient masking: {zero_gradients} of {num_examples} examples have an exactly zero input gradient of "
            "the logit margin, so gradient-based attacks (PGD, CW, APGD, FAB) cannot move them and their robust "
            "accuracy is not trustworthy. Look for non-differentiable steps in the model (rounding, quantisation) "
            "or add a gradient-free attack ('autoattack:square')."
        )
    gradient_attacks = [n for n, r in results.items() if r.config.get("type") == "pgd"]
    for name, result in results.items():
        if result.config.get("type") != "autoattack":
            continue
        flags += [f"{name}: AutoAttack warned: {message}" for message in result.extra["autoattack_warnings"]]
        after = result.extra["robust_accuracy_after"]
        gradient_based = [v for k, v in after.items() if k != "square"]
        # AutoAttack's own check_square_sr, which cannot fire when components run one at a time.
        if "square" in after and gradient_based and after["square"] < min(gradient_based) - 0.002:
            flags.append(
                f"{name}: the gradient-free Square attack lowered the robust accuracy by "
                f"{min(gradient_based) - after['square']:.2%} after the gradient-based components: their gradients "
                "may be masked, and AutoAttack's authors consider such an evaluation unreliable."
            )
        for other in gradient_attacks:
            if result.accuracy > results[other].accuracy:
                flags.append(
                    f"{name} accuracy ({result.accuracy:.4f}) is above "
                    f"{other} accuracy ({results[other].accuracy:.4f}): "
                    "AutoAttack should be the stronger attack; the evaluation may be unreliable (gradient masking?)."
                )
    return flags


def evaluate_robustness(
    model: nn.Module,
    images: Any,
    labels: Optional[torch.Tensor] = None,
    *,
    attacks: Union[str, Sequence[Union[str, AttackConfig]]] = DEFAULT_ATTACKS,
    norm: str = "Linf",
    eps: Union[float, str] = 8 / 255,
    batch_size: int = 128,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    autocast_dtype: Optional[Union[str, torch.dtype]] = None,
    autoattack_version: str = "standard",
    progress: bool = True,
    resume_dir: Optional[Union[str, Path]] = None,
    distributed: bool = False,
) -> RobustnessReport:
    """Evaluate ``model`` clean and under ``attacks``, class by class.

    Args:
        model: any classifier mapping images in [0, 1] to logits (a tensor, ``ModelOutput`` or tuple);
            it normalises its inputs itself (as ``RobustImageClassifier`` does), so ``eps`` is in pixel units.
        images: a float tensor (N, C, H, W) in [0, 1] with ``labels`` (N,), or a dataset with
            ``.tensors(indices)`` and ``.class_names`` (``TensorImageDataset``, ``load_image_dataset``).
        attacks: names (``clean``, ``pgd20``, ``cw20``, ``autoattack``, ``autoattack:apgd-ce+apgd-t``; see
            :mod:`hf_csr.evaluation.specs`) or attack configs, or one comma-separated string. ``clean``
            is always evaluated; ``worst_of_all`` is added when any attack runs.
        norm, eps: the threat model, ``"Linf"`` or ``"L2"``; ``eps`` may be a fraction string like ``"8/255"``.
        batch_size: examples per forward pass; AutoAttack also runs batch by batch.
        seed: makes the random starts (PGD) and AutoAttack reproducible.
        class_names: default: the dataset's, else the model's ``config.id2label``.
        device: where to evaluate (the model is moved there); default: the model's device.
        autocast_dtype: ``"bf16"`` or ``"fp16"`` to run the model under autocast (bf16 is safer for gradients).
        autoattack_version: ``"standard"`` or ``"rand"`` (randomised defences), for the ``autoattack`` name.
        progress: show tqdm progress bars.
        resume_dir: keep per-attack, per-batch progress there; a rerun after an interruption reloads
            the finished batches instead of recomputing them and gives identical numbers, with any number
            of processes. Progress of an evaluation with another identity (model weights or config, data,
            attacks, threat model, seed) is removed first, with a warning. With several machines it must
            be on a shared file system for a resume to find every process's chunks.
        distributed: split the chunks across the processes of the initialised ``torch.distributed``
            group (``accelerate launch`` / ``torchrun``); every process must call this with the same
            arguments, each attacks its share, and every process returns the same, complete report.
            Only the progress files of its own chunks are written by a process; writing the report is the
            caller's job (on the main process only).

    Returns:
        A :class:`RobustnessReport`. Its ``flags`` list warnings that make robust numbers
        untrustworthy (zero input gradients, AutoAttack's own checks, AutoAttack weaker than PGD).
    """
    check_choice("norm", norm, NORMS)
    eps = check_budget(parse_pixel_value(eps, name="eps"), norm, "eps")
    check_positive_int(batch_size, "batch_size")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    check_evaluation_inputs(model, eps, norm)  # Linf eps <= 1; refuse NaN/inf weights (hf_csr.validation)
    configs = parse_attacks(attacks, autoattack_version)
    dtype = _resolve_autocast(autocast_dtype)
    source = _Images(images, labels)
    shards = Shards(bool(distributed))
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    net = _Logits(model)
    with attack_mode(model, "eval"):
        with torch.no_grad():
            num_classes = net(source.take(torch.arange(1)).to(device)).shape[1]
        names = _class_names(model, source, class_names, num_classes)
        store = None
        if resume_dir is not None:
            identity = _run_identity(model, source, configs, norm=norm, eps=eps, seed=seed, dtype=dtype,
                                     autoattack_version=autoattack_version)
            store = _ProgressStore(resume_dir, identity, shards)
        run = _Evaluation(
            net, source, norm=norm, eps=eps, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
            progress=progress and shards.is_main, store=store, shards=shards,
        )
        results: Dict[str, AttackResult] = {}
        clean, zero_gradients = run.clean(configs[0], check_gradients=any(c.uses_gradients for c in configs[1:]))
        with inputs_prevalidated():  # every batch was range-checked by the clean pass
            for config in configs:
                extra = {}
                if isinstance(config, PGDConfig):
                    predictions = run.pgd(config, clean)
                elif isinstance(config, AutoAttackConfig):
                    predictions, warnings, after = run.autoattack(config, clean, num_classes)
                    extra = {"robust_accuracy_after": after, "autoattack_warnings": warnings}
                else:
                    predictions = clean
                results[config.name] = AttackResult(
                    config.name, predictions, source.labels, names, config.describe(eps), extra=extra
                )
                _log_result(results[config.name])
    adversarial = [results[c.name] for c in configs[1:]]
    if adversarial:
        results[WORST_OF_ALL] = AttackResult(
            WORST_OF_ALL, _worst_of_all(adversarial, source.labels), source.labels, names,
            {"type": WORST_OF_ALL, "attacks": [r.name for r in adversarial]},
        )
        _log_result(results[WORST_OF_ALL])
    flags = _flags(results, zero_gradients, len(source))
    for flag in flags:
        logger.warning(flag)
    randomness = _randomness(configs)
    settings = {
        "device": device.type,  # (not the index: cuda:0 and cuda:1 processes evaluate alike)
        "autocast": None if dtype is None else str(dtype).replace("torch.", ""),
        "autoattack_version": autoattack_version,
    }
    if randomness["per_chunk"]:
        # only then do the numbers depend on the batch size (never on the number of processes)
        settings["batch_size"] = batch_size
    return RobustnessReport(
        attacks=results, labels=source.labels, class_names=names, threat_model={"norm": norm, "eps": eps}, seed=seed,
        flags=flags, metadata={"evaluation": settings, "randomness": randomness, "versions": _versions()},
    )


def _randomness(configs: Sequence[AttackConfig]) -> Dict[str, Any]:
    """Which attacks draw their random numbers per example (split-independent) and which per chunk."""
    per_example, per_chunk = [], []
    for config in configs:
        if isinstance(config, PGDConfig) and config.random_start != "none":
            per_example.append(config.name)
        elif isinstance(config, AutoAttackConfig):
            keyed = config.keyed_components()
            per_example += [f"{config.name}:{c}" for c in config.components if c in keyed]
            per_chunk += [f"{config.name}:{c}" for c in config.components if c not in keyed]
    out: Dict[str, Any] = {"per_example": per_example, "per_chunk": per_chunk}
    if per_chunk:
        out["note"] = (
            "the per_chunk attacks draw from torch's generator reseeded with the seed for every chunk of "
            "batch_size survivors (formed in dataset order): their outcomes depend on the batch size and on "
            "which examples earlier components broke, never on the number of processes."
        )
    return out


def _run_identity(model: nn.Module, source: _Images, configs, *, norm, eps, seed, dtype, autoattack_version):
    """What cached progress must match to be reused: model, data, attacks and their settings, seed."""
    return {
        **{f"model_{key}": value for key, value in model_identity(model).items()},
        "num_examples": len(source),
        "labels": _digest(source.labels),
        "attacks": [config.describe(eps) for config in configs],
        "threat_model": {"norm": norm, "eps": eps},
        "seed": seed,
        "autocast": str(dtype),
        "autoattack_version": autoattack_version,
        "hf_csr": _versions().get("hf_csr"),
    }


def _log_result(result: AttackResult) -> None:
    worst = result.worst_class
    logger.info("%s: accuracy %.4f, worst class %s %.4f, ||C||_2 %.4f", result.name, result.accuracy, worst["name"],
                worst["accuracy"], result.metrics["spectral_norm"])
