"""The order in which a model's modules and parameters first run, from one forward pass on the meta device.

:func:`trace` finds the ``transformers`` model inside any wrapper (DDP, ``torch.compile``, FSDP, PEFT, a
SentenceTransformer, a loss module), rebuilds it from its config on the meta device (shapes only: no weight
is read, copied or allocated, so this also works under ZeRO-3 partitioning), builds inputs for it from what
the model declares (``main_input_name``, the config's image size, ...) and runs one forward pass, recording:

* when each module is first called and when its last call returns (forward hooks);
* when each parameter is first *used* by an operation (a ``TorchFunctionMode``), which places parameters
  that belong to no submodule, such as ``cls_token``, ``mask_token`` or CLIP's ``logit_scale``.

Meta tensors hold no data. Where the forward asks for a value (``if mask.any():``, ``.item()``), the tracer
answers ``False`` / ``1`` and counts it in :attr:`Trace.assumed`; where an operation cannot run on meta at
all, the trace fails with :class:`TraceError` and the caller falls back to the module tree.

Repeated blocks run the same operations in the same order: after the first call of a list element with a
given class, parameter shapes and input shapes, later ones replay its record instead of running again, so
an 80-block model costs about as much as a 2-block one.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["Trace", "TraceError", "trace", "find_transformers_model"]

logger = logging.getLogger(__name__)

SEQ_LEN = 32  # tokens; meta tensors cost the same at any size
AUDIO_SAMPLES = 16000

# Torch functions that read only metadata: a weight whose `.dtype` is read is not used yet.
_METADATA_ONLY = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_floating_point", "element_size", "data_ptr", "__len__"}
)
# Data-dependent calls meta tensors cannot answer, and the value the tracer assumes for each.
_SCALARS = frozenset({"item", "__bool__", "__int__", "__index__", "__float__", "tolist"})
_NONZERO = frozenset({"nonzero", "argwhere"})
_UNIQUE = frozenset({"unique", "unique_consecutive", "masked_select"})


class TraceError(RuntimeError):
    """No forward pass could be traced; the message says why."""


@dataclass
class Trace:
    """What one forward pass ran, in ticks of one clock (module and parameter names relative to ``root``).

    Attributes:
        root: raw path of the traced ``transformers`` model inside the object passed to :func:`trace`.
        start: module path -> tick of its first call.
        end: module path -> tick at which its last call returned.
        first_end: module path -> tick at which its first call returned (a stack that runs twice, as FLAVA's
            pre-training runs its towers, is placed by its first run).
        calls: module path -> number of calls.
        first_use: parameter name -> tick of the first operation that read it.
        inputs: names of the inputs that were built.
        assumed: how many data-dependent values were assumed (see the module docstring).
        twin: the meta-device model that ran (its module paths are the clean paths of the real one).
    """

    root: str
    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    first_use: dict[str, int] = field(default_factory=dict)
    first_end: dict[str, int] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    assumed: int = 0
    twin: nn.Module | None = None

    def describe(self) -> str:
        """One line for logs and ``llrd inspect``."""
        extra = f", {self.assumed} data-dependent value{'s' * (self.assumed != 1)} assumed" if self.assumed else ""
        return f"traced one forward pass on the meta device (inputs: {', '.join(self.inputs)}{extra})"


def find_transformers_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost ``transformers.PreTrainedModel`` inside ``model`` (``model`` itself if it is one).

    Example:
        >>> find_transformers_model(peft_model)[0]     # doctest: +SKIP
        'base_model.model'
    """
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return path, module
    return None


def trace(model: nn.Module) -> Trace:
    """Trace the transformers model inside ``model`` on a meta-device twin; ``model`` itself never runs.

    Raises:
        TraceError: no transformers model inside, it cannot be rebuilt on meta, or no input could be built
            and run.

    Example:
        >>> t = trace(BertForSequenceClassification(BertConfig(num_hidden_layers=2)))    # doctest: +SKIP
        >>> t.first_use["bert.embeddings.word_embeddings.weight"] < t.first_use["classifier.weight"]
        True
    """
    found = find_transformers_model(model)
    if found is None:
        raise TraceError(f"{type(model).__name__} holds no transformers PreTrainedModel to rebuild from its config")
    root, hf_model = found
    beside = _other_transformers_model(model, root)
    if beside is not None:
        raise TraceError(
            f"{type(model).__name__} holds two transformers models side by side ({root or 'the root'} and "
            f"{beside}); llrd traces one"
        )
    twin = _meta_twin(hf_model)
    errors = []
    for inputs in _input_sets(twin):
        try:
            recorded = _run(twin, inputs)
        except Exception as err:  # noqa: BLE001 - any failure of a foreign forward means "try the next input set"
            errors.append(_failure(inputs, err))
            continue
        recorded.root, recorded.twin = root, twin
        return recorded
    if not errors:
        raise TraceError(
            f"no input could be built for {type(hf_model).__name__} (main_input_name={twin.main_input_name!r})"
        )
    raise TraceError(f"the forward pass of {type(hf_model).__name__} does not run on the meta device ({errors[0]})")


def _other_transformers_model(model: nn.Module, root: str) -> str | None:
    """Path of a transformers model that does not lie inside the one at ``root`` (a dual encoder), if any."""
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not (root == "" or path == root or path.startswith(root + ".")):
            return path
    return None


def _failure(inputs: dict[str, Any], err: Exception) -> str:
    """``input_ids+attention_mask: ValueError: <first line>``."""
    names = "+".join(k for k in inputs if k not in ("use_cache", "return_loss"))
    return f"{names}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def _meta_twin(hf_model: nn.Module) -> nn.Module:
    """A copy of ``hf_model``'s module tree on the meta device, in eval mode, rebuilt from its config.

    Built in bfloat16 (meta kernels of grouped expert matmuls accept nothing else). ``cls(config)`` is called
    directly, not ``from_config``, so that ZeRO-3's ``zero.Init`` does not partition the twin.
    """
    from transformers.modeling_utils import local_torch_dtype

    config = copy.deepcopy(hf_model.config)
    try:
        with torch.device("meta"), local_torch_dtype(torch.bfloat16):
            twin = type(hf_model)(config)
    except Exception as err:  # noqa: BLE001 - a custom __init__ may need more than the config
        raise TraceError(
            f"{type(hf_model).__name__} cannot be rebuilt from its config on the meta device "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if err.args else ''})"
        ) from err
    return twin.eval()


def _configs(config: Any) -> Iterator[Any]:
    """``config`` and its sub-configs (vision, text, encoder, backbone, ...), breadth first."""
    seen: set[int] = set()
    queue = [config]
    while queue:
        cfg = queue.pop(0)
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        yield cfg
        queue += [v for v in vars(cfg).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]


def _config_value(config: Any, key: str) -> Any:
    """``config.key``, else the value in the first sub-config that has it."""
    return next((vars(c)[key] for c in _configs(config) if vars(c).get(key) is not None), None)


def _seq_len(config: Any) -> int:
    """:data:`SEQ_LEN`, or less where a position table of the model (or a sub-model) is shorter."""
    limits = [
        value
        for cfg in _configs(config)
        for key in ("max_position_embeddings", "n_positions", "max_target_positions")
        if isinstance(value := vars(cfg).get(key), int) and value > 0
    ]
    return min([SEQ_LEN, *limits])


def _image_size(config: Any) -> tuple[int, int]:
    size = _config_value(config, "image_size") or 224
    if isinstance(size, dict):
        return int(size.get("height", 224)), int(size.get("width", 224))
    if isinstance(size, (list, tuple)):
        return (int(size[-2]), int(size[-1])) if len(size) >= 2 else (int(size[0]), int(size[0]))
    return int(size), int(size)


def _builders(config: Any, dtype: torch.dtype) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Input name -> a function building the layouts to try for it, most common first (shapes from the config)."""

    channels = int(_config_value(config, "num_channels") or 3)
    frames = _config_value(config, "num_frames") or _config_value(config, "frames_per_clip")

    def video() -> list[torch.Tensor]:  # (batch, frames, channels, height, width)
        return [torch.zeros(1, int(frames or 16), channels, *_image_size(config), dtype=dtype)]

    def pixels() -> list[torch.Tensor]:
        image = torch.zeros(1, channels, *_image_size(config), dtype=dtype)
        return [*video(), image] if isinstance(frames, int) and frames > 0 else [image]

    def features() -> list[torch.Tensor]:
        mels, positions = _config_value(config, "num_mel_bins"), _config_value(config, "max_source_positions")
        if mels and positions:  # Whisper-style (batch, mel bins, 2 * positions)
            return [torch.zeros(1, int(mels), 2 * int(positions), dtype=dtype)]
        per_channel = _config_value(config, "input_feat_per_channel")
        size = (per_channel or 0) * (_config_value(config, "input_channels") or 1) or _config_value(
            config, "feature_size"
        )
        size = int(size or mels or 80)
        return [torch.zeros(1, 4 * SEQ_LEN, size, dtype=dtype), torch.zeros(1, size, 4 * SEQ_LEN, dtype=dtype)]

    def audio() -> list[torch.Tensor]:
        channels = int(_config_value(config, "audio_channels") or 1)
        return [torch.zeros(1, AUDIO_SAMPLES, dtype=dtype), torch.zeros(1, channels, AUDIO_SAMPLES, dtype=dtype)]

    def tokens() -> list[torch.Tensor]:
        return [torch.zeros(1, _seq_len(config), dtype=torch.long)]

    return {
        "input_ids": tokens,
        "pixel_values": pixels,
        "pixel_values_videos": video,
        "input_values": audio,
        "input_features": features,
    }


def _input_sets(twin: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inputs to try, richest first: every modality the forward takes, then the main input alone in each of
    its layouts."""
    params = inspect.signature(twin.forward).parameters
    with torch.device("meta"):
        built = {name: make() for name, make in _builders(twin.config, next(twin.parameters()).dtype).items()}
    main = twin.main_input_name if isinstance(twin.main_input_name, str) else twin.main_input_name[0]
    modalities = [name for name in built if name in params]
    tries: list[dict[str, torch.Tensor]] = []
    if main in modalities:
        tries.append({main: built[main][0], **{m: built[m][0] for m in modalities}})
        tries += [{main: layout} for layout in built[main]]
    elif modalities:
        tries.append({m: built[m][0] for m in modalities})
        tries += [{m: layout} for m in modalities for layout in built[m]] if len(modalities) > 1 else []
    seen: list[list[tuple[str, tuple[int, ...]]]] = []
    for inputs in tries:
        key = [(k, tuple(v.shape)) for k, v in inputs.items()]
        if key in seen:
            continue
        seen.append(key)
        with torch.device("meta"):
            if "input_ids" in inputs and "attention_mask" in params:
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if "decoder_input_ids" in params and getattr(twin.config, "is_encoder_decoder", False):
                inputs["decoder_input_ids"] = torch.zeros(1, _seq_len(twin.config), dtype=torch.long)
        if "use_cache" in params:
            inputs["use_cache"] = False
        if "return_loss" in params:  # FLAVA/CLIP-style: a loss needs labels the tracer does not build
            inputs["return_loss"] = False
        yield inputs


def _run(twin: nn.Module, inputs: dict[str, Any]) -> Trace:
    names = {id(p): n for n, p in twin.named_parameters()}
    tracer = _Tracer(names)
    handles = []
    for path, module in twin.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(tracer.on_start, path)))
        handles.append(module.register_forward_hook(functools.partial(tracer.on_end, path)))
    replayed = [(path, module, module.__dict__.get("forward")) for path, module in _list_elements(twin)]
    for path, module, _ in replayed:
        module.forward = functools.wraps(module.forward)(functools.partial(tracer.memo, path, module, module.forward))
    try:
        with torch.no_grad(), torch.device("meta"), tracer:
            twin(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        for _, module, own in replayed:  # back to the forward it had
            del module.forward
            if own is not None:
                module.forward = own
    built = tuple(k for k in inputs if k not in ("use_cache", "attention_mask", "return_loss"))
    return Trace("", tracer.start, tracer.end, tracer.calls, tracer.first_use, tracer.first_end, built, tracer.assumed)


def _list_elements(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Elements of every ``ModuleList`` / ``Sequential`` that are not plain torch layers."""
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for key, child in module.named_children():
                if not type(child).__module__.startswith("torch.nn"):
                    yield (f"{path}.{key}" if path else key), child


def _signature(value: Any) -> Any:
    """What decides the shapes a block produces: tensor shapes and dtypes, plain values, container layout."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, _signature(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


class _Tracer(TorchFunctionMode):
    """Records module calls and first parameter uses on one clock; answers data-dependent questions."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.tick = 0
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.first_use: dict[str, int] = {}
        self.first_end: dict[str, int] = {}
        self.assumed = 0
        self.tapes: list[list[tuple[str, str]]] = []
        self.memos: dict[Any, tuple[str, list[tuple[str, str]], Any]] = {}
        self.shapes: dict[int, tuple] = {}  # id(list element) -> its parameters' names, shapes and dtypes

    def event(self, kind: str, name: str) -> None:
        for tape in self.tapes:
            tape.append((kind, name))
        self.tick += 1
        if kind == "use":
            self.first_use.setdefault(name, self.tick)
        elif kind == "start":
            self.start.setdefault(name, self.tick)
            self.calls[name] = self.calls.get(name, 0) + 1
        else:
            self.end[name] = self.tick
            self.first_end.setdefault(name, self.tick)

    def on_start(self, path: str, module: nn.Module, args: Any) -> None:
        self.event("start", path)

    def on_end(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        self.event("end", path)

    def memo(self, path: str, module: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run the first block of a kind; replay its record (and return its output) for the next ones."""
        if id(module) not in self.shapes:
            self.shapes[id(module)] = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
        key = (type(module), self.shapes[id(module)], _signature(args), _signature(kwargs))
        try:
            hit = self.memos.get(key)
        except TypeError:  # an unhashable plain value: no replay
            return forward(*args, **kwargs)
        if hit is not None:
            ref, tape, output = hit
            for kind, name in tape:
                self.event(kind, path + name[len(ref) :] if name.startswith(ref + ".") else name)
            return output
        tape: list[tuple[str, str]] = []
        self.tapes.append(tape)
        try:
            output = forward(*args, **kwargs)
        finally:
            self.tapes.remove(tape)
        self.memos[key] = (path, tape, output)
        return output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _METADATA_ONLY:
            # an in-place update of a weight (RWKV rescales its blocks in forward) is not a use of it
            inplace = name.endswith("_") and not name.endswith("__")
            for arg in (*args[inplace:], *kwargs.values()):
                for item in arg if isinstance(arg, (list, tuple)) else (arg,):
                    if isinstance(item, nn.Parameter) and id(item) in self.names:
                        self.event("use", self.names[id(item)])
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError):
            if not (args and isinstance(args[0], torch.Tensor) and args[0].is_meta):
                raise
            if name in _SCALARS:
                self.assumed += 1
                return _assumed_value(args[0], name)
            assumed = _assumed_result(name, args, kwargs)
            if assumed is None:
                raise
            self.assumed += 1
            return assumed


def _assumed_result(name: str, args: tuple, kwargs: dict) -> Any:
    """A stand-in for an operation whose output shape depends on data: every element selected, all equal."""
    x = args[0]
    if name in _NONZERO or (name == "where" and len(args) == 1):
        everywhere = torch.zeros(x.numel(), x.dim(), dtype=torch.long, device="meta")
        return everywhere.unbind(1) if name == "where" or kwargs.get("as_tuple") else everywhere
    if name in _UNIQUE and len(args) <= 2 and not any(kwargs.get(k) for k in ("return_inverse", "return_counts")):
        return x.flatten()[:1] if name != "masked_select" else x.flatten()
    if name == "__getitem__" and len(args) == 2:  # x[mask] or x[mask, :] with a boolean mask: all selected
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        mask, rest = index[0], index[1:]
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and all(r == slice(None) for r in rest):
            return x.reshape(-1, *x.shape[mask.dim() :])
    return None


def _assumed_value(tensor: torch.Tensor, name: str) -> Any:
    """``False`` for a condition (checks and warnings stay quiet), ``1`` for a count or index."""
    value: Any = False if tensor.dtype == torch.bool else 1
    if name == "__float__" or (name == "item" and tensor.is_floating_point()):
        value = 1.0
    if name == "tolist":
        value = torch.ones(tensor.shape, dtype=torch.long, device="cpu").tolist() if tensor.dim() else value
    return value
