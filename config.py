"""Training configuration: `TrainConfig` and its presets, the one registry of models (the only
place that tells a ViT from the ResNet baseline), validation, the command line, resolving a
config against a checkpoint, and the shortest command that reproduces a config.

Settings come from TrainConfig's defaults, then the --preset, then the flags given. A resumed run
keeps its saved settings; flags given with --resume replace them, except those that change the
model. Scripts and tests build a `TrainConfig` and call `train_cifar10.train(cfg)` directly; only
this module turns flags into configs and configs into commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cnn_model import ResNetCIFAR, ResNetConfig
from vit_model import CIFAR_PRESETS, VisionTransformer, ViTConfig, model_config

# --------------------------------------------------------------------------------------------
# The models: the ViT presets of vit_model.py, and the small ResNet that the `data` study of
# compare_configs.py sets against them (cnn_model.py)
# --------------------------------------------------------------------------------------------

CNN = "resnet_cifar"
MODELS = (*CIFAR_PRESETS, CNN)
# Settings that exist for the ViT only; the CNN must keep their defaults (and Muon is refused for
# it: Muon takes the blocks' matrices).
VIT_ONLY = ("patch_drop", "full_token_epochs", "full_token_frac", "res_schedule", "drop_path",
            "dropout", "embed_dim", "depth", "num_heads", "mlp_ratio", "mimetic_init")
# Settings that say where things go or what is recorded, not what is trained: not part of a
# run's identity.
PLACE = ("data_dir", "download", "out_dir", "run_name", "overwrite", "wandb", "wandb_project",
         "device", "threads", "log_csv", "measure_speed")
# Settings that only add measurements: they change what is trained only when their time counts
# against a time budget (--clock wall).
MEASURE_ONLY = ("eval_train",)


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("vit_cifar_tiny", f"model, one of {list(MODELS)}; {CNN} is the CNN baseline "
                    "(cnn_model.py), for which the ViT settings below do not apply")
    patch_size: int = _f(4, "patch size P (32x32 images give a (32/P)^2 grid)")
    embed_dim: int | None = _f(None, "override the preset's embedding size D", type=int)
    depth: int | None = _f(None, "override the preset's number of blocks", type=int)
    num_heads: int | None = _f(None, "override the preset's number of heads", type=int)
    mlp_ratio: float | None = _f(None, "override the preset's MLP size / D", type=float)
    classifier: str = _f("token", "'token' ([CLS], Eq. 4) or 'gap' (global average pooling)")
    pos_embed: str = _f("learned", "'learned', 'sincos' or 'none' (Appendix D.4)")
    mimetic_init: bool = _f(False, "mimetic initialisation of self-attention (Trockman & Kolter, "
                            "ICML 2023): after the usual initialisation, set each head's "
                            "query-key weight product close to the identity and each layer's "
                            "value-projection product close to minus the identity, as in "
                            "pre-trained ViTs; not part of the ViT paper, so off by default to "
                            "keep the paper's model; not with --init, whose weights replace it")
    dropout: float = _f(0.0, "dropout after dense layers")
    drop_path: float = _f(0.0, "stochastic depth rate of the last block")
    patch_drop: float = _f(0.0, "fraction of patch tokens dropped in training (faster steps)")
    full_token_epochs: int = _f(0, "train the last N epochs without patch dropout (with "
                                "--time-budget: the time they are expected to take)")
    full_token_frac: float = _f(0.0, "train the last fraction of the run (of the time with "
                                "--time-budget, of the steps otherwise) without patch dropout; "
                                "replaces --full-token-epochs (0: off)")
    res_schedule: str = _f("", "progressive resolution, 'SIZE:UNTIL,...': train on images "
                           "downscaled to SIZE x SIZE until the fraction UNTIL of the decay is "
                           "done, then at full size, e.g. '16:0.3,24:0.6'; the position "
                           "embedding is interpolated on the fly (Sec. 3.2) ('': off)")
    img_size: int = _f(0, "training and evaluation resolution: the images are resized to it on "
                       "the fly, e.g. upsampled for fine-tuning (Sec. 3.2: the paper fine-tunes at "
                       "384) (0: the model's own, 32 for the CIFAR presets)")
    init: str = _f("", "start a new run from pre-trained weights (Sec. 3.2: the pre-trained head "
                   "is replaced by a zero-initialised one and the position embedding is "
                   "resized): a checkpoint of ours (PATH.pt or a run folder), a Google ViT "
                   "PATH.npz, torchvision:ARCH (downloads ImageNet weights, e.g. "
                   "torchvision:vit_b_16), torchvision:ARCH=PATH (a saved torchvision state "
                   "dict), or timm:PATH (a timm ViT state dict; give --num-heads, which its "
                   "shapes cannot tell); the architecture is the source's ('': from scratch)")
    # optimisation
    epochs: int = _f(30, "number of epochs (with --time-budget: the most epochs); with --resume, "
                     "a new value re-plans the cosine decay to end at the new last epoch")
    time_budget: float = _f(0.0, "minutes of training (see --clock): the cosine decay "
                            "follows the time spent (read every --log-every steps) instead of "
                            "the step count and the run stops when it is spent; resuming such a "
                            "run is not bit-exact; with --resume, a new value re-plans the decay "
                            "to end at the new budget (0: off)")
    clock: str = _f("wall", "what --time-budget counts: 'wall' (everything: evaluation and "
                    "saving included, so the whole command fits the budget) or 'train' (the "
                    "training steps only; evaluation and saving are timed apart: equal training "
                    "time for comparisons)")
    batch_size: int = _f(128, "global batch size (split across DDP processes)")
    optimizer: str = _f("adamw", "'adamw'; 'sgd' (with --momentum, the paper's fine-tuning, "
                        "Appendix B.1.1); or 'muon': Muon for the 2D weight matrices of the "
                        "blocks (qkv, proj, fc1, fc2) and AdamW for the rest (embeddings, norms, "
                        "biases, head)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    muon_lr: float = _f(0.0, "peak learning rate of Muon, with its update scaled to AdamW's RMS "
                        "(adjust_lr_fn='match_rms_adamw'); it follows the same schedule (0: --lr)")
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov)")
    momentum: float = _f(0.9, "SGD momentum (--optimizer sgd)")
    min_lr: float = _f(1e-5, "learning rate at the end of the decay")
    decay: str = _f("cosine", "shape of the decay after the warmup: 'cosine' or 'linear' (to "
                    "min_lr)")
    warmup_epochs: float = _f(2.0, "linear warmup length in epochs (per-step schedule)")
    warmup_frac: float = _f(0.0, "linear warmup as a fraction of the run (of the time with "
                            "--time-budget, of the steps otherwise); replaces --warmup-epochs "
                            "(0: off)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, pos_embed, "
                             "cls_token)")
    beta2: float = _f(0.999, "AdamW beta2")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    ema: float = _f(0.0, "decay of an EMA of the weights used for evaluation (0 disables)")
    # augmentation and regularisation
    crop_pad: int = _f(4, "random crop after this much zero padding (0 disables)")
    flip: bool = _f(True, "random horizontal flip")
    randaug_n: int = _f(0, "RandAugment: operations per image (0 disables)")
    randaug_m: int = _f(9, "RandAugment: magnitude, 0-30")
    mixup: float = _f(0.0, "mixup alpha (0 disables)")
    cutmix: float = _f(0.0, "cutmix alpha (0 disables)")
    mix_prob: float = _f(1.0, "probability that a sample is mixed, when mixup or cutmix is on")
    mix_off_frac: float = _f(0.0, "train the last fraction of the run (of the time with "
                             "--time-budget, of the steps otherwise) without mixup and cutmix, "
                             "on the real images (0: mix to the end)")
    erase_prob: float = _f(0.0, "random erasing probability per sample")
    label_smoothing: float = _f(0.1, "label smoothing")
    # data, evaluation, output
    data_dir: str = _f("data", "CIFAR-10: a cifar-10-batches-py folder, an ImageFolder tree with "
                       "train/ and test/, or where to download it")
    download: bool = _f(True, "download CIFAR-10 when data_dir holds none")
    classes: str = _f("", "train and evaluate on these classes only, comma-separated names in "
                      "the order of their labels, e.g. 'dog,frog,horse,ship,truck' ('': all)")
    val_split: int = _f(0, "hold out this many training images and evaluate on them instead of "
                        "test")
    train_fraction: float = _f(1.0, "train on this fraction of the training images (after "
                               "--val-split), the same fraction of every class, always the same "
                               "images whatever the seed")
    eval_every: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)")
    eval_subset: int = _f(0, "evaluate on N evenly spaced evaluation images between epochs and on "
                          "all of them after the last epoch; only full evaluations choose best.pt "
                          "(0: all)")
    eval_train: int = _f(0, "at each evaluation, also evaluate N evenly spaced training images "
                         "as they are (no augmentation, no patch dropout): the train/evaluation "
                         "gap along the run, recorded as train_eval_acc (0: off)")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    tta_flip: bool = _f(False, "average the logits of each image and its mirror image in the full "
                        "evaluations (those that choose best.pt, and --eval-only), not in the "
                        "--eval-subset ones between epochs (test-time augmentation; twice the cost "
                        "of a full evaluation)")
    out_dir: str = _f("checkpoints", "checkpoints go to OUT_DIR/RUN_NAME/{last,best}.pt")
    run_name: str = _f("", "run folder name (default: MODEL-TIMESTAMP, never one that exists)")
    overwrite: bool = _f(False, "let a new run replace the checkpoints of an earlier run of the "
                         "same --run-name, and --export replace an exported file (never a run's "
                         "checkpoint)")
    log_csv: str = _f("", "the experiments log: one row per run appended to this CSV file "
                      "('': OUT_DIR/experiments.csv; 'off': none)")
    measure_speed: bool = _f(True, "measure the machine's reference speed (`python benchmark.py "
                             "model`, a few seconds) before training, for the experiments log")
    wandb: str = _f("offline", "Weights & Biases mode: 'offline', 'online' or 'off'")
    wandb_project: str = _f("vit_from_scratch", "W&B project name")
    # speed and reproducibility
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    amp: str = _f("auto", "autocast: 'auto' (bf16 on CUDA, off on CPU), 'bf16', 'fp16' (CUDA) or "
                  "'off'")
    compile: bool = _f(False, "torch.compile the model")
    threads: int = _f(0, "CPU threads for torch (0: leave the default)")
    seed: int = _f(0, "random seed")
    log_every: int = _f(20, "steps between progress-bar and W&B step updates")
    stop_at_epoch: int = _f(0, "stop cleanly after this many epochs, as if interrupted (0: run "
                            "all)")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed, validated."""
        cfg = dataclasses.replace(self, **changes)
        validate(cfg)
        return cfg


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

PRESETS: dict[str, dict[str, Any]] = {
    # The best test accuracy on the 2-core CPU within an hour (docs/results.md): 57 minutes of
    # training, whatever the machine's speed that day, plus start-up and the last evaluation.
    "cpu": dict(model="vit_cifar_tiny", classifier="gap", time_budget=57.0, epochs=100,
                batch_size=128, optimizer="muon", lr=1e-3, muon_lr=4e-3, warmup_epochs=1.0,
                weight_decay=0.05, patch_drop=0.6, full_token_epochs=1, label_smoothing=0.1,
                eval_subset=2000, tta_flip=True),
    # The paper's fine-tuning (Appendix B.1.1 and Table 4; the official code's defaults,
    # google-research/vision_transformer vit_jax/configs/common.py): SGD with momentum 0.9, batch
    # 512, no weight decay, gradient clipping at global norm 1, a linear warmup of 500 steps then
    # a cosine decay to 0 over 10,000 steps for CIFAR-10 (103 epochs of 97 steps: 9,991), the
    # learning rate from the grid {0.001, 0.003, 0.01, 0.03} (0.03 is the code's default), images
    # at 384x384. Needs --init; on the CPU use a smaller --img-size, --epochs and --batch-size.
    "finetune": dict(optimizer="sgd", momentum=0.9, batch_size=512, weight_decay=0.0,
                     clip_grad=1.0, decay="cosine", lr=0.03, min_lr=0.0, warmup_epochs=5.15,
                     epochs=103, img_size=384, label_smoothing=0.0),
    # Full recipe for one GPU (DeiT-style): strong augmentation, long schedule, EMA.
    "gpu": dict(model="vit_cifar_base", epochs=200, batch_size=512, lr=1e-3, warmup_epochs=10,
                weight_decay=0.05, beta2=0.99, drop_path=0.1, randaug_n=2, randaug_m=9, mixup=0.8,
                cutmix=1.0, erase_prob=0.25, label_smoothing=0.1, ema=0.9998,
                eval_batch_size=2000, compile=True),
}


def preset(name: str | None = None, **changes: Any) -> TrainConfig:
    """defaults < the named preset < changes, validated."""
    cfg = TrainConfig(**{**(PRESETS[name] if name else {}), **changes})
    validate(cfg)
    return cfg


def as_cnn() -> dict[str, Any]:
    """The changes that turn a ViT config into the CNN baseline's: the model, AdamW (Muon takes
    the ViT blocks' matrices), and every ViT-only setting back to its default."""
    return {"model": CNN, "optimizer": "adamw", "muon_lr": FIELDS["muon_lr"].default,
            **{name: FIELDS[name].default for name in VIT_ONLY}}


def model_config_of(cfg: TrainConfig, num_classes: int,
                    source: dict[str, Any] | None = None) -> ViTConfig | ResNetConfig:
    """The model of a training config: its --model preset with the flags that override it; or,
    with `source` (the model config of --init's weights), the source's architecture with a new
    head for num_classes (no pre-logits layer, Sec. 3.2) and this run's resolution and
    regularisation."""
    if source is not None:
        if source.get("arch") == "resnet":
            return replace(ResNetConfig(**source), num_classes=num_classes,
                           img_size=cfg.img_size or source["img_size"])
        return replace(ViTConfig(**source), num_classes=num_classes, representation_size=None,
                       img_size=cfg.img_size or source["img_size"], drop_rate=cfg.dropout,
                       drop_path_rate=cfg.drop_path, patch_drop_rate=cfg.patch_drop,
                       dynamic_img_size=bool(cfg.res_schedule),
                       mimetic_init=False)  # the pre-trained weights replace any initialisation
    if cfg.model == CNN:
        return ResNetConfig(num_classes=num_classes, img_size=cfg.img_size or 32)
    return model_config(cfg.model, num_classes=num_classes, patch_size=cfg.patch_size,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                        mlp_ratio=cfg.mlp_ratio, classifier=cfg.classifier,
                        pos_embed=cfg.pos_embed, drop_rate=cfg.dropout,
                        drop_path_rate=cfg.drop_path, patch_drop_rate=cfg.patch_drop,
                        dynamic_img_size=bool(cfg.res_schedule), img_size=cfg.img_size or None,
                        mimetic_init=cfg.mimetic_init)


def build_model(mcfg: ViTConfig | ResNetConfig | dict[str, Any]) -> VisionTransformer | ResNetCIFAR:
    """The model of a model config, or of its dict as stored in a checkpoint ("arch": "resnet"
    marks the CNN)."""
    if isinstance(mcfg, dict):
        mcfg = ResNetConfig(**mcfg) if mcfg.get("arch") == "resnet" else ViTConfig(**mcfg)
    return ResNetCIFAR(mcfg) if isinstance(mcfg, ResNetConfig) else VisionTransformer(mcfg)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Every setting in its range, or a ValueError naming the flag, the rule and the value."""
    choices = {"model": MODELS, "optimizer": ("adamw", "sgd", "muon"),
               "decay": ("cosine", "linear"), "clock": ("wall", "train"),
               "wandb": ("offline", "online", "off"), "device": ("auto", "cpu", "cuda"),
               "amp": ("auto", "bf16", "fp16", "off")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag(name)} must be one of {allowed}, got {getattr(cfg, name)!r}")
    at_least_1 = ("epochs", "batch_size", "eval_every", "eval_batch_size", "log_every",
                  "patch_size", "embed_dim", "depth", "num_heads")
    rules: list[tuple[str, Callable[[Any], bool], str]] = [
        *((n, lambda v: v is None or v >= 1, "at least 1") for n in at_least_1),
        *((n, lambda v: v >= 0, "0 or more") for n in (
            "warmup_epochs", "weight_decay", "clip_grad", "crop_pad", "randaug_n", "mixup",
            "cutmix", "val_split", "eval_subset", "full_token_epochs", "threads", "stop_at_epoch",
            "min_lr", "muon_lr", "eval_train")),
        ("muon_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("img_size", lambda v: v >= 0, "0 (the model's) or a size in pixels"),
        ("lr", lambda v: v > 0, "positive"),
        ("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
        ("mlp_ratio", lambda v: v is None or v > 0, "positive"),
        ("time_budget", lambda v: v >= 0, "0 (off) or a positive number of minutes"),
        ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("ema", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
        ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
        *((n, lambda v: 0 <= v <= 1, "in [0, 1]") for n in ("mix_prob", "erase_prob")),
        ("randaug_m", lambda v: 0 <= v <= 30, "in [0, 30]"),
        ("train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
        *((n, lambda v: 0 <= v < 1, "in [0, 1) (0: off)") for n in ("warmup_frac",
                                                                     "full_token_frac",
                                                                     "mix_off_frac")),
    ]
    for name, ok, rule in rules:
        value = getattr(cfg, name)
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (isinstance(value, (int, float, type(None))) and finite and ok(value)):
            raise ValueError(f"{flag(name)} must be {rule}, got {value}")
    if cfg.run_name and (cfg.run_name in (".", "..") or "/" in cfg.run_name
                         or "\\" in cfg.run_name):
        raise ValueError(f"--run-name must be a folder name inside --out-dir (no '/', not '.' or "
                         f"'..'), got {cfg.run_name!r}")
    if cfg.mix_off_frac and not (cfg.mixup or cfg.cutmix):
        raise ValueError(f"--mix-off-frac {cfg.mix_off_frac} would do nothing: no --mixup or "
                         f"--cutmix to stop")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr must not exceed --lr (the decay goes from --lr down to "
                         f"--min-lr), got {cfg.min_lr} > {cfg.lr}")
    if cfg.model == CNN:
        default = TrainConfig()
        used = [n for n in VIT_ONLY if getattr(cfg, n) != getattr(default, n)]
        used += ["optimizer"] if cfg.optimizer == "muon" else []
        if used:
            raise ValueError(f"--model {CNN}: {', '.join(map(flag, used))} apply to ViT models "
                             f"only (Muon: to the blocks' matrices); use the defaults")
        return
    if cfg.init:  # the architecture is the source's, checked when its weights are read
        fixed = [flag(n) for n in ("embed_dim", "depth", "mlp_ratio")
                 if getattr(cfg, n) is not None]
        if fixed:
            raise ValueError(f"--init {cfg.init}: {', '.join(fixed)} cannot be changed, the "
                             f"architecture is the pre-trained model's")
        if cfg.mimetic_init:
            raise ValueError(f"--init {cfg.init}: --mimetic-init would do nothing, the "
                             f"pre-trained weights replace the initialisation")
        return
    mcfg = model_config_of(cfg, num_classes=10)  # the model settings fit together (D % heads)
    stages = resolution_stages(cfg.res_schedule)
    sizes, untils = [s for s, _ in stages], [u for _, u in stages]
    if stages and not (all(s % mcfg.patch_size == 0 and 0 < s < mcfg.img_size for s in sizes)
                       and untils == sorted(untils) and 0 < untils[0] and untils[-1] <= 1):
        raise ValueError(f"--res-schedule {cfg.res_schedule!r}: sizes must be multiples of the "
                         f"patch size {mcfg.patch_size} below {mcfg.img_size}, and UNTIL "
                         f"fractions increasing in (0, 1]")


def resolution_stages(text: str) -> list[tuple[int, float]]:
    """'16:0.3,24:0.6' -> [(16, 0.3), (24, 0.6)]."""
    try:
        return [(int(size), float(until))
                for size, until in (part.split(":") for part in text.split(",") if part)]
    except ValueError as e:
        raise ValueError(f"--res-schedule must look like '16:0.3,24:0.6' (SIZE:UNTIL,...), got "
                         f"{text!r}") from e


# --------------------------------------------------------------------------------------------
# The command line, a config against a checkpoint, and back to a command
# --------------------------------------------------------------------------------------------

def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting point for every setting "
                   "below")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pt (or run "
                   "folder)")
    p.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint: accuracy, "
                   "per-class accuracy and a confusion-matrix PNG")
    p.add_argument("--export", metavar="PATH", help="with --eval-only: also write the weights for "
                   "inference in half precision to PATH and a card PATH.json (sha256, config, test "
                   "accuracy, predictions on the bundled sample images)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or "
                   "set VIT_DEBUG=1)")
    for f in FIELDS.values():
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag(f.name), type=f.metadata.get("type", type(f.default)),
                           default=argparse.SUPPRESS, help=help_text)
    return p


def config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None = None
                     ) -> TrainConfig:
    """defaults < preset < flags; with a checkpoint's saved config, it replaces the defaults and
    the preset (and a --stop-at-epoch applies to one run only). Validated in every mode."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    if saved is None:
        return preset(args.preset, **given)
    if args.preset:
        raise ValueError("--preset cannot be combined with --resume or --eval-only: the run keeps "
                         "its own settings")
    moved = [flag(k) for k in ("out_dir", "run_name") if k in given]
    if moved:
        raise ValueError(f"{' and '.join(moved)} cannot be given with --resume or --eval-only: "
                         f"a run continues in its own folder, and --eval-only writes beside the "
                         f"checkpoint")
    kept = {k: v for k, v in saved.items() if k in FIELDS}
    cfg = TrainConfig(**{**kept, "stop_at_epoch": 0, **given})
    validate(cfg)
    return cfg


def check_same_model(cfg: TrainConfig, saved_model_config: dict[str, Any]) -> None:
    """A resumed run must build the model its checkpoint holds (for a fine-tuning run: the same
    resolution and regularisation on the saved architecture)."""
    source = saved_model_config if cfg.init else None
    mcfg = model_config_of(cfg, saved_model_config["num_classes"], source)
    new = mcfg.to_dict()
    # a setting newer than the checkpoint (mimetic_init, say) was its default there
    saved = {**{f.name: f.default for f in dataclasses.fields(mcfg)}, **saved_model_config}
    changed = {k: (v, new.get(k)) for k, v in saved.items() if new.get(k) != v}
    if changed:
        raise ValueError(f"the checkpoint was trained with another model config; differences "
                         f"(checkpoint, flags): {changed}")


def parse_settings(items: list[str]) -> dict[str, Any]:
    """['batch_size=256', 'flip=false', ...] -> {field: value typed as TrainConfig's field}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or name not in FIELDS:
            raise ValueError(f"--set expects FIELD=VALUE with a field of TrainConfig "
                             f"({', '.join(FIELDS)}), got {item!r}")
        kind = FIELDS[name].metadata.get("type", type(FIELDS[name].default))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {name}: expected true or false, got {value!r}")
            out[name] = value.lower() in ("true", "1")
        else:
            try:
                out[name] = kind(value)
            except ValueError as e:
                raise ValueError(f"--set {name}: expected a {kind.__name__}, got {value!r}") from e
    return out


def _flag_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {value}"


def config_command(config: dict[str, Any] | TrainConfig) -> str:
    """The shortest `python train_cifar10.py ...` that reproduces a training config (a preset plus
    the flags that differ from it); where the data and outputs go is left out."""
    if isinstance(config, TrainConfig):
        config = dataclasses.asdict(config)
    best = None
    for name in (None, *PRESETS):
        base = dataclasses.asdict(TrainConfig(**(PRESETS[name] if name else {})))
        flags = [_flag_text(k, v) for k, v in config.items()
                 if k in FIELDS and k not in PLACE and v != base[k]]
        cmd = " ".join(["python train_cifar10.py", *([f"--preset {name}"] if name else []), *flags])
        best = cmd if best is None or len(cmd) < len(best) else best
    return best
