"""Fairness methods as plug-ins: the trainer knows no concrete method, the arguments hold no method's
settings, a method registered from user code trains / checkpoints / resumes / reaches the card and the
command line; CSR's epoch pass follows the released algorithm (eval mode, augmented training images);
AWP's warm-up is counted as in the released loop; per-class statistics are global under data parallelism."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch
from huggingface_hub import ModelCard

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.fairness import (
    FAIRNESS_REGISTRY,
    FairnessConfig,
    FairnessMethod,
    LossTerms,
    available_fairness_methods,
    config_flags,
    get_fairness_method,
    register_fairness_method,
)
from hf_csr.fairness.registry import BUILTIN_FAIRNESS_METHODS, all_method_flags

REPO = Path(__file__).resolve().parents[2]


CONCRETE = [module for name, module in BUILTIN_FAIRNESS_METHODS.items() if name != "none"]


# --------------------------------------------------------------------------- a method of the user's own
@dataclass
class CountingConfig(FairnessConfig):
    """Weights each class by its running count of adversarial errors, plus a small logit penalty."""

    strength: float = field(default=0.5, metadata={"help": "how much the error counts reweight the classes"})
    penalty: float = field(default=1e-3, metadata={"help": "weight of the mean squared adversarial logit"})

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"counting_strength must be >= 0; got {self.strength}.")


class CountingMethod(FairnessMethod):
    config_class = CountingConfig

    def __init__(self, config, context):
        super().__init__(config, context)
        self.errors = torch.zeros(context.num_classes, dtype=torch.float64)
        self.steps = 0

    def on_batch_statistics(self, stats):
        self.errors += (stats.class_counts - stats.correct).double()

    def example_weights(self, labels, losses):
        share = self.errors / self.errors.sum().clamp_min(1.0)
        return (1.0 + self.config.strength * self.num_classes * share).float().to(labels.device)[labels]

    def loss_terms(self, inputs):
        return LossTerms({"counting": self.config.penalty * inputs.logits_adv.float().pow(2).mean()})

    def on_optimizer_step(self):
        self.steps += 1

    def log_metrics(self):
        return {"counting_steps": float(self.steps)}

    def card_fields(self):
        return {"counting_strength": self.config.strength, "counting_rule": "error-count reweighting"}

    def state_dict(self):
        return {"errors": self.errors.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        self.errors = state["errors"].double().clone()
        self.steps = int(state["steps"])


@pytest.fixture
def counting():
    register_fairness_method("counting")(CountingMethod)
    yield CountingMethod
    del FAIRNESS_REGISTRY["counting"]


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=0.05, attack_steps=2, logging_steps=2, save_steps=2, use_cpu=True, disable_tqdm=True, seed=0,
        augment=False,
    )
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


@pytest.fixture
def train(fmnist, fmnist_model):
    def train(tmp_path, callbacks=None, resume=None, model="test_tiny_convnet", limit=64, **overrides):
        torch.manual_seed(0)
        trainer = CSRTrainer(model=fmnist_model(model), args=make_args(tmp_path, **overrides),
                             train_dataset=fmnist(limit=limit), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer
    return train


# --------------------------------------------------------------------------- structure
@pytest.mark.subprocess
def test_the_trainer_imports_no_concrete_method():
    tree = ast.parse((REPO / "hf_csr" / "trainer.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    for module in CONCRETE + ["hf_csr.baselines"]:
        short = "." + module.split("hf_csr", 1)[1]
        assert not any(name in (module, short) or name.startswith((module + ".", short + ".")) for name in imported), module
    # and at run time: importing the trainer (and hf_csr) loads none of them
    code = ("import sys, hf_csr, hf_csr.trainer, hf_csr.experiment; "
            f"print([m for m in {CONCRETE + ['hf_csr.baselines']!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_training_arguments_hold_no_method_settings():
    names = {f.name for f in dataclasses.fields(CSRTrainingArguments)}
    flags = set(all_method_flags())
    assert not names & flags, names & flags
    prefixes = tuple(f"{name}_" for name in BUILTIN_FAIRNESS_METHODS if name != "none")
    assert not [n for n in names if n.startswith(prefixes)]
    assert {"fairness_method", "fairness_config"} <= names


def test_settings_are_each_methods_own_and_validated_when_built():
    csr = CSRTrainingArguments(output_dir="x", csr_alpha=0.2, csr_variant="paper")
    config = csr.fairness_config
    assert type(config).__name__ == "CSRConfig" and config.alpha == 0.2 and config.variant == "paper"
    assert config_flags(get_fairness_method("frl"))["val_size"] == "fairness_val_size"  # a shared flag
    same = CSRTrainingArguments(output_dir="x", fairness_config={"alpha": 0.2, "csr_variant": "paper"})
    assert same.fairness_config == config
    as_json = CSRTrainingArguments(output_dir="x", fairness_config='{"alpha": 0.2, "variant": "paper"}')
    assert as_json.fairness_config == config
    assert json.loads(csr.to_json_string())["fairness_config"]["alpha"] == 0.2
    assert dataclasses.replace(csr, learning_rate=0.5).fairness_config == config
    with pytest.raises(ValueError, match="csr_alpha is a setting of fairness_method 'csr', but fairness_method is 'frl'"):
        CSRTrainingArguments(output_dir="x", fairness_method="frl", csr_alpha=0.3)
    with pytest.raises(TypeError, match="unexpected setting 'csr_alpah'"):
        CSRTrainingArguments(output_dir="x", csr_alpah=0.3)
    with pytest.raises(ValueError, match="fairness_config is a FRLConfig but fairness_method 'csr' takes a CSRConfig"):
        CSRTrainingArguments(output_dir="x", fairness_config=get_fairness_method("frl").config_class())
    for flag, owners in all_method_flags().items():
        for _, _, f in owners:
            assert f.metadata.get("help"), flag  # every setting is documented


def test_an_unregistered_method_is_rejected_by_name(counting):
    with pytest.raises(ValueError, match=r"fairness_method must be one of \[.*'counting'.*\]; got 'countng'"):
        CSRTrainingArguments(output_dir="x", fairness_method="countng")
    with pytest.raises(ValueError, match="already registered"):
        register_fairness_method("counting")(type("Other", (CountingMethod,), {}))
    with pytest.raises(ValueError, match="collide with CSRTrainingArguments fields"):
        @dataclass
        class Clash(FairnessConfig):
            eps: float = field(default=1.0, metadata={"help": "x", "flag": "attack_eps"})

        register_fairness_method("clash")(type("ClashMethod", (FairnessMethod,), {"config_class": Clash}))
    assert "clash" not in FAIRNESS_REGISTRY


def test_reserved_setting_names_are_checked_whichever_comes_first():
    """The registry does not import the training arguments: they reserve their field names, and a clash is found
    whether the method or the reservation comes first."""
    from hf_csr.fairness.registry import reserve_setting_names

    @dataclass
    class Early(FairnessConfig):
        knob: float = field(default=1.0, metadata={"help": "x", "flag": "reserved_later_knob"})

    register_fairness_method("early_method")(type("EarlyMethod", (FairnessMethod,), {"config_class": Early}))
    try:
        with pytest.raises(ValueError, match=r"'early_method': setting\(s\) \['reserved_later_knob'\] collide with Owner"):
            reserve_setting_names({"reserved_later_knob"}, "Owner")
    finally:
        FAIRNESS_REGISTRY.pop("early_method")
    reserve_setting_names({"reserved_later_knob"}, "Owner")  # a name no real setting uses: it may stay reserved
    with pytest.raises(ValueError, match="collide with Owner fields"):
        register_fairness_method("late_method")(type("LateMethod", (FairnessMethod,), {"config_class": Early}))
    assert "late_method" not in FAIRNESS_REGISTRY


# --------------------------------------------------------------------------- a user's method end to end
def test_a_registered_method_trains_resumes_identically_and_reaches_the_card(train, StopAt, assert_same_weights, fmnist, weights, tmp_path, counting):
    assert "counting" in available_fairness_methods()
    common = dict(fairness_method="counting", counting_strength=0.8, max_steps=8, save_steps=2)
    straight = train(tmp_path / "straight", **common)
    assert isinstance(straight.fairness, CountingMethod) and straight.fairness.config.strength == 0.8
    assert straight.fairness.steps == 8 and float(straight.fairness.errors.sum()) > 0
    logged = [h for h in straight.state.log_history if "counting_steps" in h]
    assert logged and logged[-1]["counting_steps"] == 8
    # the method changes the update: not the plain base method
    plain = train(tmp_path / "plain", fairness_method="none", max_steps=8, save_strategy="no")
    assert any(not torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(straight).values()))
    # checkpoint, kill, resume: the same weights and the same method state as the straight run
    interrupted = train(tmp_path / "resumed", callbacks=[StopAt(4)], **common)
    assert interrupted.state.global_step == 4
    saved = torch.load(tmp_path / "resumed" / "out" / "checkpoint-4" / "csr_state.pt", weights_only=True)
    assert saved["fairness"]["name"] == "counting" and saved["fairness"]["state"]["steps"] == 4
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "out" / "checkpoint-4"), **common)
    assert_same_weights(weights(straight), weights(resumed))
    assert torch.equal(straight.fairness.errors, resumed.fairness.errors) and resumed.fairness.steps == 8
    # another method cannot resume it
    with pytest.raises(ValueError, match="fairness_method changed: .* was trained with 'counting', this run has 'csr'"):
        train(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "out" / "checkpoint-4"), max_steps=8)
    # the card
    from hf_csr.experiment import training_summary

    straight.save_model()
    straight.evaluate_and_report(fmnist("test", limit=20), attacks="clean",
                                 training=training_summary(straight.args, straight.fairness))
    card = ModelCard.load(Path(straight.args.output_dir) / "README.md").content.replace("\\_", "_")  # markdown escapes
    assert "counting" in card and "counting_strength" in card and "error-count reweighting" in card


def test_a_registered_method_from_the_command_line(tmp_path, counting):
    from hf_csr.experiment import main, parse_args

    _, training = parse_args(["--fairness_method", "counting", "--counting_strength", "0.25", "--output_dir", "x"])
    assert training.fairness_config == CountingConfig(strength=0.25)
    with pytest.raises(ValueError, match="counting_strength must be >= 0"):
        parse_args(["--fairness_method", "counting", "--counting_strength", "-1", "--output_dir", "x"])
    with pytest.raises(ValueError, match="counting_strength is a setting of fairness_method 'counting'"):
        parse_args(["--fairness_method", "csr", "--counting_strength", "0.3", "--output_dir", "x"])
    out = tmp_path / "run"
    code = main(argv=[
        "--fairness_method", "counting", "--counting_strength", "0.25", "--output_dir", str(out),
        "--model", "test_tiny_convnet", "--dataset", "fashion_mnist", "--train_limit", "32", "--eval_limit", "20",
        "--max_steps", "2", "--per_device_train_batch_size", "16", "--attack_steps", "1", "--final_eval_attacks",
        "clean", "--eval_strategy", "no", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
        "--augment", "false",
    ])
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text())["training"]
    assert summary["fairness_method"] == "counting" and summary["counting_strength"] == 0.25
    assert "| counting\\_rule | error-count reweighting |" in ModelCard.load(out / "README.md").content


# --------------------------------------------------------------------------- CSR's epoch pass (released algorithm)
def _is_crop_or_flip_of(image: torch.Tensor, raw: torch.Tensor, padding: int) -> Optional[tuple]:
    """The (dy, dx, flipped) with which ``image`` is a zero-padded random crop (+ flip) of ``raw``, or None."""
    padded = torch.nn.functional.pad(raw, (padding,) * 4)
    h, w = raw.shape[-2:]
    for flipped in (False, True):
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                crop = padded[..., dy : dy + h, dx : dx + w]
                if torch.equal(crop.flip(-1) if flipped else crop, image):
                    return dy, dx, flipped
    return None


def test_the_epoch_pass_attacks_augmented_training_images_in_eval_mode(fmnist, fmnist_model, tmp_path):
    """Released loop: model.eval(), then PGD-10 on every batch of the *augmented* train loader. With the
    training attack's BatchNorm mode set to 'train' (as the DDPM recipes do), the pass must still run in
    eval mode; and every image it attacks must be a padded crop (+ flip) of a training image, not all unchanged."""
    torch.manual_seed(0)
    dataset = fmnist(limit=40)
    args = make_args(tmp_path, csr_confusion_source="epoch", csr_alpha=0.3, augment=True, crop_padding=2,
                     attack_bn_mode="train", max_steps=1, save_strategy="no", per_device_eval_batch_size=16)
    trainer = CSRTrainer(model=fmnist_model(), args=args, train_dataset=dataset)
    csr, context = trainer.fairness, trainer.fairness_context
    model = context.model
    modes, attacked = [], []
    hook = model.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    original = context.attack

    def spy(x, y, **kwargs):
        attacked.append((x.detach().cpu().clone(), y.detach().cpu().clone()))
        return original(x, y, **kwargs)

    context.attack = spy
    model.train()
    csr.run_confusion_pass(0)
    hook.remove()
    assert model.training  # restored afterwards
    assert modes and not any(modes), "every forward of the pass runs in eval mode"
    images = torch.cat([x for x, _ in attacked])
    labels = torch.cat([y for _, y in attacked])
    raw, raw_labels = dataset.tensors()
    assert torch.equal(labels, raw_labels) and images.shape == raw.shape  # the whole training set, once
    transforms = [_is_crop_or_flip_of(images[i], raw[i], padding=2) for i in range(len(raw))]
    assert all(t is not None for t in transforms), "every attacked image is a crop/flip of its training image"
    assert sum(t != (2, 2, False) for t in transforms) > len(raw) // 2, "the images are augmented"
    assert float(csr.confusion.class_counts.sum()) == len(raw) and csr.confusion.pass_tag == 0


def test_the_epoch_pass_without_augmentation_sees_the_raw_images(fmnist, fmnist_model, tmp_path):
    torch.manual_seed(0)
    dataset = fmnist(limit=20)
    args = make_args(tmp_path, csr_confusion_source="epoch", augment=False, max_steps=1, save_strategy="no")
    trainer = CSRTrainer(model=fmnist_model(), args=args, train_dataset=dataset)
    attacked = []
    original = trainer.fairness_context.attack
    trainer.fairness_context.attack = lambda x, y, **kw: attacked.append(x.cpu()) or original(x, y, **kw)
    trainer.fairness.run_confusion_pass(0)
    assert torch.equal(torch.cat(attacked), dataset.tensors()[0])


def test_awp_warmup_is_counted_as_in_the_released_loop(fmnist, fmnist_model, tmp_path):
    """Released: ``for epoch in range(1, epochs + 1): ... if epoch >= args.awp_warmup: perturb``."""
    epochs, steps_per_epoch = 3, 2
    for warmup in (0, 1, 2, 3):
        released = [epoch >= warmup for epoch in range(1, epochs + 1)]
        perturbed_epochs = []

        class Spy(CSRTrainer):
            def _maybe_perturb_weights(self, raw, x, x_adv, y):
                before = self._awp_delta
                super()._maybe_perturb_weights(raw, x, x_adv, y)
                if before is None and self._awp_delta is not None:
                    perturbed_epochs.append(int(self.state.epoch or 0.0))

        torch.manual_seed(0)
        args = make_args(tmp_path / str(warmup), fairness_method="none", awp_gamma=0.005, awp_warmup=warmup,
                         max_steps=-1, num_train_epochs=epochs, per_device_train_batch_size=10, save_strategy="no")
        Spy(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist(limit=20)).train()
        ours = [perturbed_epochs.count(e) == steps_per_epoch for e in range(epochs)]
        assert ours == released, (warmup, perturbed_epochs)


# --------------------------------------------------------------------------- data parallelism
def test_class_sums_are_global(fmnist, fmnist_model, tmp_path):
    """One process: class_sums is the plain per-class sum (the 2-process case runs in the tests below)."""
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=make_args(tmp_path, save_strategy="no"),
                         train_dataset=fmnist(limit=20))
    values = torch.arange(6, dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 3, 3, 3])
    sums, counts = trainer.fairness_context.class_sums(values, labels)
    assert sums.tolist()[:4] == [0.0, 3.0, 0.0, 12.0] and counts.tolist()[:4] == [1.0, 2.0, 0.0, 3.0]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--method", "frl", "--base-loss", "trades"],
    ["--method", "wat"],
    ["--method", "cfa", "--base-loss", "trades"],
    ["--method", "csr", "--source", "epoch", "--augment"],
])
def test_two_processes_equal_one_process_for_methods_with_class_statistics(run_ddp_workers, assert_same_weights, tmp_path, extra):
    one = run_ddp_workers(tmp_path, 1, 32, extra)
    two = run_ddp_workers(tmp_path, 2, 16, extra)
    for key in [k for k in one if k.startswith("method/") or k == "confusion"]:
        a, b = one.pop(key), two.pop(key)
        if key == "method/cumulative_costs":  # WAT: validation losses of weights that agree to float precision
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), key
        else:
            assert torch.equal(a, b), key  # statistics identical, not merely close
    assert_same_weights(one, two, atol=1e-5)


def test_the_documented_example_registers_and_trains(fmnist, fmnist_model, tmp_path, monkeypatch):
    """docs/fairness.md's example, run as written (its output_dir moved under tmp_path)."""
    text = (REPO / "docs" / "fairness.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: Dict[str, Any] = {}
    try:
        exec(compile(code, "docs/fairness.md", "exec"), namespace)  # noqa: S102 - our own documentation
        args = namespace["args"]
        assert args.fairness_config.strength == 0.5
        small = dataclasses.replace(args, max_steps=2, per_device_train_batch_size=16, attack_steps=1, use_cpu=True,
                                    save_strategy="no", disable_tqdm=True, augment=False)
        torch.manual_seed(0)
        trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=small, train_dataset=fmnist(limit=32))
        trainer.train()
        assert float(trainer.fairness.errors.sum()) > 0
        from hf_csr.experiment import training_summary

        assert training_summary(small, trainer.fairness)["errorweight_strength"] == 0.5
    finally:
        FAIRNESS_REGISTRY.pop("errorweight", None)


class HoldingOut(FairnessMethod):
    config_class = CountingConfig  # any config will do

    def __init__(self, config, context):
        super().__init__(config, context)
        self.validation = context.hold_out_validation(per_class=2)
        self.statistics = None

    def on_epoch_begin(self, epoch):
        images, labels = self.context.validation_split(1000)
        self.statistics = self.context.class_statistics(images, labels, tag=("hold-out", epoch), steps=1)


def test_a_held_out_validation_split_leaves_the_training_set(fmnist, fmnist_model, tmp_path):
    register_fairness_method("holding_out")(HoldingOut)
    try:
        dataset = fmnist(limit=60)

        def build(**kwargs):
            torch.manual_seed(0)
            args = make_args(tmp_path, fairness_method="holding_out", max_steps=2, save_strategy="no")
            return CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=dataset, **kwargs)

        trainer = build()
        images, labels = trainer.fairness.validation
        assert torch.bincount(labels, minlength=10).tolist() == [2] * 10
        train_images, train_labels = trainer.train_dataset.tensors()
        assert len(train_labels) == 40 and torch.bincount(train_labels, minlength=10).tolist() == [4] * 10
        # held-out images are the dataset's own, and none of them is trained on
        all_images = dataset.tensors()[0].flatten(1)
        assert all(any(torch.equal(img, row) for row in all_images) for img in images.flatten(1))
        assert not any(any(torch.equal(img, row) for row in train_images.flatten(1)) for img in images.flatten(1))
        assert torch.equal(build().fairness.validation[0], images)  # the same draw every time (seeded)
        trainer.train()
        stats = trainer.fairness.statistics
        assert stats.counts.tolist() == [2.0] * 10 and torch.all((stats.robust_error >= 0) & (stats.robust_error <= 1))
        # a user-given split is used as is, and the training set stays whole
        given = fmnist("test", limit=20)
        kept = build(fairness_validation_dataset=given)
        assert len(kept.train_dataset) == 60 and torch.equal(kept.fairness.validation[1], given.tensors()[1])
        with pytest.raises(ValueError, match="leaves no training images of class"):
            register_fairness_method("holding_out", overwrite=True)(
                type("Greedy", (HoldingOut,), {"__init__": lambda self, c, ctx: ctx.hold_out_validation(per_class=6)}))
            build()
    finally:
        FAIRNESS_REGISTRY.pop("holding_out", None)
