"""The model card (``README.md``) of a ``--format hf`` export, generated from the checkpoint.

It says what the backbone is; how it was pretrained (objective and settings, data, steps, images seen,
the recipe command that repeats the run); every evaluation result given with ``--eval-json`` (the
records that the eval commands write with ``--json``, this checkpoint's only), each with the command
that reproduces it; and how to load it in transformers and timm. The YAML front matter is the Hub's
(``huggingface_hub.ModelCardData``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass

from .backbone import Backbone, _timm_kwargs
from .config import flag_args, recipe_argv
from .data import eval_crop_fraction, hub_name
from .errors import UserError
from .names import short_name
from .train.run_folder import CONFIG_FILE, with_added_settings


class CardError(UserError):
    """An --eval-json file that cannot go into the model card; the message says why."""


# ----- evaluation records -----
@dataclass(frozen=True)
class EvalKind:
    """The records of one eval command: how to tell them apart, what the table shows, the flags that repeat them."""

    title: str
    module: str
    key: str  # a field only this command's records have...
    values: tuple = ()  # ...with one of these values (empty: any)
    shown: tuple = ()  # settings shown in the table
    flags: tuple = ()  # fields given back as the flag of the same name
    renamed: tuple = ()  # (field, flag) pairs where the names differ
    switches: tuple = ()  # store_true flags: given when true, left out when false

    def matches(self, record: dict) -> bool:
        return self.key in record and (not self.values or record[self.key] in self.values)


FINETUNE_FLAGS = ("protocol", "steps", "batch_size", "img_size", "optimizer", "lr", "lr_ref_batch", "min_lr",
                  "warmup_steps", "weight_decay", "layer_decay", "clip_grad", "drop_path_rate", "global_pool",
                  "fc_norm", "head_init_std", "label_smoothing", "mixup", "cutmix", "randaugment", "random_erasing",
                  "crop_scale")
EVAL_KINDS = (
    EvalKind("few-shot linear", "eval.fewshot", "shots", shown=("shots", "l2"),
             flags=("shots", "seeds", "l2", "crop_fraction")),
    EvalKind("kNN", "eval.knn", "k", shown=("k", "temperature"), flags=("k", "temperature", "crop_fraction")),
    EvalKind("linear probe", "eval.linear", "protocol", ("cached", "dino"), shown=("protocol", "epochs", "lr", "bn"),
             flags=("protocol", "epochs", "lr", "bn", "momentum", "weight_decay", "seed", "crop_fraction",
                    "n_last_blocks", "avgpool_patchtokens"),
             renamed=(("batch_size", "probe_batch_size"),), switches=("bn",)),
    EvalKind("fine-tuning", "eval.finetune", "protocol", ("paper", "mae"),
             shown=("protocol", "steps", "lr", "img_size"), flags=FINETUNE_FLAGS),
)
UNRECORDED_FLAGS = "--max-train, --max-test, --image-column, --label-column, --val-size, --device"


def _read_records(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            records = json.load(fh)
    except OSError as err:
        raise CardError(f"--eval-json {path}: cannot read it ({err.strerror})") from err
    except ValueError as err:
        raise CardError(f"--eval-json {path} is not valid JSON: {err}") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"checkpoint", "data"} <= set(r)
                                                for r in records):
        raise CardError(f"--eval-json {path} is not a list of evaluation records (each with checkpoint and data): "
                        "pass a file that an eval command wrote with --json")
    return records


def same_checkpoint(spec: str, ckpt_path: str) -> bool:
    """Whether a record's ``checkpoint`` names the file ``ckpt_path`` (both resolved from the current folder)."""
    return os.path.realpath(os.path.expanduser(str(spec))) == os.path.realpath(ckpt_path)


def eval_records(paths, ckpt_path: str) -> list[dict]:
    """The records of ``ckpt_path`` in the --eval-json files; a file that holds none of them is refused."""
    kept = []
    for path in paths:
        records = _read_records(path)
        mine = [r for r in records if same_checkpoint(r["checkpoint"], ckpt_path)]
        if not mine:
            others = ", ".join(sorted({str(r["checkpoint"]) for r in records})[:3]) or "no records at all"
            raise CardError(f"--eval-json {path} holds no records of {ckpt_path} (it has {others}); checkpoint paths "
                            "are resolved from the current folder: export from the folder the evaluation ran in")
        kept += mine
    return kept


def eval_command(record: dict, kind: EvalKind) -> str:
    """The eval command that reproduces ``record``, from the settings it holds (CKPT: the checkpoint)."""
    argv = ["python", "-m", kind.module, "CKPT", "--data", str(record["data"])]
    for field, flag in [(f, f) for f in kind.flags] + list(kind.renamed):
        value = record.get(field)
        if value is None or (field in kind.switches and not value):
            continue
        if field == "l2" and isinstance(value, list):  # --l2 sweep records the penalty each seed chose
            value = "sweep"
        argv += flag_args(flag, value)
    return shlex.join(argv)


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(rows) -> str:
    """A two-column Markdown table without a header: (name, value) rows."""
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)


def _accuracy(record: dict) -> str:
    if not isinstance(record.get("accuracy"), (int, float)):
        return "—"
    spread = f" ± {100 * record['accuracy_std']:.2f}" if isinstance(record.get("accuracy_std"), (int, float)) else ""
    return f"{100 * record['accuracy']:.2f}{spread}"


def eval_row(record: dict) -> str:
    kind = next((k for k in EVAL_KINDS if k.matches(record)), None)
    if kind is None:
        cells = ["an unknown evaluation", record["data"], "", _accuracy(record), "(not derivable)"]
    else:
        shown = ", ".join(f"{f} {record[f]}" for f in kind.shown if f in record)
        cells = [kind.title, record["data"], shown, _accuracy(record), f"`{eval_command(record, kind)}`"]
    return "| " + " | ".join(map(_cell, cells)) + " |"


def evaluation_section(records: list[dict]) -> str:
    if not records:
        return "## Evaluation\n\nNo evaluation results were given to this export (`--eval-json`)."
    rows = "\n".join(map(eval_row, records))
    header = "| evaluation | data | settings | accuracy (%) | command |\n|---|---|---|---|---|"
    return (f"## Evaluation\n\n{header}\n{rows}\n\n`CKPT` is the ssl_vit checkpoint this model was exported from. "
            "Each command is derived from the fields its record holds; flags that records do not keep "
            f"({UNRECORDED_FLAGS}) take their defaults.")


# ----- pretraining -----
def pretraining_config(ckpt: dict, ckpt_path: str) -> tuple[dict, str]:
    """(the settings the checkpoint was trained with, as a run's config.json holds them; where they come
    from). The run folder's config.json when it is this run's (its training settings equal the
    checkpoint's), else the checkpoint's own, whose backbone settings are the saved backbone's (a DINO
    teacher's: no drop-path)."""
    saved = json.loads(json.dumps({"objective": ckpt["objective"], "train": ckpt["train_config"],
                                   "backbone": ckpt["arch"], "objective_config": ckpt["objective_config"]}))
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), CONFIG_FILE)
    try:
        with open(path) as fh:
            folder = json.load(fh)
    except (OSError, ValueError):  # no run folder around the checkpoint (or not a readable one)
        folder = {}
    if folder.get("objective") == saved["objective"] and folder.get("train") == saved["train"]:
        return with_added_settings(folder), f"the run folder's {CONFIG_FILE}"
    return with_added_settings(saved), "the checkpoint, whose backbone settings are the saved backbone's"


def objective_title(objective: str) -> str:
    """The first line of the objective's module docstring, e.g. "DINO: self-distillation with no labels (...)"."""
    from .objectives import get_objective

    return (sys.modules[get_objective(objective).__module__].__doc__ or objective).strip().splitlines()[0]


def data_description(data: dict) -> str:
    name = data.get("name", "unknown")
    what = "the embedded digits (scikit-learn's 8x8 handwritten digits)" if name == "default" else f"`{name}`"
    classes = f", {data['num_classes']} classes" if data.get("num_classes") else ""
    return f"{what}{classes}"


def pretraining_section(ckpt: dict, ckpt_path: str) -> str:
    config, source = pretraining_config(ckpt, ckpt_path)
    objective, train, step = config["objective"], config["train"], ckpt["step"]
    argv, rest = recipe_argv(config)
    command = shlex.join(["accelerate", "launch", f"recipes/{objective}.py", *argv])
    no_flag = f"\n\nThese settings have no flag; give them in a `--config` file: `{json.dumps(rest)}`" if rest else ""
    table = _table([
        ("objective", f"`{objective}`: {objective_title(objective)}"),
        ("objective settings", ", ".join(f"{k}={v}" for k, v in config["objective_config"].items()) or "—"),
        ("data", data_description(ckpt.get("data") or {})),
        ("steps", f"{step} (of a {train['steps']}-step schedule)"),
        ("batch size", train["batch_size"]),
        ("images seen", f"{step * train['batch_size']:,} (steps x batch size)"),
    ])
    return (f"## Pretraining\n\n{table}\n\nTo repeat the run (settings from {source}; a flag for each that "
            f"differs from the recipe's defaults):\n\n```bash\n{command}\n```{no_flag}")


# ----- the backbone and how to load it -----
def model_section(backbone: Backbone, weights: str, objective: str) -> str:
    from .hf_export import POOLED

    cfg, vit = backbone.cfg, backbone.vit
    block, p, size = vit.blocks[0], backbone.pixel_patch_size, cfg.img_size
    params = sum(t.numel() for t in vit.parameters()) / 1e6
    geometry = (f"ViT (`--model {cfg.model}`): {len(vit.blocks)} layers, width {backbone.embed_dim}, "
                f"{block.attn.num_heads} heads, MLP {block.mlp.fc1.out_features}, {p}x{p} patches, {size}x{size} "
                f"images, {cfg.in_chans} channels, {params:.1f}M parameters")
    pool = "the class token" if cfg.global_pool == "token" else "the mean of the normalised patch tokens"
    position = "learned" if cfg.pos_embed == "learned" else "fixed 2-D sin-cos (stored as ViTModel's learned table)"
    source = {"teacher": "the DINO teacher (the backbone DINO evaluates)", "student": "the DINO student"}
    return "## Model\n\n" + _table([
        ("architecture", geometry),
        ("representation", f"{pool} (`--global-pool {cfg.global_pool}`): `{POOLED[cfg.global_pool]}`, "
                           f"[B, {backbone.embed_dim}]; config.json: `ssl_vit.representation`"),
        ("position embeddings", position),
        ("weights", source.get(weights, f"the {objective} backbone")),
    ])


def loading_section(backbone: Backbone, repo: str, ckpt_path: str, student: bool) -> str:
    from .hf_export import POOLED

    cfg = backbone.cfg
    name, kwargs = _timm_kwargs(cfg)
    export = shlex.join(["python", "-m", "ssl_vit.export", os.path.basename(ckpt_path), "backbone.safetensors",
                         *(["--student"] if student else [])])
    short_side = int(cfg.img_size / eval_crop_fraction(cfg.img_size))  # as timm's evaluation transform
    return f'''## How to load

### transformers

```python
import torch
from PIL import Image
from transformers import ViTImageProcessor, ViTModel

processor = ViTImageProcessor.from_pretrained("{repo}")
model = ViTModel.from_pretrained("{repo}", add_pooling_layer=False).eval()
inputs = processor(images=Image.open("image.png").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    last_hidden_state = model(**inputs).last_hidden_state  # [B, 1 + N, D], every token normalised
features = {POOLED[cfg.global_pool]}  # [B, D]: ssl_vit's backbone(images)
```

`add_pooling_layer=False`: this backbone has no pooler; without it transformers adds one with random
weights (and warns), and `pooler_output` means nothing. The image processor resizes the whole image to
{cfg.img_size}x{cfg.img_size} (bicubic) and normalises it as in pretraining; ssl_vit's evaluations resize the
short side to {short_side} px and centre-crop, so non-square images are cropped there rather than squeezed.
Other input sizes: pass `interpolate_pos_encoding=True` (transformers' bicubic resampling of the position
embeddings; ssl_vit resamples them with timm's, so such outputs differ slightly).

### timm

The same backbone for timm is ssl_vit's other export of the checkpoint:

```bash
{export}
```

```python
import timm

kwargs = {kwargs!r}
model = timm.create_model("{name}", pretrained=True, pretrained_cfg_overlay=dict(file="backbone.safetensors"),
                          **kwargs).eval()
features = model(images)  # [B, D]: the same representation
```'''


def build(ckpt: dict, ckpt_path: str, backbone: Backbone, records: list[dict], weights: str, repo: str):
    """The model card of an export of ``ckpt`` (a ``huggingface_hub.ModelCard``)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ckpt.get("data") or {}
    hub = hub_name(str(data.get("name", "default")))
    meta = ModelCardData(library_name="transformers", pipeline_tag="image-feature-extraction",
                         tags=["ssl_vit", "vision-transformer", ckpt["objective"]], datasets=[hub] if hub else None)
    title = (f"# {short_name(ckpt_path)}\n\nA Vision Transformer backbone pretrained with `{ckpt['objective']}` by "
             f"ssl_vit, exported from `{os.path.basename(ckpt_path)}` at step {ckpt['step']} for Hugging Face "
             "transformers (`python -m ssl_vit.export CKPT OUT_DIR --format hf`).")
    sections = [title, model_section(backbone, weights, ckpt["objective"]), pretraining_section(ckpt, ckpt_path),
                evaluation_section(records), loading_section(backbone, repo, ckpt_path, weights == "student")]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
