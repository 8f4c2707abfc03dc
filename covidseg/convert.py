"""Convert a model file written by covidseg 0.1 (a ``.ckpt`` or a ``.safetensors`` + ``.yaml``
whose stored run config names classes by Hydra ``_target_``) into today's format, whose model spec
is plain data. A one-off for files you trust; nothing in the old file is instantiated or run.

python -m covidseg.convert OLD.ckpt NEW.ckpt
python -m covidseg.convert OLD.safetensors NEW.safetensors

Only the network's ``_target_`` is read, and only when it names one of covidseg's registered
networks; the training-only sections (loss, optimizer, scheduler) are dropped from the spec.
A ``.ckpt`` keeps its optimizer and loop state, so training can resume from the converted file.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from covidseg.core.errors import ModelFileError, say_error
from covidseg.core.files import open_regular_file, printable, read_plain_yaml
from covidseg.core.writing import write_atomic
from covidseg.inference.loader import MAX_MODEL_BYTES, MAX_SPEC_BYTES
from covidseg.inference.model_spec import LEGACY_CONFIG_KEY, SPEC_KEY, spec_from_run_config
from covidseg.models.registry import NETWORKS

LEGACY_NETWORKS = {f"covidseg.models.{entry.cls.__name__}": name for name, entry in NETWORKS.items()}
LEGACY_INFERENCE = ("threshold", "presence_threshold", "flip_tta", "restrict_to_lungs")


def spec_from_legacy(config: Any, source: str) -> dict[str, Any]:
    """The model spec (plain data) of a covidseg 0.1 run config; refuses unknown networks."""
    try:
        target = config["model"]["net"].get("_target_")
        name = LEGACY_NETWORKS.get(target)
        if name is None:
            raise ModelFileError(
                f"{source}: key 'model.net._target_' = {target!r} is not one of covidseg's networks "
                f"({', '.join(LEGACY_NETWORKS)})"
            )
        spec = spec_from_run_config(
            name, config["model"], config["data"], source, LEGACY_INFERENCE, config.get("metrics")
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(f"{source}: not a covidseg 0.1 run config (missing or malformed {error})") from None
    return spec.to_plain()


def convert_checkpoint(source: Path, target: Path) -> None:
    try:
        with open_regular_file(source, MAX_MODEL_BYTES, "a covidseg 0.1 checkpoint", ModelFileError) as file:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's own message advises unpickling anyway: not for an untrusted file
        if "Unsupported global" not in str(error):  # not a pickle of classes: not a checkpoint at all
            raise ModelFileError(f"{str(source)!r} is not a checkpoint (a PyTorch file of tensors)") from None
        raise ModelFileError(
            f"{str(source)!r} holds objects other than tensors and plain values (a pickle that could run code): "
            "covidseg does not load it"
        ) from None
    if not isinstance(checkpoint, dict) or LEGACY_CONFIG_KEY not in checkpoint:
        raise ModelFileError(f"{str(source)!r} has no {LEGACY_CONFIG_KEY!r}: not a covidseg 0.1 checkpoint")
    checkpoint[SPEC_KEY] = spec_from_legacy(checkpoint.pop(LEGACY_CONFIG_KEY), str(source))
    checkpoint["state_dict"] = {  # the module's net and presence head now live in its network
        (f"network.{name}" if name.startswith(("net.", "presence_head.")) else name): tensor
        for name, tensor in checkpoint["state_dict"].items()
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(target, buffer.getvalue())


def convert_safetensors(source: Path, target: Path) -> None:
    config = read_plain_yaml(source.with_suffix(".yaml"), MAX_SPEC_BYTES, "a covidseg 0.1 run config", ModelFileError)
    spec = spec_from_legacy(config, str(source.with_suffix(".yaml")))
    state = {f"networks.0.{name}": tensor for name, tensor in load_file(source).items()}
    write_atomic(target, save_safetensors(state))
    write_atomic(target.with_suffix(".yaml"), yaml.safe_dump(spec, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.source.suffix != args.target.suffix or args.source.suffix not in (".ckpt", ".safetensors"):
        say_error("give OLD.ckpt NEW.ckpt or OLD.safetensors NEW.safetensors")
        sys.exit(2)
    targets = [args.target, *([args.target.with_suffix(".yaml")] if args.target.suffix == ".safetensors" else [])]
    if any(target.exists() or target.is_symlink() for target in targets):  # a dangling link is a name taken too
        say_error(f"{printable(args.target)!r} exists: choose a new name")
        sys.exit(2)
    try:
        (convert_checkpoint if args.source.suffix == ".ckpt" else convert_safetensors)(args.source, args.target)
    except ModelFileError as error:  # names the file already
        say_error(str(error))
        sys.exit(2)
    except Exception as error:  # the old file is untrusted too: any failure to read it is one line naming it
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        say_error(f"{printable(args.source)!r} could not be converted: {reason}")
        sys.exit(2)
    Console().print(f"converted {printable(args.source)} -> {printable(args.target)}", markup=False, highlight=False)


if __name__ == "__main__":
    main()
