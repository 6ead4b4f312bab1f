"""Where a causal LM's weights come from during a layer-by-layer job.

`ModelSource` reads a model folder (or a hub id, online): config and tokenizer at once, and an index of
its safetensors tensors. `StreamedWeights` builds the model as a skeleton whose parameters live on the
meta device and fills one module at a time from the shards, emptying it again after use, so memory holds
about one decoder layer. Checkpoints without safetensors (`pytorch_model*.bin`) cannot be read tensor by
tensor: `LoadedWeights` loads them whole, with the same protocol, so the same loop runs on both.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantool.errors import QuantoolError
from quantool.model.conversion import KeyMap

INDEX = "model.safetensors.index.json"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def is_hub_id(spec: str) -> bool:
    """Whether a model argument that is no local path reads as a hub id (org/name)."""
    return not spec.startswith((".", "/")) and spec.count("/") == 1


def resolve_folder(spec: str) -> Path:
    """A local model folder, or a hub id fetched into the local cache (needs the network once)."""
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").exists():
            raise QuantoolError(f"{spec} has no config.json: pass a Hugging Face model directory")
        return path
    if not is_hub_id(spec):
        raise QuantoolError(f"model {spec} not found: pass a local model directory or a hub id like org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"]))
    except Exception as exc:  # offline, unknown repo, gated model: one line says which
        raise QuantoolError(f"cannot fetch {spec} from the hub ({_first_line(exc)}): pass a local model directory") from None


@contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device while buffers stay real (RoPE's inv_freq is computed at
    construction): the pattern of accelerate's init_empty_weights(include_buffers=False)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    setattr(nn.Module, "register_parameter", register)  # noqa: B010 (a method patched for the block's duration)
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", original)  # noqa: B010


class ModelSource:
    def __init__(self, spec: str):
        from transformers import AutoConfig

        self.spec = spec
        self.folder = resolve_folder(spec)
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError, KeyError) as exc:
            raise QuantoolError(f"cannot read {self.folder}/config.json as a model config: {_first_line(exc)}") from None
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        """tensor name -> safetensors file; empty when the folder has none."""
        from safetensors import safe_open

        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise QuantoolError(f"{index} is not a safetensors index ({_first_line(exc)}): re-download the model") from None
            files = {name: self.folder / f for name, f in weight_map.items()}
            missing = sorted({f.name for f in files.values() if not f.exists()})
            if missing:
                raise QuantoolError(f"{index.name} names {len(missing)} shard(s) missing from {self.folder}: "
                                    f"{', '.join(missing[:3])}; re-download the model")
            return files
        files = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as handle:
                    files.update({name: f for name in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
            except Exception as exc:  # a truncated or foreign file
                raise QuantoolError(f"{f} is not a readable safetensors file ({_first_line(exc)}): re-download it") from None
        return files

    @property
    def streaming(self) -> bool:
        return bool(self.files)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError, KeyError) as exc:
            raise QuantoolError(f"cannot load the tokenizer of {self.folder}: {_first_line(exc)}") from None

    def skeleton(self) -> nn.Module:
        """The model with every parameter on the meta device (no memory, no initialization)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        try:
            with no_init_weights(), _parameters_on_meta():
                return AutoModelForCausalLM.from_config(self.config)
        except ValueError as exc:
            raise QuantoolError(f"{self.folder} is not a causal LM transformers can build: {_first_line(exc)}") from None

    def load_whole(self, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise QuantoolError(f"cannot load {self.folder} as a causal LM: {_first_line(exc)}") from None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors copied out of their shards as stored, on the CPU (each shard opened once and closed after, so its
        pages are not kept mapped); `KeyMap.materialize` casts them, one parameter at a time."""
        from safetensors import safe_open

        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for name in group:
                    out[name] = handle.get_tensor(name).clone()
        return out


def _head_name(model: Any) -> str | None:
    """The output head's module name, or None for a model without one."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _outside(model: Any, layers_prefix: str) -> list[str]:
    """State-dict keys outside the decoder layers, without the output head (no layer-by-layer job reads it)."""
    head, head_keys = model.get_output_embeddings(), set()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        head_keys = {f"{_head_name(model)}.{k}" for k in head.state_dict()}
    return [k for k in model.state_dict() if not k.startswith(layers_prefix + ".") and k not in head_keys]


def _stored_outside(model: nn.Module, layers_prefix: str) -> Callable[[str], bool]:
    """Whether a checkpoint tensor lies outside the decoder layers and is written as is (a tied head's weight
    is the embedding's, so it is not written twice)."""
    name = _head_name(model) if getattr(model.config, "tie_word_embeddings", False) else None
    head_weight = f"{name}.weight" if name else None
    return lambda key: not key.startswith(layers_prefix + ".") and key != head_weight


class StreamedWeights:
    """A skeleton's modules filled from the source's shards on use, and emptied after. Checkpoint tensors become
    parameters through transformers' own key conversion (`conversion.KeyMap`), as from_pretrained would load them."""

    def __init__(self, source: ModelSource, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.source, self.model, self.dtype, self.device = source, model, dtype, device
        self.keymap = KeyMap(model, source.files)

    def load(self, module: nn.Module, prefix: str, keys: list[str] | None = None) -> None:
        expected = module.state_dict()
        keys = list(expected) if keys is None else keys
        present = [k for k in keys if f"{prefix}{k}" in self.keymap]
        absent = [k for k in keys if k not in present and expected[k].is_meta]
        if absent:
            raise QuantoolError(f"{self.source.folder} holds no tensor for {prefix}{absent[0]} (and {len(absent) - 1} more) "
                                f"that config.json implies: the weights and the config do not match")
        stored = self.keymap.materialize([f"{prefix}{k}" for k in present], lambda names: self.source.read(names),
                                         lambda t: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))
        for k in present:
            t = stored[f"{prefix}{k}"]
            if t.shape != expected[k].shape:
                raise QuantoolError(f"tensor {prefix}{k} has shape {tuple(t.shape)} in {self.source.folder}, but config.json "
                                    f"implies {tuple(expected[k].shape)}: the shards do not match the config")
        module.load_state_dict({k: stored[f"{prefix}{k}"] for k in present}, strict=False, assign=True)

    def drop(self, module: nn.Module, keys: list[str] | None = None) -> None:
        state = module.state_dict()
        keys = list(state) if keys is None else keys
        module.load_state_dict({k: torch.empty_like(state[k], device="meta") for k in keys}, strict=False, assign=True)

    def outside_keys(self, layers_prefix: str) -> list[str]:
        return _outside(self.model, layers_prefix)

    def stored_outside(self, layers_prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors outside the decoder layers, one at a time, as stored (names as in the source)."""
        outside = _stored_outside(self.model, layers_prefix)
        targets = {k: t for t in self.keymap.sources for k in self.keymap.keys_of(t)}
        for name in self.source.files:
            if outside(targets.get(name, name)):
                yield name, self.source.read([name])[name]

    def source_name(self, target: str) -> str:
        """The checkpoint key a parameter was read from, where it is one tensor; else its own name."""
        sources = self.keymap.sources.get(target, {})
        keys = sources.get(None, [])
        return keys[0] if len(sources) == 1 and len(keys) == 1 else target

    def expert_sources(self, target: str) -> list[list[str]] | None:
        """A fused parameter's per-expert checkpoint keys per part (e.g. [gate keys, up keys]), or None where the
        source stores it fused too."""
        if target not in self.keymap.converters:
            return None
        return self.keymap.grouped_keys(target)


class LoadedWeights:
    """A whole model already in host memory: loading moves a module to the compute device, dropping moves it back."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device

    def load(self, module: nn.Module, prefix: str, keys: list[str] | None = None) -> None:
        self._move(module, keys, self.device)

    def drop(self, module: nn.Module, keys: list[str] | None = None) -> None:
        self._move(module, keys, torch.device("cpu"))

    @staticmethod
    def _move(module: nn.Module, keys: list[str] | None, device: torch.device):
        if keys is None:
            module.to(device)
            return
        state = module.state_dict()
        module.load_state_dict({k: state[k].to(device) for k in keys}, strict=False, assign=True)

    def outside_keys(self, layers_prefix: str) -> list[str]:
        return _outside(self.model, layers_prefix)

    def stored_outside(self, layers_prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        outside = _stored_outside(self.model, layers_prefix)
        yield from ((name, t) for name, t in self.model.state_dict().items() if outside(name))

    def source_name(self, target: str) -> str:
        return target

    def expert_sources(self, target: str) -> list[list[str]] | None:
        return None


def open_weights(source: ModelSource, dtype: torch.dtype, device: torch.device, log: Callable[[str], None]) -> tuple[nn.Module, Any]:
    """(model, weights): streamed from safetensors where the source has them, else loaded whole."""
    if source.streaming:
        model = source.skeleton()
        return model, StreamedWeights(source, model, dtype, device)
    if not any(source.folder.glob("*.bin")):
        raise QuantoolError(f"{source.folder} holds no weights (*.safetensors or pytorch_model*.bin): copy the model's "
                            f"weight files there")
    log(f"{source.folder} has no safetensors files: loading the whole model into memory (pytorch_model*.bin); "
        f"convert it with save_pretrained(safe_serialization=True) to quantize layer by layer")
    return (model := source.load_whole(dtype)), LoadedWeights(model, device)
