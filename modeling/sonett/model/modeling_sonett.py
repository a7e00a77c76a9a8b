"""Sonett: a hybrid decoder whose layers are chosen one by one by `config.layer_types`.

Each decoder layer is pre-norm: `h += mixer(norm(h)); h += mlp(norm(h))`. The mixer class of a layer comes
from `MIXER_CLASSES[kind]`, its cache layer from `cache_sonett.CACHE_LAYER_CLASSES[kind]`, and its mask from
the mixer's `build_mask(kind, allow_blocked=..., **mask_kwargs)`, built once per (kind, cache window) for the
whole stack. The mask is opaque to the model: each mixer reads its own. With a hierarchy
(`config.hierarchy_settings`), the layers of one span run on the sequence shortened k times (`SonettHourglass`,
hierarchy_sonett.py), with their own masks, positions and cache state.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import re
from contextlib import contextmanager

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.generation.configuration_utils import GenerationMode
from transformers.loss.loss_utils import ForSequenceClassificationLoss, ForTokenClassification
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.hub import resolve_revision
from transformers.utils.output_capturing import OutputRecorder, resolve_hidden_states_indices, selected_hidden_states

from .attention_sonett import SonettAttention, initial_span_logit
from .cache_sonett import SUPPORTED_CACHE_IMPLEMENTATIONS, SonettCache, SonettStaticCache
from .configuration_sonett import ROPE_KINDS, SonettConfig
from .cross_attention_sonett import SonettCrossAttentionBlock
from .hierarchy_sonett import ShortenedPlacement, SonettHourglass, SonettUpsampleProjection
from .layers_sonett import (
    GENERATE_VALIDATED,
    PREFILL_PIECE_TOKENS,
    PackedDocuments,
    SonettMLP,
    SonettRMSNorm,
    SonettRotaryEmbedding,
    host_reads_allowed,
)
from .linear_attention_sonett import SonettLinearAttention, initial_decay_bias
from .memory_attention_sonett import SonettMemoryAttention
from .peft_sonett import register_peft_target_modules
from .vision_sonett import SonettMultiModalProjector, SonettStemConvolution, SonettVisionBlock, SonettVisionModel

# PEFT's default LoRA targets for `LoraConfig()` without `target_modules`, also when loaded as remote code.
register_peft_target_modules(SonettConfig.model_type)

# layer kind -> mixer module. Register new kinds here.
MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "full_attention": SonettAttention,
    "sliding_attention": SonettAttention,
    "linear_attention": SonettLinearAttention,
    "memory_attention": SonettMemoryAttention,
}

# Layer kinds whose cache state cannot be rolled back to an earlier token (assisted decoding needs that).
UNCROPPABLE_KINDS = ("linear_attention", "memory_attention")

logger = logging.getLogger(__name__)


class SonettDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block: a sequence mixer (chosen by the layer's kind) and a SwiGLU MLP, each residual."""

    def __init__(self, config: SonettConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        self.mixer = MIXER_CLASSES[self.kind](config, layer_idx)
        self.mlp = SonettMLP(config)
        self.input_layernorm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: SonettCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `(batch, seq, hidden_size)` -> the same shape, plus the mixer's attention weights."""
        residual = hidden_states
        hidden_states, weights = self.mixer(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class SonettPreTrainedModel(PreTrainedModel):
    config_class = SonettConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SonettDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flex_attn = True  # tests/test_modeling.py runs flex_attention on CPU
    _supports_flash_attn = False  # untested: no flash-attn kernel where the tests run
    _supports_attention_backend = False
    # The single-token decode step of every layer kind (images included) compiles with fullgraph=True on a
    # `SonettStaticCache`; a config with a hierarchy cannot use that cache, so its instances set this to False.
    _can_compile_fullgraph = True
    # Class default; each instance says whether its layers can be cropped (see `uncroppable_parts`).
    _is_stateful = True
    # What transformers' output capturing (`capture_outputs`, `OutputRecorder`) hooks: each decoder layer's output
    # hidden states, and the attention maps of the softmax mixers (full, sliding and the local part of memory layers).
    # Sonett's own forward records them itself (`_Recorder`): it reassembles the shortened states of hierarchy layers
    # and keeps a None per layer without a map, so `attentions` lines up with `layer_types`.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SonettDecoderLayer, index=0),
        "attentions": OutputRecorder(SonettAttention, index=1),
    }

    # Every head a Sonett folder exposes through remote code.
    auto_map_heads = {
        "AutoConfig": "configuration_sonett.SonettConfig",
        "AutoModel": "modeling_sonett.SonettModel",
        "AutoModelForCausalLM": "modeling_sonett.SonettForCausalLM",
        "AutoModelForSequenceClassification": "modeling_sonett.SonettForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_sonett.SonettForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_sonett.SonettForQuestionAnswering",
    }

    # Optimizer roles of the parameters, by name, as nanoGPT's `configure_optimizers` (read by training code through
    # `parameter_roles`): no weight decay on any tensor below 2-D (norms, biases, decays, spans, gates), on norms and
    # on the adaptive span; the gates may train at a learning rate of their own.
    _no_decay_parameters = ("norm", "span_logit")  # name fragments
    _gate_parameters = {
        "cross_attention_gate": ("attn_gate", "mlp_gate"),  # tanh gates of the cross-attention blocks, start at 0
        "memory_gate": (".mixer.gate",),  # per-head memory/local mixing gate of memory_attention layers
    }

    def parameter_roles(self) -> dict[str, str]:
        """Each trainable parameter's optimizer role by name: a key of `_gate_parameters` (the name ends with one
        of its entries), "no_decay" (below 2-D, or the name holds one of `_no_decay_parameters`) or "decay"."""
        roles = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            gate = next((role for role, ends in self._gate_parameters.items() if name.endswith(ends)), None)
            if gate is not None:
                roles[name] = gate
            elif param.dim() < 2 or any(part in name for part in self._no_decay_parameters):
                roles[name] = "no_decay"
            else:
                roles[name] = "decay"
        return roles

    def __init__(self, config: SonettConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        config.validate_layer_type()  # settings changed after the config was built are checked (and read back) too
        self._is_stateful = bool(uncroppable_parts(config))
        if getattr(config.get_text_config(decoder=True), "hierarchy_settings", None):
            self._can_compile_fullgraph = False  # no static cache for a hierarchy (see SonettStaticCache)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Sonett builds its own per-kind SonettCache inside forward.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module; transformers calls this for every module, children before their parent.

        transformers' generic rules come first (normal(0, `initializer_range`) Linear, Conv and Embedding weights,
        zero biases, unit norms); then one branch per Sonett module type with parameters or rules of its own. A rule
        sets only the module's own tensors: for custom code, transformers skips a module without parameters of its
        own (an `nn.Module` that only holds submodules), so a special submodule gets its own type instead
        (`SonettUpsampleProjection`, `SonettStemConvolution`). All go through `transformers.initialization`, which
        skips tensors loaded from a checkpoint, so `from_pretrained` initialises only what the checkpoint lacks.
        """
        super()._init_weights(module)
        if isinstance(module, SonettAttention):  # full, sliding and memory_attention
            if module.adaptive_span:
                init.constant_(module.span_logit, initial_span_logit(module.config))
            if isinstance(module, SonettMemoryAttention):
                init.zeros_(module.gate)  # closed: the memory read grows in from 0
        elif isinstance(module, SonettLinearAttention):
            init.copy_(module.decay_bias, initial_decay_bias(module.num_heads).to(module.decay_bias.device))
            if module.conv_size > 0:  # PyTorch's default for a depthwise kernel, whose fan_in is its width
                bound = 1.0 / math.sqrt(module.conv_size)
                init.uniform_(module.conv1d.weight, -bound, bound)
        elif isinstance(module, SonettUpsampleProjection):
            init.zeros_(module.weight)  # a new hourglass adds nothing until trained
        elif isinstance(module, SonettCrossAttentionBlock):
            init.zeros_(module.attn_gate)  # closed tanh gates: the text model's outputs stay exactly the same
            init.zeros_(module.mlp_gate)
        elif isinstance(module, SonettVisionBlock):
            init.constant_(module.attn_scale, module.LAYER_SCALE_INIT)
            init.constant_(module.mlp_scale, module.LAYER_SCALE_INIT)
        elif isinstance(module, SonettStemConvolution):  # fan-in (He): the features keep the pixels' scale
            init.kaiming_normal_(module.weight, nonlinearity=module.nonlinearity)
        elif isinstance(module, SonettMultiModalProjector):
            if module.resampler_queries is not None:
                init.normal_(module.resampler_queries, std=self.config.initializer_range)
        elif isinstance(module, SonettRotaryEmbedding):
            for kind in module.kinds:
                inv_freq, _ = module.compute_inv_freq(kind)
                init.copy_(getattr(module, f"{kind}_inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{kind}_original_inv_freq"), inv_freq)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_weights: bool = False, **kwargs):
        """Load as transformers does, but refuse a checkpoint that would give a partly random model.

        transformers only warns when the checkpoint lacks weights and initialises them randomly, which makes a model
        that runs but answers wrongly. Sonett raises instead: a ValueError naming the missing weights (tied weights and
        buffers do not count) or the tensors whose shapes differ from the config, and an OSError for a local folder
        without config.json, without weights, with a missing shard, with only pickle weights, or with a truncated
        safetensors file. Weights load from safetensors only (`use_safetensors=True`) unless you pass
        `use_safetensors=False`.

        Args:
            allow_missing_weights: load even when weights are missing (they stay randomly initialised), e.g. to add
                new parts and train them; the loading report still lists them.
            Other arguments as in `PreTrainedModel.from_pretrained`.
        """
        refuse_mismatch = not kwargs.get("ignore_mismatched_sizes", False)
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            subfolder = kwargs.get("subfolder") or ""
            folder = (
                os.path.join(str(pretrained_model_name_or_path), subfolder)
                if subfolder
                else str(pretrained_model_name_or_path)
            )
            check_local_weights(folder, kwargs.get("config") is not None, kwargs.setdefault("use_safetensors", True))
            if not kwargs.get("gguf_file"):
                where = str(pretrained_model_name_or_path)
                cls.check_checkpoint_sizes(where, kwargs, refuse_mismatch, allow_missing_weights)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # report mismatches below, with their names, instead of a bare error
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights in {pretrained_model_name_or_path} cannot be read ({error}): the safetensors file is "
                "truncated or corrupt (an interrupted save or download). Save the model again with save_pretrained, "
                "or download it again with force_download=True."
            ) from error
        where = pretrained_model_name_or_path
        if refuse_mismatch and info["mismatched_keys"]:
            shapes = {name: (tuple(saved), tuple(expected)) for name, saved, expected in info["mismatched_keys"]}
            raise ValueError(size_mismatch_message(where, shapes, differing_fields(model.config, shapes)))
        missing = model.truly_missing_weights(info["missing_keys"])
        if missing and not allow_missing_weights:
            raise ValueError(
                f"The checkpoint in {where} lacks {len(missing)} weights the model needs: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}. transformers would initialise them "
                "randomly and the model would give wrong answers. Save the model again with save_pretrained (or "
                "download the complete folder again), or pass allow_missing_weights=True if you will train those "
                "weights yourself."
            )
        return (model, info) if want_info else model

    @classmethod
    def check_checkpoint_sizes(
        cls, pretrained_model_name_or_path: str, kwargs: dict, refuse_mismatch: bool, allow_missing_weights: bool
    ) -> None:
        """Raise a ValueError naming the config fields that do not fit the checkpoint, before any tensor is allocated.

        transformers finds a shape mismatch only after building the model, and then allocates and initialises the
        mismatched tensors before reporting them (a `vocab_size` of 25,000,000 in config.json costs seconds and GBs
        first). Here the checkpoint's shapes come from the safetensors headers (no tensor data is read) and the model's
        from a copy built on the meta device (no memory), for a local folder or a Hub model whose files are already
        in the cache (nothing is downloaded here; an uncached model is checked by transformers' load, after it).

        Args:
            pretrained_model_name_or_path: the folder or Hub id given to `from_pretrained`.
            kwargs: the other arguments of `from_pretrained`; a Hub revision is resolved once and stored back in them,
                so the check and the load read the same commit.
            refuse_mismatch: False when the caller passed `ignore_mismatched_sizes=True` (shapes are not compared).
            allow_missing_weights: the caller accepts a config with more layers than the checkpoint.
        """
        folder = local_model_folder(pretrained_model_name_or_path, kwargs)
        config = cls._config_to_check(folder, kwargs) if folder is not None else None
        if config is None or getattr(config, "transformers_weights", None):
            return  # (an explicit weights file name is left to transformers)
        saved = checkpoint_shapes(folder, kwargs.get("variant"), kwargs.get("use_safetensors", True))
        if not saved:
            return
        with torch.device("meta"), init.no_init_weights(), init.meta_device_safe_creation_ops():
            expected = {name: tuple(tensor.shape) for name, tensor in cls(config).state_dict().items()}
        prefix = f"{cls.base_model_prefix}."
        pairs = {}  # model name -> (checkpoint shape, model shape), with transformers' base-model prefix handling
        for name, shape in saved.items():
            for candidate in (name, prefix + name, name.removeprefix(prefix)):
                if candidate in expected:
                    pairs[candidate] = (shape, expected[candidate])
                    break
        mismatched = {name: shapes for name, shapes in pairs.items() if shapes[0] != shapes[1]}
        where = pretrained_model_name_or_path
        if refuse_mismatch and mismatched:
            raise ValueError(size_mismatch_message(where, mismatched, differing_fields(config, mismatched)))
        layer_key = re.compile(rf"^(?:{re.escape(prefix)})?layers\.(\d+)\.")
        indices = [int(match.group(1)) for name in saved if (match := layer_key.match(name))]
        saved_layers, layers = (max(indices) + 1 if indices else 0), config.num_hidden_layers

        def span(first: int, last: int) -> str:
            return f"layer {first}" if first == last else f"layers {first} to {last}"

        if saved_layers and saved_layers > layers and refuse_mismatch:
            raise ValueError(
                f"The checkpoint in {where} holds {saved_layers} decoder layers but num_hidden_layers = {layers} in "
                f"the config, so {span(layers, saved_layers - 1)} would be dropped. Set num_hidden_layers to "
                f"{saved_layers} (with one layer_types entry per layer) in config.json, or load the weights with the "
                "config.json saved next to them (no config= or size overrides); pass ignore_mismatched_sizes=True to "
                f"load only the first {layers} layers."
            )
        if saved_layers and saved_layers < layers and not allow_missing_weights:
            raise ValueError(
                f"The checkpoint in {where} holds {saved_layers} decoder layers but num_hidden_layers = {layers} in "
                f"the config, so {span(saved_layers, layers - 1)} would be randomly initialised and the model "
                f"would give wrong answers. Set num_hidden_layers to {saved_layers} (with one layer_types entry per "
                "layer) in config.json, or pass allow_missing_weights=True if you will train the new layers."
            )

    @classmethod
    def _config_to_check(cls, folder: str, kwargs: dict) -> PreTrainedConfig | None:
        """The config `from_pretrained` will build the model from: `config=`, or config.json in `folder` with the
        config fields passed as keyword arguments; None for a `config=` path this check does not read (a Hub id)."""
        config = kwargs.get("config")
        if isinstance(config, PreTrainedConfig):
            return copy.deepcopy(config)
        if config is not None and not os.path.isdir(str(config)):
            return None
        fields = {field.name for field in dataclasses.fields(cls.config_class)} | {"num_labels"}
        overrides = {key: value for key, value in kwargs.items() if key in fields and key != "dtype"}
        return cls.config_class.from_pretrained(folder if config is None else config, **overrides)

    def truly_missing_weights(self, missing_keys: set[str]) -> list[str]:
        """The missing weights (as transformers reports them after its key renaming, prefix handling, tying and
        `_keys_to_ignore_on_load_missing`) that make a loaded model wrong, sorted.

        A missing weight of the body (the base model under `base_model_prefix`) is always wrong. A missing weight of
        this class's own head (outside the body) is wrong only when the checkpoint was saved by this same class
        (`config.architectures` names it), so the head should be there; from another class (a `SonettModel` or
        `SonettForCausalLM` checkpoint loaded into a new head) the head is new, and transformers reports it as newly
        initialised.
        """
        missing = sorted(missing_keys)
        saved_by = self.config.architectures
        if self.base_model is self or not saved_by or type(self).__name__ in saved_by:
            return missing  # (no `architectures`: the saving class is unknown, so nothing may be missing)
        body = f"{self.base_model_prefix}."
        return [name for name in missing if name.startswith(body)]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, with an `auto_map` that exposes every Sonett head through remote code."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(self.auto_map_heads)
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# Config fields that set one dimension of a tensor: (pattern of the model's tensor name, dimension, field). Layer
# patterns name the layer index as group 1; the q/k patterns hold for the softmax-attention kinds (`ROPE_KINDS`).
FIELD_DIMENSIONS: tuple[tuple[str, int, str], ...] = (
    (r"^(?:model\.)?embed_tokens\.weight$", 0, "vocab_size"),
    (r"^(?:model\.)?embed_tokens\.weight$", 1, "hidden_size"),
    (r"^(?:model\.)?layers\.(\d+)\.mlp\.gate_proj\.weight$", 0, "intermediate_size"),
    (r"^(?:model\.)?layers\.(\d+)\.mixer\.q_proj\.weight$", 0, "num_attention_heads * head_dim"),
    (r"^(?:model\.)?layers\.(\d+)\.mixer\.k_proj\.weight$", 0, "num_key_value_heads * head_dim"),
)


def differing_fields(config: SonettConfig, mismatched: dict[str, tuple[tuple, tuple]]) -> list[str]:
    """The config fields that explain shape mismatches, each as "field = config value in the config, checkpoint
    value in the checkpoint".

    Args:
        config: the config the model was (or would be) built from.
        mismatched: model tensor name -> (checkpoint shape, model shape), for the tensors whose shapes differ.
    """
    found = {}
    for pattern, dim, field in FIELD_DIMENSIONS:
        for name, (saved, expected) in sorted(mismatched.items()):
            match = re.match(pattern, name)
            if field in found or match is None or len(saved) != len(expected) or saved[dim] == expected[dim]:
                continue
            if "*" in field and config.layer_types[int(match.group(1))] not in ROPE_KINDS:
                continue  # the q/k projections of linear attention have another width
            heads = field.split(" * ")[0]
            value = f"{getattr(config, heads)} * {config.head_dim} = {expected[dim]}" if "*" in field else expected[dim]
            found[field] = f"{field} = {value} in the config, {saved[dim]} in the checkpoint ({name})"
    return list(found.values())


def size_mismatch_message(where: str, mismatched: dict[str, tuple[tuple, tuple]], fields: list[str]) -> str:
    """The error for a checkpoint whose tensor shapes differ from the model's (model name -> (checkpoint shape,
    model shape)), naming the config fields found by `differing_fields` and the fixes."""
    shapes = [
        f"{name} {saved} in the checkpoint vs {expected} in the model"
        for name, (saved, expected) in sorted(mismatched.items())
    ]
    named = f" Config fields that differ from the checkpoint: {'; '.join(fields)}." if fields else ""
    return (
        f"The checkpoint in {where} does not fit this config: {len(shapes)} tensors have other shapes "
        f"({'; '.join(shapes[:5])}{'; ...' if len(shapes) > 5 else ''}).{named} The weights were saved from a model "
        "with another config (e.g. another hidden_size); set those fields in config.json to the checkpoint's values, "
        "or load the weights with the config.json saved next to them (no config= or size overrides), or pass "
        "ignore_mismatched_sizes=True to re-initialise those tensors."
    )


def local_model_folder(pretrained_model_name_or_path: str, kwargs: dict) -> str | None:
    """The local folder `from_pretrained` reads the files from, or None where they are not on this machine yet.

    A local folder (with `subfolder`) is itself; for a Hub id it is the cached snapshot of the commit transformers will
    load, when its config.json is in the cache. The Hub revision is resolved once (from the cache when offline) and
    stored in `kwargs["revision"]`, as transformers does, so the check and the load read the same commit.
    """
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(pretrained_model_name_or_path):
        return os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
    if os.path.exists(pretrained_model_name_or_path) or kwargs.get("force_download"):
        return None
    revision = resolve_revision(
        pretrained_model_name_or_path,
        kwargs.get("revision"),
        token=kwargs.get("token"),
        local_files_only=bool(kwargs.get("local_files_only")),
        cache_dir=kwargs.get("cache_dir"),
    )
    kwargs["revision"] = revision
    commit = getattr(revision, "resolved", None)
    if commit is None:
        return None
    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        cached = try_to_load_from_cache(
            pretrained_model_name_or_path, filename, cache_dir=kwargs.get("cache_dir"), revision=commit
        )
    except (HFValidationError, ValueError):
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def checkpoint_shapes(
    folder: str, variant: str | None = None, use_safetensors: bool | None = True
) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of the safetensors weights in `folder`, from the file headers only (no tensor data).

    The file is the one transformers loads: `model.safetensors`, else the shards of `model.safetensors.index.json`
    (with `variant` in the names). None when there is none (pickle weights, a shard not downloaded yet) or the index
    cannot be read (transformers reports it). A damaged safetensors header raises the OSError of a corrupt file.
    """
    if use_safetensors is False:
        return None
    tag = f".{variant}" if variant else ""
    single = os.path.join(folder, f"model{tag}.safetensors")
    index = os.path.join(folder, f"model.safetensors.index{tag}.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                files = [os.path.join(folder, shard) for shard in sorted(set(json.load(handle)["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return None
        if not all(os.path.isfile(file) for file in files):
            return None
    else:
        return None
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                names = list(handle.keys())
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except SafetensorError as error:
            raise OSError(
                f"The weights in {file} cannot be read ({error}): the safetensors file is truncated or corrupt (an "
                "interrupted save or download). Save the model again with save_pretrained, or download it again with "
                "force_download=True."
            ) from error
    return shapes


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".gguf")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")


def check_local_weights(folder: str, has_config: bool = False, use_safetensors: bool | None = True) -> None:
    """Raise an OSError naming the problem and the fix when a local model folder cannot load completely.

    Checks: config.json present (unless a config is passed, `has_config`), some weight file present, every shard an
    index names present, and (unless `use_safetensors` is False) weights in safetensors rather than only pickle files.
    A path that is not a local folder (a Hub id) is left to transformers.
    """
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    weights = [name for name in names if name.endswith(WEIGHT_SUFFIXES)]
    if "config.json" not in names and not has_config:
        if weights:
            raise OSError(
                f"{folder} has weights but no config.json, so the model's shape is unknown; save the model again "
                "with model.save_pretrained(folder), or copy the config.json that was saved with these weights."
            )
        return  # not a model folder: transformers reports it
    if not weights:
        raise OSError(
            f"{folder} has a config.json but no weights (no model.safetensors): the save was interrupted or the file "
            "was deleted. Save the model again with model.save_pretrained(folder), or copy or download the complete "
            "folder."
        )
    if use_safetensors is not False and all(name.endswith(PICKLE_WEIGHT_SUFFIXES) for name in weights):
        raise OSError(
            f"{folder} holds only pickle weights ({', '.join(sorted(weights))}), which Sonett does not load by "
            "default: unpickling a file can run code stored in it. Convert them to safetensors (load once where you "
            "trust the file, then save_pretrained), or pass use_safetensors=False if you trust this file."
        )
    for index in (name for name in names if name.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as handle:
                shards = set(json.load(handle)["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise OSError(
                f"{os.path.join(folder, index)} is not a valid weight index ({error}); save the model again with "
                "model.save_pretrained(folder)."
            ) from error
        outside = sorted(shard for shard in shards if isinstance(shard, str) and os.path.basename(shard) != shard)
        if outside:
            raise OSError(
                f"{os.path.join(folder, index)} names weight shards outside the folder ({', '.join(outside)}); a "
                "shard is a file of the model folder itself. Save the model again with model.save_pretrained(folder)."
            )
        missing = sorted(shard for shard in shards if shard not in names)
        if missing:
            raise OSError(
                f"{folder} lacks {len(missing)} of the {len(shards)} weight shards its {index} names "
                f"({', '.join(missing)}): the save or download was interrupted. Save the model again with "
                "model.save_pretrained(folder), or copy or download the complete folder."
            )


def uncroppable_parts(config: SonettConfig) -> list[str]:
    """The parts of a model whose cache state cannot be rolled back to an earlier token, e.g.
    `["linear_attention (layers 1, 3)", "hierarchy"]`; empty when every layer is full or sliding attention."""
    parts = []
    for kind in UNCROPPABLE_KINDS:
        layers = [str(i) for i, layer_kind in enumerate(config.layer_types) if layer_kind == kind]
        if layers:
            parts.append(f"{kind} (layer{'s' if len(layers) > 1 else ''} {', '.join(layers)})")
    if config.hierarchy_settings is not None:
        parts.append("a hierarchy (its shortened layers have already consumed the tokens)")
    return parts


def full_attention_token_limit(config: SonettConfig) -> int | None:
    """Longest sequence (in tokens) the `full_attention` layers take, or None without such layers.

    It is the positions their RoPE is set up for (`config.rope_max_positions`: `max_position_embeddings`, or more
    with a RoPE scaling), times the hierarchy's `shorten_factor` when every full_attention layer runs on the
    shortened sequence (shortened token j ends at position j * k). Sliding, linear and memory layers have no limit.
    """
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    if not full:
        return None
    span = config.hierarchy_span()
    positions = config.rope_max_positions("full_attention")
    if all(i in span for i in full):
        return positions * config.hierarchy_settings.shorten_factor
    return positions


def position_limit_fix(config: SonettConfig, limit: int) -> str:
    """What the length error tells the user to do."""
    params = config.rope_parameters_for("full_attention")
    rope_type = params.get("rope_type", "default")
    scaled = ""
    if config.rope_max_positions("full_attention") != config.max_position_embeddings:
        pretrained = "max_position_embeddings"
        if "original_max_position_embeddings" in params and rope_type in ("yarn", "llama3"):
            pretrained = f"original_max_position_embeddings {params['original_max_position_embeddings']}"
        scaled = f", extended by RoPE rope_type '{rope_type}' to factor {params['factor']} x {pretrained}"
    if limit != config.rope_max_positions("full_attention"):
        scaled += f", times shorten_factor {config.hierarchy_settings.shorten_factor}"
    return (
        f"this model's full_attention layers take at most {limit} positions (max_position_embeddings="
        f"{config.max_position_embeddings}{scaled}); beyond that RoPE meets positions it was never trained on. Shorten "
        "the input (keep its last tokens), use a preset without full_attention layers (sliding, linear and memory "
        "layers have no length limit, e.g. configuration/sonett-tiny-constant.json), or extend the context with a "
        "RoPE scaling for full_attention (rope_parameters with rope_type 'yarn' or 'linear', or 'dynamic' or "
        "'llama3', and a factor): the limit becomes factor x the pretraining length (original_max_position_embeddings "
        "for yarn and llama3, else max_position_embeddings), or max_position_embeddings if that is larger."
    )


def check_position_limit(config: SonettConfig, position_ids: torch.Tensor) -> None:
    """Raise a ValueError when `position_ids` `(batch, seq)` reach past what the full_attention layers take.

    Skipped inside compiled code (it reads the positions back to the host); `generate` checks the whole length
    before its first step.
    """
    limit = full_attention_token_limit(config)
    if limit is None or not host_reads_allowed():
        return
    last = int(position_ids.max())
    if last >= limit:
        raise ValueError(
            f"The input reaches position {last} (a sequence of {last + 1} tokens), but "
            + position_limit_fix(config, limit)
        )


def _check_static_cache_room(cache: SonettCache | None, max_length: int, prompt_length: int) -> None:
    """Raise a ValueError before the first step of `generate` when a static cache the caller passed cannot hold the
    generation: its steps skip the per-step room check (docs/design.md, invariant 12), and a full static layer would
    fail inside `index_copy_` (on a GPU, a device-side assert). The last generated token is never fed, so the cache
    must hold `max_length - 1` tokens."""
    if not isinstance(cache, SonettStaticCache) or "full_attention" not in cache.layer_types:
        return
    if max_length - 1 > cache.max_cache_len:
        raise ValueError(
            f"generate would grow the sequences to {max_length} tokens (prompt {prompt_length} + up to "
            f"{max_length - prompt_length} new), but the static cache passed to it holds at most "
            f"{cache.max_cache_len} tokens. Build it with model.make_cache('static', max_cache_len={max_length}), "
            f"or lower max_new_tokens to {max(cache.max_cache_len + 1 - prompt_length, 0)} or less."
        )


def check_token_ids(config: SonettConfig, input_ids: torch.Tensor) -> None:
    """Raise a ValueError naming the first token id outside `[0, vocab_size)` (reads the ids back to the host)."""
    out_of_range = (input_ids < 0) | (input_ids >= config.vocab_size)
    if bool(out_of_range.any()):
        bad = int(input_ids[out_of_range][0])
        raise ValueError(
            f"Token id {bad} is out of range for vocab_size {config.vocab_size} (valid ids are 0 to "
            f"{config.vocab_size - 1}); the tokenizer and the model config do not match: encode the text with the "
            "tokenizer saved with this model."
        )


PACKING_BACKENDS = ("eager", "sdpa", "flex_attention")
# A no-grad forward over more than twice this many tokens of a constant-state model runs segment by segment through
# the cache (`SonettModel._segmented_prefill`).
PREFILL_SEGMENT_TOKENS = PREFILL_PIECE_TOKENS
# Token ids and labels: the dtypes the embedding and cross_entropy take.
ID_DTYPES = (torch.int64, torch.int32)


def packed_documents(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_length: int, batch_size: int
) -> PackedDocuments | None:
    """The documents of packed rows, or None when the rows are not packed.

    Rows are packed when `position_ids` `(batch or 1, seq)` restart (do not grow by 1) inside a row, with nothing
    cached and no `attention_mask`, as transformers' `DataCollatorWithFlattening` produces them and exactly when
    transformers' mask builders look for packing (`find_packed_sequence_indices`). With a 2-D mask (the tokenizer's,
    padded or not), positions are used as given in one sequence per row, as in transformers' own models; positions
    that continue a cache are not packing either.
    """
    if attention_mask is not None or position_ids is None or position_ids.shape[1] < 2 or past_length > 0:
        return None  # (cheap tests first: a decode step reads nothing back from the device)
    position_ids = position_ids.expand(batch_size, -1)
    restart = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    if not bool(restart.any()):
        return None
    return PackedDocuments(torch.nn.functional.pad(restart.long().cumsum(-1), (1, 0)))


def check_packing(config: SonettConfig, cache_requested: bool, from_mask: bool = False) -> None:
    """Raise a ValueError for packed rows the model cannot run exactly: with a cache, or under a kernel that would
    ignore the block-diagonal mask. `from_mask`: the documents come from a block-diagonal 4-D `attention_mask`."""
    if cache_requested:
        source = (
            "The 4-D attention_mask is block-diagonal (packed sequences: several documents in one row), which this "
            "model's linear, memory or hierarchy layers follow by running the documents as packed rows. "
            if from_mask
            else "The position_ids restart inside a row (packed sequences: several documents in one row). "
        )
        raise ValueError(
            source + "Packed rows run without a cache, since a cache would carry one document's state into the next: "
            "pass use_cache=False and no cache, or give each document its own row to continue it with a cache or "
            "generate()."
        )
    if config._attn_implementation not in PACKING_BACKENDS:
        raise ValueError(
            f"Packed sequences (position_ids that restart inside a row) need attn_implementation "
            f"{', '.join(repr(name) for name in PACKING_BACKENDS)}, whose masks keep the documents apart; "
            f"{config._attn_implementation!r} is not tested with them. Call model.set_attn_implementation('sdpa')."
        )


# An additive float mask hides a key with -inf or a large negative value (transformers uses torch.finfo(dtype).min);
# a value at or below float16's lowest counts as hidden, whatever the mask's dtype.
HIDDEN_AT_MOST = torch.finfo(torch.float16).min


def mask_following_parts(config: SonettConfig) -> list[str]:
    """The parts of a model that cannot follow an arbitrary 4-D mask (empty for softmax layers only)."""
    parts = []
    if "linear_attention" in config.layer_types:
        parts.append("linear_attention layers (a running state, not a choice of keys)")
    if "memory_attention" in config.layer_types:
        parts.append("memory_attention layers (a compressive memory of every token that left the window)")
    if config.hierarchy_settings is not None:
        parts.append("hierarchy (it pools groups of tokens)")
    return parts


def block_diagonal_documents(attention_mask: torch.Tensor, past_length: int) -> PackedDocuments | None:
    """The documents of a block-diagonal causal 4-D mask `(batch or 1, 1, seq, seq)`, or None for any other mask.

    Block-diagonal causal: per row, the documents are contiguous spans and each token sees exactly the earlier tokens
    of its own document, itself included (bool True / float 0), and no other (bool False / float -inf or at most
    float16's lowest value); nothing is cached. Reads the mask back to the host.
    """
    if past_length or attention_mask.shape[1] != 1:
        return None
    mask = attention_mask[:, 0]
    if mask.dtype == torch.bool:
        visible = mask
    else:
        if bool(((mask != 0) & (mask > HIDDEN_AT_MOST)).any()):
            return None  # a soft bias, neither visible nor hidden
        visible = mask == 0
    seq = visible.shape[-1]
    # A document starts wherever a token does not see the token just before it.
    starts = ~visible.diagonal(offset=-1, dim1=-2, dim2=-1)  # (batch, seq - 1)
    ids = torch.nn.functional.pad(starts.long().cumsum(-1), (1, 0))
    causal = torch.ones(seq, seq, dtype=torch.bool, device=visible.device).tril()
    expected = (ids[:, :, None] == ids[:, None, :]) & causal
    return PackedDocuments(ids) if torch.equal(visible, expected) else None


def prepare_custom_mask(
    config: SonettConfig, attention_mask: torch.Tensor | None, past_length: int
) -> tuple[torch.Tensor | None, PackedDocuments | None]:
    """Check a 4-D `attention_mask` `(batch or 1, 1, seq, past + seq)`; return it ready for the layers, and the
    documents it packs when the model's linear, memory or hierarchy layers need them (else None).

    Values, as transformers reads them: bool (True = may attend), or an additive float mask (0 where a token may
    attend, -inf or `torch.finfo(dtype).min` where not; other negative values are biases). Integer 0/1 masks are read
    as bool. Positive or NaN float values and other integers are refused (a 0/1 float mask added to the scores would
    hide nothing). Softmax layers use the mask as given. Linear and memory layers keep a running state and a
    hierarchy pools groups of tokens, so a model with any of them takes only a block-diagonal causal mask
    (`block_diagonal_documents`): its documents then run as packed rows, each exactly as alone; any other 4-D mask is
    refused. Value checks read the mask back to the host; inside compiled code only the shapes are checked.
    Other dims are left as they are (check_text_inputs checks the shape).
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return attention_mask, None
    if attention_mask.shape[-1] != past_length + attention_mask.shape[-2]:
        raise ValueError(
            f"The 4-D `attention_mask` has {attention_mask.shape[-1]} key columns but there are "
            f"{past_length + attention_mask.shape[-2]} keys (cached tokens {past_length} + new tokens "
            f"{attention_mask.shape[-2]}); pass a mask of shape (batch, 1, new tokens, cached + new tokens)."
        )
    compiling = torch.compiler.is_compiling()
    how = (
        "pass a bool mask (True where a token may attend) or an additive float mask (0 where it may attend, -inf or "
        "torch.finfo(dtype).min where not)"
    )
    if attention_mask.dtype.is_complex:
        raise ValueError(f"The 4-D `attention_mask` has dtype {attention_mask.dtype}; {how}.")
    if not attention_mask.is_floating_point() and attention_mask.dtype != torch.bool:
        if not compiling and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError(
                f"The 4-D integer `attention_mask` holds values other than 0 and 1 (e.g. "
                f"{int(attention_mask[(attention_mask != 0) & (attention_mask != 1)][0])}); {how}."
            )
        attention_mask = attention_mask.bool()
    elif attention_mask.is_floating_point() and not compiling:
        if bool(attention_mask.isnan().any()):
            raise ValueError(f"The 4-D `attention_mask` holds NaN; {how}.")
        if bool((attention_mask > 0).any()):
            raise ValueError(
                "The 4-D float `attention_mask` holds positive values, but a float mask is added to the attention "
                "scores (a 0/1 mask would hide nothing); pass a 0/1 mask as bool (`mask.bool()`), or an additive mask "
                "(0 where a token may attend, -inf or torch.finfo(dtype).min where not)."
            )
    parts = mask_following_parts(config)
    if not parts:
        return attention_mask, None
    documents = None if compiling else block_diagonal_documents(attention_mask, past_length)
    if documents is None:
        reason = (
            f" (it covers {past_length} cached tokens, which these layers have already consumed)"
            if past_length
            else " (it cannot be checked inside compiled code)"
            if compiling
            else ""
        )
        raise ValueError(
            f"This model's {' and '.join(parts)} cannot follow an arbitrary 4-D attention_mask. They honour only a "
            "block-diagonal causal mask over the new tokens with nothing cached (per row, the documents are "
            "contiguous spans and each token sees exactly the earlier tokens of its own document, itself included), "
            f"and this mask is not one{reason}. To keep packed documents apart, pass position_ids that restart at 0 "
            "at each document and no mask (as DataCollatorWithFlattening does), or give one row per document with "
            "the 2-D padding mask the tokenizer returns; for other patterns (prefix-LM, windows, soft biases) use a "
            "config whose layers are only full_attention (or sliding_attention) and no hierarchy."
        )
    return attention_mask, documents


def check_label_values(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    """Raise a ValueError naming the first value of `labels` outside `[0, num_classes)` that is not `ignore_index`
    (reads the labels back to the host; skipped inside compiled code)."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"`{name}` holds {int(labels[bad][0])}, outside {what} {num_classes}: valid targets are 0 to "
            f"{num_classes - 1}, and {ignore_index} marks a position the loss ignores. Make the labels with the "
            f"tokenizer (or label list) this model was made with, and mark padding with {ignore_index}."
        )


def check_padding_mask_values(attention_mask: torch.Tensor) -> None:
    """Raise a ValueError when a 2-D `attention_mask` holds values other than 0 and 1 (reads it back to the host)."""
    if attention_mask.dtype == torch.bool:
        return
    other = (attention_mask != 0) & (attention_mask != 1)
    if bool(other.any()):
        raise ValueError(
            f"The 2-D `attention_mask` must hold 1 for real tokens and 0 for padding (or be bool), but it "
            f"holds {attention_mask[other][0].item()}: every nonzero value would count as a real token (an "
            "additive 0 / -inf mask would be read the other way round). Pass the mask the tokenizer returned."
        )


def check_text_inputs(
    config: SonettConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_length: int | None,
    cache_batch_size: int | None = None,
    embedding_dtype: torch.dtype | None = None,
) -> None:
    """Raise a ValueError that names the problem for inputs the model cannot run on.

    Checks of shapes and dtypes always run. Checks that read tensor values (token ids in range) run only outside
    compiled code, where they cost no graph break: eager calls, and in `generate` the prompt's (prefill) call.
    `past_length` None skips the check of the 2-D mask's length against the cache (compiled decode steps).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}; "
                "add a batch dimension with `input_ids[None]`."
            )
        if input_ids.dtype not in ID_DTYPES:
            raise ValueError(
                f"`input_ids` must hold integer token ids as torch.int64 (or torch.int32), got dtype "
                f"{input_ids.dtype}; convert them with `.long()` (ids kept in a narrower dtype such as uint8 may "
                "already have wrapped around)."
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq_len, {config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        if embedding_dtype is not None and inputs_embeds.dtype != embedding_dtype:
            raise ValueError(
                f"`inputs_embeds` has dtype {inputs_embeds.dtype} but the model runs in {embedding_dtype}; "
                f"cast them with `.to({embedding_dtype})`."
            )
        shape = tuple(inputs_embeds.shape[:2])
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"Empty input: got batch shape {shape}; pass at least one token per sequence.")
    if cache_batch_size is not None and cache_batch_size != shape[0]:
        raise ValueError(
            f"The cache holds {cache_batch_size} sequences but the input has batch size {shape[0]}; "
            "pass a fresh cache (or none) for a new batch."
        )
    if input_ids is not None and host_reads_allowed():
        check_token_ids(config, input_ids)
    if attention_mask is not None and attention_mask.dim() == 2:
        expected = (shape[0], (past_length or 0) + shape[1])
        if past_length is not None and tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but the input needs {expected} "
                f"(batch, cached tokens {past_length} + new tokens {shape[1]}); pass the mask the tokenizer returned "
                "for these input_ids, extended by the new tokens when decoding with a cache."
            )
        if host_reads_allowed():
            check_padding_mask_values(attention_mask)
    elif attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"`attention_mask` must be 2-D (batch, seq_len) or a prepared 4-D mask, "
            f"got shape {tuple(attention_mask.shape)}; pass the 2-D mask the tokenizer returned."
        )
    elif attention_mask is not None and (
        attention_mask.shape[0] not in (1, shape[0])
        or attention_mask.shape[1] != 1
        or attention_mask.shape[-2] != shape[1]
    ):
        raise ValueError(
            f"The 4-D `attention_mask` has shape {tuple(attention_mask.shape)}; it must be "
            f"(batch {shape[0]} or 1, 1, new tokens {shape[1]}, key length)."
        )
    if position_ids is not None and (
        position_ids.dim() != 2 or position_ids.shape[0] not in (1, shape[0]) or position_ids.shape[1] != shape[1]
    ):
        raise ValueError(
            f"`position_ids` has shape {tuple(position_ids.shape)} but the input has batch {shape[0]} and "
            f"{shape[1]} new tokens; pass shape ({shape[0]} or 1, {shape[1]})."
        )


class _Recorder:
    """Collects per-layer hidden states and attention weights when requested.

    Layers of a shortened span record their shortened inputs, assembled into this call's left-padded layout
    `(batch, shortened tokens completed in this call, hidden)` (None when no group completed). Their attention
    weights are kept when one run covered every row, else None.
    """

    def __init__(self, output_hidden_states: bool, output_attentions: bool, num_layers: int) -> None:
        self.output_hidden_states, self.output_attentions = output_hidden_states, output_attentions
        self.hidden: dict[int, list] = {i: [] for i in range(num_layers)}
        self.weights: dict[int, list] = {i: [] for i in range(num_layers)}

    def add_hidden(self, layer_idx: int, hidden_states: torch.Tensor, placement: ShortenedPlacement | None) -> None:
        if self.output_hidden_states:
            self.hidden[layer_idx].append((hidden_states, placement))

    def add_attention(self, layer_idx: int, weights: torch.Tensor | None, placement: ShortenedPlacement | None):
        if self.output_attentions:
            self.weights[layer_idx].append((weights, placement))

    @staticmethod
    def _whole(entries: list) -> torch.Tensor | None:
        """The one entry, if it covers the whole batch and layout, else None."""
        if len(entries) != 1:
            return None
        tensor, placement = entries[0]
        if placement is None or (len(placement.rows) == placement.batch and len(placement.columns) == placement.width):
            return tensor
        return None

    @classmethod
    def _assemble(cls, entries: list) -> torch.Tensor | None:
        if not entries or cls._whole(entries) is not None:
            return cls._whole(entries)
        _, placement = entries[0]
        full = entries[0][0].new_zeros(placement.batch, placement.width, entries[0][0].shape[-1])
        for tensor, place in entries:
            full[place.rows[:, None], place.columns[None, :]] = tensor
        return full

    def hidden_states(self, final: torch.Tensor) -> tuple | None:
        if not self.output_hidden_states:
            return None
        return (*(self._assemble(self.hidden[i]) for i in sorted(self.hidden)), final)

    def attentions(self) -> tuple | None:
        if not self.output_attentions:
            return None
        return tuple(self._whole(self.weights[i]) for i in sorted(self.weights))


class _ImageContext:
    """Per cross-attention block image keys/values, and `visible` `(batch, seq, image tokens)` for this call."""

    def __init__(self, states: dict[int, tuple[torch.Tensor, torch.Tensor]], visible: torch.Tensor) -> None:
        self.states, self.visible = states, visible


class SonettModel(SonettPreTrainedModel):
    """The Sonett decoder stack without a language-model head."""

    def __init__(self, config: SonettConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SonettDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hourglass = SonettHourglass(config) if config.hierarchy_settings is not None else None
        self.cross_attention_blocks = nn.ModuleDict(
            {str(i): SonettCrossAttentionBlock(config) for i in config.cross_attention_layers or []}
        )
        rope_kinds = [kind for kind in config.layer_types if kind in ROPE_KINDS]
        self.rotary_emb = SonettRotaryEmbedding(config, rope_kinds)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SonettCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        image_tokens: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        Args:
            input_ids: `(batch, seq)` token ids, or None when `inputs_embeds` is given.
            attention_mask: `(batch, past + seq)`, 1 for real tokens and 0 for padding (left padding for
                generation). A custom 4-D mask `(batch or 1, 1, seq, past + seq)`, bool or additive float, is used
                as given by full and sliding layers (eager or sdpa; sliding layers keep their window); 0/1 integers
                read as bool. Models with linear, memory or hierarchy layers take only a block-diagonal causal mask
                (its documents then run as packed rows, below; positions default to each token's index in its
                document) and refuse any other (see `prepare_custom_mask`). A 2-D mask holds only 0 and 1; a 0 in
                the middle hides that token from every other one, though windows (sliding, conv, hierarchy groups)
                still count its slot.
            position_ids: `(batch, seq)`; derived from `attention_mask` (or the cache length) when None, so
                left-padded rows get the same positions as when run alone. Positions that restart inside a row
                (with no padding and nothing cached) mark packed documents, as `DataCollatorWithFlattening` makes
                them: each document then gets exactly its logits alone, and no cache is returned.
            cache: a `SonettCache` holding the state of earlier tokens; created when `use_cache` and None.
            inputs_embeds: `(batch, seq, hidden_size)` instead of `input_ids`.
            use_cache: return the updated cache (defaults to `config.use_cache` at inference, False in training).
            output_attentions: also return each layer's attention probabilities `(batch, heads, seq, past + seq)`:
                the softmax maps of `full_attention` and `sliding_attention` layers, and of the local window of
                `memory_attention` layers (their memory read has no map); None for `linear_attention` layers, which
                have no attention map. Under a backend that cannot return maps (sdpa, flex_attention, kernels) this
                call runs on eager attention, as transformers does for `output_attentions`.
            output_hidden_states: also return the input of every layer plus the final normed state, `num_layers + 1`
                tensors `(batch, seq, hidden_size)` (layers of a hierarchy span: their shortened inputs); an index
                or a list of indices (negative ones count from the end) keeps only those and gives None elsewhere.
            return_dict: False returns a plain tuple (`ModelOutput.to_tuple()`, None entries dropped); defaults to
                `config.use_return_dict`.
            image_tokens: `(batch, images, tokens per image, hidden_size)` projected visual tokens for the
                cross-attention blocks (from `SonettForConditionalGeneration`); kept in the cache for decoding.
            image_mask: `(batch, images)`, 1 for a real image and 0 for a padding slot.
            cross_attention_mask: `(batch, seq or past + seq, images)`, 1 where a text position may see an image;
                derived from the image markers in `input_ids` when None.

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` `(batch, seq, hidden_size)`, `cache`, and
            `hidden_states` and `attentions` (one entry per layer) when requested.
        """
        output_attentions = bool(output_attentions or self.config.output_attentions)
        if output_attentions and self.config._attn_implementation != "eager":
            if self.gradient_checkpointing and self.training:
                raise ValueError(
                    f"output_attentions=True under {self.config._attn_implementation!r} runs this call on eager "
                    "attention, but activation checkpointing recomputes the layers in backward, after that switch; "
                    "call model.set_attn_implementation('eager') to get attention maps while training with "
                    "activation checkpointing, or do not ask for them."
                )
            with self._eager_attention():  # only eager returns the maps; the same body, without the decorators
                return inspect.unwrap(SonettModel.forward)(
                    self,
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    inputs_embeds=inputs_embeds,
                    use_cache=use_cache,
                    output_attentions=True,
                    output_hidden_states=output_hidden_states,
                    image_tokens=image_tokens,
                    image_mask=image_mask,
                    cross_attention_mask=cross_attention_mask,
                    **kwargs,
                )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        selected = selected_hidden_states(output_hidden_states)
        output_hidden_states = selected is not None or bool(output_hidden_states)
        cache_requested = use_cache is True or cache is not None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        # A static cache counts its tokens in a tensor: positions use it as is; the checks read it once, eagerly.
        past_length = cache.get_seq_length() if cache is not None else 0
        compiling = torch.compiler.is_compiling()
        checks_read_values = host_reads_allowed()  # not when compiling, nor in a generate that checked its prompt
        cache_batch_size = cache.cached_batch_size() if hasattr(cache, "cached_batch_size") and not compiling else None
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        check_text_inputs(
            self.config,
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            int(past_length) if checks_read_values else None,
            cache_batch_size,
            self.embed_tokens.weight.dtype,
        )
        new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if (
            cache is not None
            and hasattr(cache, "check_room")
            and not compiling
            and (checks_read_values or new_tokens > 1)
        ):
            cache.check_room(new_tokens)
        attention_mask, mask_documents = prepare_custom_mask(self.config, attention_mask, past_length)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        documents = packed_documents(position_ids, attention_mask, past_length, batch_size)
        if mask_documents is not None:
            # A block-diagonal 4-D mask: its documents run as packed rows, each from position 0 unless positions
            # are given (softmax layers still read the mask itself).
            documents = PackedDocuments(mask_documents.ids.expand(batch_size, -1))
            if position_ids is None:
                position_ids = documents.offsets()
        if documents is not None:
            check_packing(self.config, cache_requested, from_mask=mask_documents is not None)
            use_cache = False
        if (
            not output_hidden_states
            and not output_attentions
            and documents is None  # packed rows: a segment's cache would carry one document's state into the next
            and self._prefills_in_segments(input_ids, inputs_embeds, attention_mask, cache, kwargs, image_tokens)
        ):
            return self._segmented_prefill(input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = self.make_cache()
        if position_ids is None:
            position_ids = self._default_position_ids(inputs_embeds, attention_mask, past_length)
        position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        check_position_limit(self.config, position_ids)

        images = self._image_context(
            image_tokens, image_mask, cross_attention_mask, input_ids, cache, inputs_embeds, documents
        )
        # Full-length layers before and after the hourglass span (all layers without a hierarchy).
        span = self.config.hierarchy_span()
        before = list(range(span.start)) if span else list(range(len(self.layers)))
        after = list(range(span.stop, len(self.layers))) if span else []
        record = _Recorder(output_hidden_states, output_attentions, len(self.layers))
        masks, rope = self._masks_and_rope(
            before + after, inputs_embeds, attention_mask, position_ids, cache, record, documents
        )
        hidden_states = self._run_layers(before, inputs_embeds, masks, rope, cache, record, kwargs, images=images)
        if span:
            hidden_states = self._run_hourglass(
                hidden_states, attention_mask, position_ids, cache, record, kwargs, documents
            )
            hidden_states = self._run_layers(after, hidden_states, masks, rope, cache, record, kwargs, images=images)
        hidden_states = self.norm(hidden_states)
        all_hidden_states = record.hidden_states(hidden_states)
        if selected is not None:
            keep = resolve_hidden_states_indices(self, selected, num_hidden_states=len(all_hidden_states))
            all_hidden_states = tuple(state if i in keep else None for i, state in enumerate(all_hidden_states))
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=record.attentions(),
        )

    def _prefills_in_segments(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: SonettCache | None,
        kwargs: dict,
        image_tokens: torch.Tensor | None,
    ) -> bool:
        """Whether this call runs as `_segmented_prefill`: no gradients, a long input (more than two segments), a
        model whose every layer keeps a constant-size state (linear, sliding and memory attention: no full-attention
        KV cache that segments would have to attend to, no hierarchy, no images), a 2-D mask or none, no static
        cache, and nothing asked of the layers (hidden states and attention maps come from the one-pass path)."""
        tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return (
            not torch.is_grad_enabled()
            and tokens > 2 * PREFILL_SEGMENT_TOKENS
            and "full_attention" not in self.config.layer_types
            and self.hourglass is None
            and not self.cross_attention_blocks
            and image_tokens is None
            and (attention_mask is None or attention_mask.dim() == 2)
            and not isinstance(cache, SonettStaticCache)
            and not kwargs
            and not torch.compiler.is_compiling()
        )

    def _segmented_prefill(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: SonettCache | None,
        use_cache: bool,
    ) -> BaseModelOutputWithPast:
        """A long no-grad input of a constant-state model, `PREFILL_SEGMENT_TOKENS` at a time through the cache.

        Every layer keeps a constant-size state, so feeding the input segment by segment is the chunked prefill of
        docs/design.md, invariant 1 (equal to one pass within 1e-4), and only one segment's activations exist at a
        time: a long prompt prefills in memory that does not grow with its length beyond the hidden states it returns
        (docs/benchmarks.md, prefill memory). Returns what the one-pass forward returns.
        """
        source = input_ids if input_ids is not None else inputs_embeds
        batch, tokens = source.shape[:2]
        if cache is None:
            cache = self.make_cache()  # internal when use_cache is False: it carries the states between segments
        past = int(cache.get_seq_length())
        hidden = None
        for start in range(0, tokens, PREFILL_SEGMENT_TOKENS):
            piece = slice(start, start + PREFILL_SEGMENT_TOKENS)
            out = inspect.unwrap(
                SonettModel.forward
            )(  # the body only: hooks and decorators ran for the whole call
                self,
                input_ids=input_ids[:, piece] if input_ids is not None else None,
                inputs_embeds=inputs_embeds[:, piece] if inputs_embeds is not None else None,
                attention_mask=None if attention_mask is None else attention_mask[:, : past + min(piece.stop, tokens)],
                position_ids=None if position_ids is None else position_ids[:, piece],
                cache=cache,
                use_cache=True,
                output_hidden_states=False,
            )
            state = out.last_hidden_state
            if hidden is None:
                hidden = state.new_empty(batch, tokens, state.shape[-1])
            hidden[:, piece] = state
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)

    @contextmanager
    def _eager_attention(self):
        """Run the model on eager attention inside the block (masks included), then restore the configured backend.

        Used for a call that asks for attention maps when the configured backend (sdpa, flex_attention, kernels)
        cannot return them. The switch is on the shared config, so, like `set_attn_implementation`, it is not safe
        against another thread running the model at the same moment.
        """
        configured = self.config._attn_implementation
        self.config._attn_implementation_internal = "eager"
        try:
            yield
        finally:
            self.config._attn_implementation_internal = configured

    def _image_context(
        self,
        image_tokens: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        cache: SonettCache | None,
        inputs_embeds: torch.Tensor,
        documents: PackedDocuments | None = None,
    ) -> _ImageContext | None:
        """Image keys/values per cross-attention block and which image tokens each new position sees (in packed rows,
        only the images of its own document when the visibility comes from the markers)."""
        if not self.cross_attention_blocks:
            if image_tokens is not None:
                raise ValueError("This model has no cross_attention_layers, so it cannot take images.")
            return None
        batch, seq = inputs_embeds.shape[:2]
        if image_tokens is not None:
            if image_tokens.dim() != 4 or image_tokens.shape[0] != batch:
                raise ValueError(
                    f"image_tokens must have shape (batch {batch}, images, tokens, hidden), got "
                    f"{tuple(image_tokens.shape)}."
                )
            num_images, per_image = image_tokens.shape[1:3]
            flat = image_tokens.reshape(batch, num_images * per_image, -1)
            states = {
                int(i): block.cross_attn.image_keys_values(flat) for i, block in self.cross_attention_blocks.items()
            }
            real = torch.ones(batch, num_images, dtype=torch.bool, device=flat.device)
            if image_mask is not None:
                real = image_mask.to(flat.device).bool()
            real_tokens = real.repeat_interleave(per_image, dim=1)
            if cache is not None:
                cache.image_states, cache.image_visible = states, real_tokens
            if cross_attention_mask is None:
                cross_attention_mask = self._markers_to_cross_mask(input_ids, real, documents)
        elif cache is not None and cache.image_states:
            states, real_tokens = cache.image_states, cache.image_visible
        else:
            return None
        tokens = real_tokens.shape[1]
        if cross_attention_mask is None:  # decoding: every image so far is before the new tokens
            visible = real_tokens[:, None, :].expand(batch, seq, tokens)
        else:
            per_image = tokens // cross_attention_mask.shape[-1]
            visible = cross_attention_mask[:, -seq:].to(real_tokens.device).bool().repeat_interleave(per_image, dim=-1)
            visible = visible & real_tokens[:, None, :]
        return _ImageContext(states, visible)

    def _markers_to_cross_mask(
        self, input_ids: torch.Tensor | None, real: torch.Tensor, documents: PackedDocuments | None = None
    ) -> torch.Tensor:
        """`(batch, seq, images)`: image n is visible from the position of its marker on (the n-th image token), and
        in packed rows only within the marker's document."""
        if input_ids is None or self.config.image_token_id is None:
            raise ValueError(
                "Pass cross_attention_mask (from SonettProcessor) with images, or input_ids and a config with "
                "image_token_id so the image markers can be found."
            )
        markers = (input_ids == self.config.image_token_id).long().cumsum(dim=1)  # (batch, seq)
        found, given = markers[:, -1], real.sum(dim=1)
        if bool((found != given).any()):
            row = int((found != given).nonzero()[0, 0])
            raise ValueError(
                f"Row {row} has {int(found[row])} image markers ({self.config.image_token_id}) in the text but "
                f"{int(given[row])} images; give one image per marker."
            )
        visible = markers[:, :, None] > torch.arange(real.shape[1], device=input_ids.device)
        if documents is not None:
            # The marker of image n sits at the first position whose count exceeds n.
            where = (~visible).sum(dim=1).clamp(max=input_ids.shape[1] - 1)  # (batch, images)
            image_document = documents.ids.gather(1, where)
            visible = visible & (documents.ids[:, :, None] == image_document[:, None, :])
        return visible

    def _masks_and_rope(
        self,
        layer_ids: list[int] | range,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: SonettCache | None,
        record: _Recorder,
        documents: PackedDocuments | None = None,
    ) -> tuple[dict[int, object], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The mask of each layer (one per (kind, cache window), shared) and one RoPE table per kind.

        `documents`: the packed documents of the rows, or None; each kind's `build_mask` keeps them apart.
        """
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        shared: dict[tuple, object] = {}
        masks: dict[int, object] = {}
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in layer_ids:
            kind = self.layers[i].kind
            key = (kind, cache.layer_windows[i] if cache is not None else None)
            if key not in shared:
                shared[key] = self.layers[i].mixer.build_mask(
                    kind, allow_blocked=not record.output_attentions, layer_idx=i, documents=documents, **mask_kwargs
                )
            masks[i] = shared[key]
            if kind in ROPE_KINDS and kind not in rope:
                rope[kind] = self.rotary_emb(inputs_embeds, position_ids, kind)
        return masks, rope

    def _run_hourglass(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: SonettCache | None,
        record: _Recorder,
        kwargs: dict,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        """The hierarchy span: shorten `(batch, seq, hidden_size)`, run its layers, upsample and add back.

        Packed rows (`documents`) are unpacked into a left-padded batch of one document per row for the span, so each
        document is shortened and runs exactly as it does alone; the span's recorded hidden states and attention
        weights then come in that layout (one row per document).
        """
        if documents is not None:
            return self._run_hourglass_packed(hidden_states, position_ids, documents, record, kwargs)
        span = self.config.hierarchy_span()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "A model with a hierarchy needs a 2-D attention_mask (batch, past + seq) to know which tokens are "
                "padding before it shortens the sequence; a prepared 4-D mask cannot be used."
            )
        if cache is not None and getattr(cache, "hourglass", None) is None:
            raise ValueError(
                "This model has a hierarchy, but the cache has no hourglass state (it was built for another config "
                "or with with_hourglass=False); pass `model.make_cache()` or no cache."
            )

        def run_shortened(states, padding, positions, shortened_cache, placement):
            s_masks, s_rope = self._masks_and_rope(span, states, padding, positions, shortened_cache, record)
            return self._run_layers(span, states, s_masks, s_rope, shortened_cache, record, kwargs, placement)

        token_mask = attention_mask[:, -hidden_states.shape[1] :] if attention_mask is not None else None
        state = cache.hourglass if cache is not None else None
        return self.hourglass(hidden_states, token_mask, position_ids, state, run_shortened)

    def _run_hourglass_packed(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        documents: PackedDocuments,
        record: _Recorder,
        kwargs: dict,
    ) -> torch.Tensor:
        """`_run_hourglass` for packed rows `(batch, seq, hidden_size)`: one left-padded row per document."""
        pieces = []  # (row, start, length)
        for row in range(hidden_states.shape[0]):
            start = 0
            for length in documents.lengths(row):
                pieces.append((row, start, length))
                start += length
        width = max(length for _, _, length in pieces)

        def left_padded(x: torch.Tensor) -> torch.Tensor:
            rows = [x[row, start : start + length] for row, start, length in pieces]
            pad = [(0, 0, width - length, 0) if x.dim() == 3 else (width - length, 0) for _, _, length in pieces]
            return torch.stack([torch.nn.functional.pad(r, p) for r, p in zip(rows, pad)])

        mask = left_padded(torch.ones(position_ids.shape, dtype=torch.long, device=hidden_states.device))
        outputs = self._run_hourglass(left_padded(hidden_states), mask, left_padded(position_ids), None, record, kwargs)
        rows: list[list[torch.Tensor]] = [[] for _ in range(hidden_states.shape[0])]
        for index, (row, _, length) in enumerate(pieces):
            rows[row].append(outputs[index, width - length :])
        return torch.stack([torch.cat(row) for row in rows])

    def _run_layers(
        self,
        layer_ids: list[int] | range,
        hidden_states: torch.Tensor,
        masks: dict[int, object],
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        cache: SonettCache | None,
        record: _Recorder,
        kwargs: dict,
        placement: ShortenedPlacement | None = None,
        images: _ImageContext | None = None,
    ) -> torch.Tensor:
        """Run the decoder layers `layer_ids` in order on `hidden_states` `(batch, seq, hidden_size)`, each after
        its cross-attention block when there is one and images to attend to."""
        for i in layer_ids:
            layer = self.layers[i]
            if images is not None and i in images.states:
                keys, values = images.states[i]
                hidden_states = self.cross_attention_blocks[str(i)](hidden_states, keys, values, images.visible)
            record.add_hidden(i, hidden_states, placement)
            hidden_states, weights = layer(
                hidden_states, attention_mask=masks[i], position_embeddings=rope.get(layer.kind), cache=cache, **kwargs
            )
            record.add_attention(i, weights, placement)
        return hidden_states

    def make_cache(self, cache_implementation: str = "dynamic", max_cache_len: int | None = None) -> SonettCache:
        """An empty cache for this model, its windowed layers trimmed to what their heads can see.

        Args:
            cache_implementation: "dynamic" (`SonettCache`, grows as needed, saves to a memory file) or "static"
                (`SonettStaticCache`, fixed shapes for `torch.compile`).
            max_cache_len: for "static", the tokens (prompt + new) its full_attention layers must hold.
        """
        if cache_implementation in (None, "dynamic"):
            return SonettCache(self.config, layer_windows=self.inference_windows())
        if cache_implementation == "static":
            return SonettStaticCache(self.config, max_cache_len=max_cache_len, layer_windows=self.inference_windows())
        raise ValueError(
            f"Sonett cannot use cache_implementation={cache_implementation!r}; it supports "
            f"{', '.join(repr(name) for name in SUPPORTED_CACHE_IMPLEMENTATIONS)} (None means 'dynamic')."
        )

    def inference_windows(self) -> dict[int, int]:
        """Cache window per windowed layer: the learned span where adaptive spans are on, else the config's."""
        return {
            i: layer.mixer.cache_window() for i, layer in enumerate(self.layers) if hasattr(layer.mixer, "cache_window")
        }

    def attention_spans(self) -> dict[int, torch.Tensor]:
        """Learned span in tokens `(heads,)` of every adaptive-span layer, by layer index."""
        return {
            i: layer.mixer.spans().detach()
            for i, layer in enumerate(self.layers)
            if getattr(layer.mixer, "adaptive_span", False)
        }

    def span_penalty(self) -> torch.Tensor | None:
        """L1 penalty on the learned spans (mean span in tokens times `adaptive_span_loss_coef`), or None."""
        spans = [layer.mixer.spans() for layer in self.layers if getattr(layer.mixer, "adaptive_span", False)]
        if not spans or self.config.adaptive_span_loss_coef == 0:
            return None
        return self.config.adaptive_span_loss_coef * torch.cat(spans).mean()

    @staticmethod
    def _default_position_ids(
        inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int | torch.Tensor
    ) -> torch.LongTensor:
        """Positions `(batch, seq)` counting only real tokens when a 2-D padding mask is given.

        `past_length` may be a 0-d tensor (a static cache's count), so no value is read back to the host.
        """
        seq_len = inputs_embeds.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            positions = attention_mask.long().cumsum(-1) - 1
            return positions.clamp(min=0)[:, -seq_len:]
        positions = torch.arange(seq_len, device=inputs_embeds.device) + past_length
        return positions.unsqueeze(0).expand(inputs_embeds.shape[0], -1)


class SonettForCausalLM(SonettPreTrainedModel, GenerationMixin):
    """Sonett with a language-modelling head (tied to the input embedding by default).

    With `config.adaptive_span`, the training loss also carries the L1 penalty on the learned spans.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # With the config's MLP-only plan (and `embed_tokens: embedding_rowwise`, which transformers adds); see
    # `SonettConfig.base_model_tp_plan`. No pipeline-parallel plan: none is tested.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: SonettConfig) -> None:
        super().__init__(config)
        self.model = SonettModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def attention_spans(self) -> dict[int, torch.Tensor]:
        """Learned span in tokens `(heads,)` of every adaptive-span layer, by layer index."""
        return self.model.attention_spans()

    def make_cache(self, cache_implementation: str = "dynamic", max_cache_len: int | None = None) -> SonettCache:
        """An empty cache for this model (see `SonettModel.make_cache`)."""
        return self.model.make_cache(cache_implementation, max_cache_len)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """Give `generate()` this model's own cache up front (so `prefill_chunk_size` works too).

        `generation_config.cache_implementation` picks it: None or "dynamic" gives a `SonettCache`, "static" a
        `SonettStaticCache` holding `max_length` tokens (or `generation_config.max_cache_len`, if larger), which
        `generate` may compile the decode step for (see `compile_config`). Other implementations raise a ValueError.
        """
        implementation = generation_config.cache_implementation
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            # transformers checks a user cache against cache_implementation and marks it as the user's.
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
            return
        if implementation not in (None, *SUPPORTED_CACHE_IMPLEMENTATIONS):
            raise ValueError(
                f"Sonett cannot honour cache_implementation={implementation!r}: its layers keep their own per-kind "
                f"state. Use one of {', '.join(repr(name) for name in SUPPORTED_CACHE_IMPLEMENTATIONS)} (or None, "
                "the dynamic cache)."
            )
        if implementation == "static":
            # One spare slot: the 2-D mask then stays shorter than the cache up to the last step, which would
            # otherwise flip a shape guard in transformers' mask padding and recompile a compiled decode step.
            length = max(max_cache_length + 1, generation_config.max_cache_len or 0)
            model_kwargs["cache"] = self.make_cache("static", max_cache_len=length)
        else:
            model_kwargs["cache"] = self.make_cache()
            if generation_config.is_assistant:  # an assistant's drafts are rolled back when rejected
                model_kwargs["cache"].activate_past_recording()

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs) -> None:
        """Refuse assisted decoding (`assistant_model=`, `prompt_lookup_num_tokens=`) up front, naming the layers
        that cannot roll back, when this model or a Sonett assistant has any."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            assistant = generation_mode_kwargs.get("assistant_model")
            for who, model in (("this model", self), ("the assistant model", assistant)):
                parts = uncroppable_parts(model.config) if getattr(model, "config", None) is not None else []
                if parts and getattr(model.config, "model_type", None) == "sonett":
                    raise ValueError(
                        f"Assisted decoding (assistant_model= or prompt_lookup_num_tokens=) verifies draft tokens and "
                        f"rolls the cache back past the rejected ones, but {who} has {' and '.join(parts)}, whose "
                        "state cannot be rolled back (cropped) to an earlier token: it already holds the rejected "
                        "tokens. Generate without an assistant or prompt lookup (greedy, sampling and beam search "
                        "work), or use a model with only full_attention and sliding_attention layers and no hierarchy."
                    )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """What `generate` hands `forward` as the mask when the cache is static: the 2-D padding mask as it is.

        transformers would prepare one mask per layer kind here; Sonett builds them in `forward` (its linear and
        memory layers read the 2-D padding mask itself, and windowed layers of a static cache mask their own slots).
        Its length grows by one per step, so it is marked dynamic: a compiled decode step then compiles once.
        """
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(attention_mask, 1)
        return attention_mask

    def generate(self, *args, **kwargs):
        """transformers' `generate`. The prompt is checked once, before the first step
        (`_prepare_position_ids_for_generation`); the forward calls of this generation then skip the checks that read
        tensor values back to the host, so no decode step waits for the device (docs/design.md, invariant 12)."""
        token = GENERATE_VALIDATED.set(False)
        try:
            return super().generate(*args, **kwargs)
        finally:
            GENERATE_VALIDATED.reset(token)

    generate.__wrapped__ = GenerationMixin.generate  # `inspect.signature(model.generate)` names transformers' arguments

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """Check the prompt once per `generate` call, before positions are derived from it: its token ids and the
        values and shape of its 2-D `attention_mask` (generate drops an all-ones mask afterwards, so forward would
        never see a wrong one). The steps of this generation skip those checks afterwards (see `generate`)."""
        mask = model_kwargs.get("attention_mask")
        ids = model_kwargs.get("input_ids")
        prompt = ids if ids is not None and ids.shape[1] > 0 else inputs_tensor
        if prompt.dim() == 2 and not prompt.is_floating_point() and prompt.dtype != torch.bool:
            check_token_ids(self.config, prompt)
        if mask is not None and mask.dim() == 2:
            cache = model_kwargs.get("cache")
            past = int(cache.get_seq_length()) if cache is not None else 0
            expected = (prompt.shape[0], past + prompt.shape[1])
            if tuple(mask.shape) != expected and tuple(mask.shape) != tuple(prompt.shape[:2]):
                raise ValueError(
                    f"`attention_mask` has shape {tuple(mask.shape)} but the prompt needs {tuple(prompt.shape[:2])} "
                    "(batch, prompt tokens); pass the attention_mask the tokenizer returned with these input_ids."
                )
            check_padding_mask_values(mask)
        positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        GENERATE_VALIDATED.set(True)
        return positions

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length) -> None:
        """Also refuse, before any step, a generation that would run past the full_attention layers' limit."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = full_attention_token_limit(self.config)
        if limit is not None and generation_config.max_length > limit:
            raise ValueError(
                f"generate would grow the sequences to {generation_config.max_length} tokens (prompt "
                f"{input_ids_length} + up to {generation_config.max_length - input_ids_length} new), but "
                + position_limit_fix(self.config, limit)
                + f" Or lower max_new_tokens to {max(limit - input_ids_length, 0)} or less."
            )

    def _prefill(
        self, input_ids: torch.LongTensor, generation_config, model_kwargs: dict, is_first_iteration: bool = True
    ):
        """Refuse a user cache that already holds the whole prompt, before the first forward.

        As in transformers, `input_ids` (or `inputs_embeds`) passed with a filled cache are the whole sequence, the
        cached tokens first, and only the tokens after them are fed. When the cache holds as many tokens as the prompt
        or more, nothing is left to feed: transformers would feed the whole prompt again on top of the cache (a silent
        wrong answer), and the cache holds no logits for the last prompt token to continue from. The cached tokens
        are not compared with the prompt's (the cache does not store token ids).
        """
        cache = model_kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        if is_first_iteration:
            _check_static_cache_room(cache, generation_config.max_length, input_ids.shape[1])
        if past > 0:
            embeds = model_kwargs.get("inputs_embeds")
            if embeds is not None and is_first_iteration:
                given, whole = embeds.shape[1], True
            else:
                mask = model_kwargs.get("attention_mask")
                mask_length = mask.shape[1] if mask is not None else getattr(generation_config, "_mask_length", -1)
                given, whole = input_ids.shape[1], mask_length == input_ids.shape[1]
            if whole and given <= past:
                raise ValueError(
                    f"generate got a cache that already holds {past} tokens and a prompt of {given} tokens. With a "
                    "filled cache the prompt is the whole sequence, the cached tokens first, and only the tokens after "
                    "them are fed, so the prompt must be longer than the cache; the cache holds no logits to continue "
                    "from its last token. Pass the cached tokens plus at least one new token, build the cache from all "
                    "but the last prompt token (model(input_ids[:, :-1], use_cache=True).cache), or generate without "
                    "a cache."
                )
        return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=is_first_iteration)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SonettCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits and, with `labels`, the causal LM loss.

        Args:
            labels: `(batch, seq)` targets aligned with `input_ids` (shifted inside the loss); -100 is ignored.
                A `num_items_in_batch` keyword (from the Trainer) makes the loss a sum over that many tokens,
                so gradient accumulation matches one large batch. A `shift_labels` keyword `(batch, seq)` gives
                the already-shifted targets (position t predicts `shift_labels[:, t]`, as context parallelism
                passes them); when given, the loss is taken against it and `labels` may be None.
            logits_to_keep: compute logits only for the last N positions (0 = all), or for the given indices.
            Other arguments as in `SonettModel.forward` (`return_dict=False` gives a tuple).

        Returns:
            `CausalLMOutputWithPast` with `logits` `(batch, seq or N, vocab_size)`, `loss` and `cache`.
        """
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        if kwargs.pop("pixel_values", None) is not None:
            raise ValueError(
                f"{type(self).__name__} reads text only and would ignore pixel_values; load a multimodal folder with "
                "AutoModelForImageTextToText (SonettForConditionalGeneration) to use images."
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        return self.head_outputs(outputs, labels, logits_to_keep, loss_kwargs)

    def head_outputs(
        self, outputs: BaseModelOutputWithPast, labels: torch.Tensor | None, logits_to_keep, loss_kwargs: dict
    ) -> CausalLMOutputWithPast:
        """Logits of the kept positions and, with `labels` or `loss_kwargs["shift_labels"]`, the LM loss (plus the span
        penalty in training)."""
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        shift_labels = loss_kwargs.get("shift_labels")
        if labels is not None or shift_labels is not None:
            ignore = loss_kwargs.get("ignore_index", -100)
            for name, given in (("labels", labels), ("shift_labels", shift_labels)):
                if given is None:
                    continue
                if given.dtype not in ID_DTYPES:
                    raise ValueError(
                        f"`{name}` must hold integer token ids (or {ignore}) as torch.int64 (or torch.int32), got "
                        f"dtype {given.dtype}; convert them with `.long()`."
                    )
                if given.shape != logits.shape[:2]:
                    raise ValueError(
                        f"`{name}` has shape {tuple(given.shape)} but the logits cover {tuple(logits.shape[:2])}; "
                        "labels are aligned with input_ids (not pre-shifted), shift_labels with the logits (shifted "
                        "by one, -100 at the end), and both need logits_to_keep=0."
                    )
                check_label_values(name, given, self.vocab_size, ignore, "vocab_size")
            # cross_entropy takes int64 targets; the loss flattens shift_labels with view (so contiguous).
            labels = labels.long() if labels is not None else None
            if shift_labels is not None:
                shift_labels = shift_labels.long().contiguous()
                loss_kwargs = {**loss_kwargs, "shift_labels": shift_labels}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **loss_kwargs)
            penalty = self.model.span_penalty() if self.training else None
            if penalty is not None:
                if loss_kwargs.get("num_items_in_batch") is not None:
                    # Under gradient accumulation each micro-batch carries its share, so the sum is one penalty.
                    ignore = loss_kwargs.get("ignore_index", -100)
                    items = (
                        (shift_labels != ignore).sum()
                        if shift_labels is not None
                        else (labels[..., 1:] != ignore).sum()
                    )
                    penalty = penalty * items / loss_kwargs["num_items_in_batch"]
                loss = loss + penalty.to(loss.dtype)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class SonettForConditionalGeneration(SonettForCausalLM):
    """Sonett with images: a ViT encoder and projector, fused into the text decoder by gated cross-attention.

    The text part (`model`, `lm_head`) has the same names and shapes as in `SonettForCausalLM`, so
    `from_text_model` upgrades a trained text model; while the tanh gates are 0 its text logits are unchanged.
    """

    auto_map_heads = {
        **SonettForCausalLM.auto_map_heads,
        "AutoModelForImageTextToText": "modeling_sonett.SonettForConditionalGeneration",
    }

    def __init__(self, config: SonettConfig) -> None:
        if config.vision_config is None or not config.cross_attention_layers:
            raise ValueError(
                "SonettForConditionalGeneration needs config.vision_config and config.cross_attention_layers; "
                "use SonettForConditionalGeneration.from_text_model(...) to upgrade a text model."
            )
        super().__init__(config)
        self.vision_model = SonettVisionModel(config.vision_config)
        self.multi_modal_projector = SonettMultiModalProjector(config)
        self.post_init()

    @classmethod
    def from_text_model(
        cls,
        text_model: SonettForCausalLM,
        cross_attention_layers: list[int],
        vision_config: dict | None = None,
        image_token_id: int | None = None,
    ) -> SonettForConditionalGeneration:
        """A multimodal model whose text weights are `text_model`'s; new parts are freshly initialised.

        Args:
            text_model: a trained `SonettForCausalLM`.
            cross_attention_layers: decoder layers that get a gated cross-attention block.
            vision_config: `SonettVisionConfig` settings (defaults when None).
            image_token_id: the image marker token (default: the text config's, else 3, `<|image|>`).
        """
        values = text_model.config.to_dict()
        for key in ("auto_map", "architectures", "transformers_version", "model_type"):
            values.pop(key, None)
        values.update(
            vision_config=vision_config or {},
            cross_attention_layers=list(cross_attention_layers),
            image_token_id=image_token_id if image_token_id is not None else text_model.config.image_token_id or 3,
        )
        config = SonettConfig(**values)
        model = cls(config).to(dtype=text_model.dtype, device=text_model.device)
        missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
        new_parts = ("vision_model.", "multi_modal_projector.", "model.cross_attention_blocks.")
        if unexpected or [name for name in missing if not name.startswith(new_parts)]:
            raise ValueError(f"The text model does not fit: missing {missing}, unexpected {unexpected}.")
        model.train(text_model.training)
        return model

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values `(batch, images, channels, H, W)` -> visual tokens `(batch, images, tokens, hidden_size)`."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must have shape (batch, images, channels, height, width), got "
                f"{tuple(pixel_values.shape)}; prepare images with SonettImageProcessor / SonettProcessor."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be normalised floats, got dtype {pixel_values.dtype} (raw pixels?); prepare "
                "images with SonettImageProcessor / SonettProcessor."
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or infinite values; prepare images with SonettImageProcessor.")
        batch, images = pixel_values.shape[:2]
        features = self.vision_model(pixel_values.flatten(0, 1))
        tokens = self.multi_modal_projector(features)
        return tokens.view(batch, images, tokens.shape[1], tokens.shape[2])

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SonettCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits of text that may interleave images.

        Args:
            pixel_values: `(batch, images, 3, H, W)` from `SonettProcessor` (only with the prompt; decoding
                reads the image keys/values kept in the cache).
            image_mask: `(batch, images)`, 1 for a real image, 0 for a padding slot.
            cross_attention_mask: `(batch, seq, images)`, 1 where a position may see an image (its marker comes
                at or before it); derived from the image markers when None.
            Other arguments as in `SonettForCausalLM.forward`.
        """
        self._check_images_match_text(input_ids, inputs_embeds, pixel_values)
        image_tokens = self.get_image_tokens(pixel_values) if pixel_values is not None else None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            image_tokens=image_tokens,
            image_mask=image_mask,
            cross_attention_mask=cross_attention_mask,
            return_dict=True,
            **kwargs,
        )

    @staticmethod
    def _check_images_match_text(
        input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, pixel_values: torch.Tensor | None
    ) -> None:
        """Refuse pixel_values whose batch size differs from the text's (a model call without images stays a text-only
        run, markers included: with closed gates it equals the text model, docs/design.md, invariant 6)."""
        text = input_ids if input_ids is not None else inputs_embeds
        if pixel_values is not None and pixel_values.dim() == 5 and text is not None and len(pixel_values) != len(text):
            raise ValueError(
                f"pixel_values holds images for {pixel_values.shape[0]} samples but the text has batch size "
                f"{text.shape[0]}; pass one row of images per sample, shape (batch, images, 3, H, W), as "
                "SonettProcessor returns it."
            )

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Extend `cross_attention_mask` by one row per new token: it sees what the last position saw."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        mask = model_kwargs.get("cross_attention_mask")
        if mask is not None:
            model_kwargs["cross_attention_mask"] = torch.cat([mask, mask[:, -1:]], dim=1)
        return model_kwargs


def sequence_classification_loss(
    labels: torch.Tensor, pooled_logits: torch.Tensor, config: SonettConfig, **kwargs
) -> torch.Tensor:
    """transformers' `ForSequenceClassificationLoss`, after refusing single-label classes outside
    `[0, num_labels)` (-100 is ignored); regression and multi-label targets are floats and go through unchecked."""
    classes = config.num_labels > 1 and config.problem_type in (None, "single_label_classification")
    if classes and labels.dtype in ID_DTYPES:
        check_label_values("labels", labels, config.num_labels, -100, "num_labels")
        labels = labels.long()
    return ForSequenceClassificationLoss(labels, pooled_logits, config, **kwargs)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: SonettConfig, **kwargs):
    """transformers' `ForTokenClassification` loss, after refusing classes outside `[0, num_labels)` (-100 is
    ignored) and labels of other dtypes than int64/int32."""
    if labels.dtype not in ID_DTYPES:
        raise ValueError(
            f"`labels` must hold class ids (or -100) as torch.int64 (or torch.int32), got dtype {labels.dtype}."
        )
    check_label_values("labels", labels, config.num_labels, -100, "num_labels")
    return ForTokenClassification(logits, labels.long(), config, **kwargs)


class SonettForSequenceClassification(GenericForSequenceClassification, SonettPreTrainedModel):
    """Sonett with a linear `score` head read at the last real token of each row (transformers' generic head).

    The pooled token is the rightmost one that is not `config.pad_token_id`, so left- and right-padded batches give
    every row the logits it gets alone. `config.num_labels` and `config.problem_type` choose the loss (regression,
    single- or multi-label classification). Forward: `input_ids` `(batch, seq)`, `labels` `(batch,)` ->
    `logits` `(batch, num_labels)`.
    """

    # The loss is a mean over the batch that ignores the Trainer's `num_items_in_batch`; False makes the Trainer
    # divide it by the gradient-accumulation steps, so accumulation matches one large batch (docs/design.md,
    # invariant 7).
    accepts_loss_kwargs = False

    def __init__(self, config: SonettConfig) -> None:
        # The body is built here, not through `AutoModel.from_config` as the generic head does: under remote code
        # AutoModel is not registered for this config class and would ask for `trust_remote_code` again.
        SonettPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = SonettModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.loss_function = sequence_classification_loss
        self.post_init()


class SonettForTokenClassification(GenericForTokenClassification, SonettPreTrainedModel):
    """Sonett with a linear `score` head on every token (transformers' generic head), after dropout
    (`config.classifier_dropout`, default 0.1). Forward: `input_ids` `(batch, seq)`, `labels` `(batch, seq)` with
    -100 ignored -> `logits` `(batch, seq, num_labels)`.
    """

    accepts_loss_kwargs = False  # a mean loss, see SonettForSequenceClassification

    def __init__(self, config: SonettConfig) -> None:
        SonettPreTrainedModel.__init__(self, config)  # body built directly, see SonettForSequenceClassification
        self.num_labels = config.num_labels
        self.model = SonettModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(
            config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True)
        )
        self.loss_function = token_classification_loss
        self.post_init()


class SonettForQuestionAnswering(GenericForQuestionAnswering, SonettPreTrainedModel):
    """Sonett with a span head `qa_outputs` (transformers' generic head). Forward: `input_ids` `(batch, seq)`,
    `start_positions`/`end_positions` `(batch,)` -> `start_logits` and `end_logits` `(batch, seq)`.

    A causal model sees only the tokens before each position, so put the question before the context.
    """

    accepts_loss_kwargs = False  # a mean loss, see SonettForSequenceClassification

    def __init__(self, config: SonettConfig) -> None:
        SonettPreTrainedModel.__init__(self, config)  # body built directly, see SonettForSequenceClassification
        self.model = SonettModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = [
    "MIXER_CLASSES",
    "SonettForCausalLM",
    "SonettForConditionalGeneration",
    "SonettForQuestionAnswering",
    "SonettForSequenceClassification",
    "SonettForTokenClassification",
    "SonettModel",
    "SonettPreTrainedModel",
]
