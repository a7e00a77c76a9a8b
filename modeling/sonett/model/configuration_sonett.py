"""Sonett configuration.

`layer_types` holds one entry per decoder layer and alone decides, for each layer, which mixer module is
built, which attention mask it receives and which cache-layer class holds its decoding state.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Layer kinds implemented so far. A new kind needs one mixer module (registered in modeling_sonett.py) and one
# cache-layer class (registered in cache_sonett.py), plus its name here.
LAYER_KINDS: tuple[str, ...] = ("full_attention", "sliding_attention", "linear_attention", "memory_attention")
# How config.json spells a layer kind that transformers does not know. transformers parses config.json without
# Sonett's code in places (AutoTokenizer builds a generic PreTrainedConfig from it when remote code is not trusted),
# and its validator accepts only its own layer kinds. memory_attention, a sliding window plus a compressive memory
# state, is saved as transformers' `hybrid_sliding` ("sliding attention + linear-attention-shaped states");
# SonettConfig reads either name back as memory_attention.
SAVED_LAYER_KIND_NAMES: dict[str, str] = {"memory_attention": "hybrid_sliding"}
LOADED_LAYER_KIND_NAMES: dict[str, str] = {saved: kind for kind, saved in SAVED_LAYER_KIND_NAMES.items()}
# Kinds whose mixer uses RoPE (linear attention is position-free apart from its decay and convolution).
ROPE_KINDS: tuple[str, ...] = ("full_attention", "sliding_attention", "memory_attention")
LINEAR_FEATURE_MAPS: tuple[str, ...] = ("taylor", "elu", "identity")
MEMORY_UPDATES: tuple[str, ...] = ("linear", "delta")
# RoPE types Sonett computes, all with transformers' initialisers (`dynamic` rescales at run time past
# max_position_embeddings, as transformers' `dynamic_rope_update` does).
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "llama3")
# RoPE types whose initialiser reads the pretraining length from `original_max_position_embeddings`.
ROPE_TYPES_WITH_ORIGINAL_LENGTH: tuple[str, ...] = ("yarn", "llama3")
HIERARCHY_POOLINGS: tuple[str, ...] = ("linear", "mean")
HIERARCHY_UPSAMPLINGS: tuple[str, ...] = ("repeat", "linear")
HIERARCHY_KEYS: tuple[str, ...] = ("shorten_factor", "start_layer", "end_layer", "pooling", "upsampling")
# Integer fields of SonettConfig (None allowed where the field is optional).
INTEGER_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "adaptive_span_ramp",
    "linear_feature_dim",
    "linear_chunk_size",
    "linear_conv_size",
    "memory_chunk_size",
)


VISION_STEMS = ("patchify", "convolutional")
# Keys a config.json or `from_pretrained(..., key=value)` may carry besides the dataclass fields: what transformers
# itself reads or writes (also the attributes of transformers 4.x configs). They are never reported as misspelt.
TRANSFORMERS_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "model_type",
        "auto_map",
        "base_config_key",
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "torch_dtype",
        "num_labels",
        "rope_scaling",
        "rope_theta",
        "output_attentions",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "experts_implementation",
        "per_layer_config",
        "quantization_config",
        "transformers_weights",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        *GenerationConfig._get_default_generation_params(),
    }
)
# How close an unknown key must be to a field to be reported as a likely misspelling (difflib's ratio).
MISSPELLING_CUTOFF = 0.7


def warn_misspelt_keys(config: PreTrainedConfig, extra_keys: Any) -> None:
    """Log a warning for each unknown config key that looks like a misspelt field (`sliding_windw`).

    transformers keeps unknown keys as plain attributes, so a misspelt field would silently leave the real field at
    its default. Keys transformers itself uses (`TRANSFORMERS_CONFIG_KEYS`) and private ones are not reported, nor are
    keys close to no field (custom metadata).
    """
    fields = sorted(field.name for field in dataclasses.fields(config))
    for key in extra_keys:
        if not isinstance(key, str) or key.startswith("_") or key in fields or key in TRANSFORMERS_CONFIG_KEYS:
            continue
        close = difflib.get_close_matches(key, fields, n=1, cutoff=MISSPELLING_CUTOFF)
        if close:
            logger.warning_once(
                f"{type(config).__name__} got the unknown key {key!r}: did you mean {close[0]!r}? The key is kept as "
                f"an extra attribute and has no effect, so {close[0]} keeps its value; rename it in config.json (or "
                "the keyword argument)."
            )


@dataclasses.dataclass(frozen=True)
class HierarchySettings:
    """`SonettConfig.hierarchy` in typed form: hourglass shortening (Nawrot et al. 2021).

    The decoder layers `start_layer` <= i < `end_layer` run on the sequence shortened `shorten_factor` (k) times;
    `pooling` makes a shortened token from k states (`linear`: a projection of the k concatenated states, or `mean`),
    `upsampling` brings the shortened outputs back (`repeat`: one linear map, its output repeated k times, or
    `linear`: one map per position in a group). config.json holds `to_dict()`; read it with
    `SonettConfig.hierarchy_settings`.
    """

    shorten_factor: int
    start_layer: int
    end_layer: int
    pooling: str = "linear"
    upsampling: str = "repeat"

    @property
    def span(self) -> range:
        """Indices of the layers that run on the shortened sequence."""
        return range(self.start_layer, self.end_layer)

    def to_dict(self) -> dict[str, int | str]:
        """The dict config.json holds, keys in `HIERARCHY_KEYS` order."""
        return {key: getattr(self, key) for key in HIERARCHY_KEYS}

    @classmethod
    def parse(cls, hierarchy: dict | HierarchySettings, num_hidden_layers: int) -> HierarchySettings:
        """Read a `hierarchy` dict (or settings) for a stack of `num_hidden_layers`; a ValueError names the key
        that is wrong and what it must be."""
        if isinstance(hierarchy, cls):
            hierarchy = dataclasses.asdict(hierarchy)
        if not isinstance(hierarchy, dict):
            raise ValueError(
                f"SonettConfig.hierarchy must be a dict like {{'shorten_factor': 2, 'start_layer': 1, 'end_layer': 3}} "
                f"or None, got {hierarchy!r}."
            )
        unknown = sorted(set(hierarchy) - set(HIERARCHY_KEYS))
        if unknown:
            raise ValueError(f"SonettConfig.hierarchy has unknown keys {unknown}; allowed: {list(HIERARCHY_KEYS)}.")
        missing = [key for key in ("shorten_factor", "start_layer", "end_layer") if key not in hierarchy]
        if missing:
            raise ValueError(f"SonettConfig.hierarchy is missing {missing}.")
        factor, start, end = (hierarchy[key] for key in ("shorten_factor", "start_layer", "end_layer"))
        for name, value in (("shorten_factor", factor), ("start_layer", start), ("end_layer", end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SonettConfig.hierarchy['{name}'] must be an integer, got {value!r}.")
        if factor < 2:
            raise ValueError(f"SonettConfig.hierarchy['shorten_factor'] must be >= 2, got {factor}.")
        if num_hidden_layers < 3:
            raise ValueError(
                f"SonettConfig.hierarchy needs at least 3 layers (one full-length layer before the shortened span, "
                f"one in it and one after it), got num_hidden_layers={num_hidden_layers}."
            )
        if not 1 <= start < end <= num_hidden_layers - 1:
            raise ValueError(
                f"SonettConfig.hierarchy spans layers [{start}, {end}) but the shortened span must lie strictly "
                f"inside the {num_hidden_layers} layers: 1 <= start_layer < end_layer <= "
                f"{num_hidden_layers - 1}, so at least one full-length layer runs before and after it."
            )
        settings = cls(**hierarchy)
        for key, choices in (("pooling", HIERARCHY_POOLINGS), ("upsampling", HIERARCHY_UPSAMPLINGS)):
            if getattr(settings, key) not in choices:
                raise ValueError(
                    f"SonettConfig.hierarchy['{key}'] = {getattr(settings, key)!r}; choose from {list(choices)}."
                )
        return settings


@strict
class SonettVisionConfig(PreTrainedConfig):
    r"""Configuration of Sonett's small ViT image encoder and of the projector into the text width.

    Args:
        image_size: Side of the square input image in pixels (the image processor resizes to it).
        patch_size: Side of one square patch; `image_size` must be a multiple of it.
        stem: How pixels become patch tokens. `"patchify"` is ViT's single `patch_size`-strided convolution;
            `"convolutional"` is the convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers
            see better"): log2(patch_size) 3x3 stride-2 convolutions with GELU, then a 1x1 convolution, which lets
            every patch token see its neighbours' pixels (it needs a power-of-two `patch_size`).
        num_channels: Input channels (3, RGB).
        hidden_size: Width of the encoder.
        intermediate_size: Width of the encoder's GELU MLP.
        num_hidden_layers: Bidirectional encoder blocks.
        num_attention_heads: Heads of the encoder's self-attention.
        layer_norm_eps: Epsilon of the encoder's LayerNorms.
        num_visual_tokens: With a value, a resampler (learned queries attending to the patches, as Flamingo's
            Perceiver resampler) turns every image into this many tokens; None keeps one token per patch.
        initializer_range: Standard deviation of the normal weight initialisation.
    """

    model_type = "sonett_vision"
    base_config_key = "vision_config"

    image_size: int = 32
    patch_size: int = 4
    stem: str = "patchify"
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    layer_norm_eps: float = 1e-6
    num_visual_tokens: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        warn_misspelt_keys(self, kwargs)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate_architecture(self):
        """Part of `@strict` validation (runs again on save)."""
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SonettVisionConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SonettVisionConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SonettVisionConfig.num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size})."
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(
                f"SonettVisionConfig.layer_norm_eps must be a small positive number (e.g. 1e-6), got {eps!r}."
            )
        if self.num_visual_tokens is not None and self.num_visual_tokens < 1:
            raise ValueError(
                f"SonettVisionConfig.num_visual_tokens must be None or >= 1, got {self.num_visual_tokens}."
            )
        if self.stem not in VISION_STEMS:
            raise ValueError(f"SonettVisionConfig.stem must be one of {VISION_STEMS}, got {self.stem!r}.")
        if self.stem == "convolutional" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"SonettVisionConfig.stem='convolutional' halves the resolution per convolution, so patch_size must "
                f"be a power of two >= 2, got {self.patch_size}; use stem='patchify' for other patch sizes."
            )


class SetSubConfigs:
    """`sub_configs` as transformers' walkers read it: on the class every declared sub-config (as
    `PreTrainedConfig.sub_configs`), on an instance only the sub-configs that are set.

    `vision_config` is optional (`SubConfigSpec(optional=True)`) and None in a text-only config. transformers'
    library walkers skip a None sub-config, but code that walks `config.sub_configs` and reads each entry (the common
    model tests' RoPE and output helpers, for one) would meet None; an instance names only what it holds.
    """

    def __get__(self, instance: PreTrainedConfig | None, owner: type[PreTrainedConfig]) -> dict[str, type]:
        declared = {key: spec.config_class for key, spec in owner.sub_configs_defaults.items()}
        if instance is None:
            return declared
        return {key: cls for key, cls in declared.items() if getattr(instance, key, None) is not None}


@strict
class SonettConfig(PreTrainedConfig):
    r"""Configuration of a Sonett decoder.

    Args:
        vocab_size: Number of tokens in the vocabulary.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads in the softmax-attention layers.
        num_key_value_heads: Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
        head_dim: Width of one head; defaults to `hidden_size // num_attention_heads`.
        hidden_act: Activation of the gated MLP.
        max_position_embeddings: Longest sequence the model is trained for (used by scaled RoPE types).
        initializer_range: Standard deviation of the normal weight initialisation.
        rms_norm_eps: Epsilon of every RMSNorm.
        use_cache: Whether `forward` returns a `SonettCache` at inference.
        pad_token_id / bos_token_id / eos_token_id: Special token ids (must lie inside the vocabulary).
        tie_word_embeddings: Share the input embedding with the output projection.
        rope_parameters: RoPE settings, either one flat dict or one dict per layer kind
            (`{"full_attention": {...}, "sliding_attention": {...}}`, as Gemma 3 does).
        attention_bias: Bias on the q/k/v/o projections.
        attention_dropout: Dropout on attention probabilities during training.
        mlp_bias: Bias on the MLP projections.
        sliding_window: Keys a `sliding_attention` or `memory_attention` query can see, itself included.
        layer_types: One kind per layer, from `LAYER_KINDS`. Defaults to three sliding layers per full one.
            config.json writes memory_attention as `hybrid_sliding` (`SAVED_LAYER_KIND_NAMES`); both names load.
        adaptive_span: `sliding_attention` heads learn their own span z in [0, sliding_window] through the soft
            mask clamp((R + z - d) / R, 0, 1) (Sukhbaatar et al. 2019); the cache keeps only what spans can see.
        adaptive_span_ramp: R, the length of the soft ramp.
        adaptive_span_init: initial span as a fraction of `sliding_window`, in (0, 1).
        adaptive_span_loss_coef: weight of the L1 penalty (mean span in tokens) added to the training loss.
        linear_feature_map: feature map of `linear_attention` q/k: `taylor` (Based's 2nd-order Taylor map of a
            `linear_feature_dim` projection), `elu` (elu + 1) or `identity`.
        linear_feature_dim: projected q/k width that the Taylor map expands to 1 + d + d^2 features.
        linear_chunk_size: chunk length of the chunkwise-parallel training / prefill form.
        linear_conv_size: kernel of the short causal depthwise convolution on q/k/v (0 disables it).
        linear_use_fla: dispatch to flash-linear-attention kernels when installed and on CUDA.
        memory_update: how evicted tokens enter the compressive memory: `linear` or `delta` (delta rule).
        memory_chunk_size: chunk length of the chunked memory computation in training / prefill.
        hierarchy: hourglass shortening (Nawrot et al. 2021), or None for a flat stack. A dict with
            `shorten_factor` k >= 2 and the span of decoder layers `start_layer` <= i < `end_layer` that run on the
            sequence shortened k times (at least one full-length layer before and after the span), plus
            `pooling`: `linear` (a projection of the k concatenated states, default) or `mean`, and
            `upsampling`: `repeat` (each shortened output repeated k times through one linear map, default) or
            `linear` (one linear map per position in the group). Windows of the shortened layers count
            shortened tokens, so they reach k times further back. A `HierarchySettings` is taken too; the config
            stores (and saves) the dict, every key spelled out, and `config.hierarchy_settings` reads it back typed.
        vision_config: a `SonettVisionConfig` (or its dict) for the image encoder of
            `SonettForConditionalGeneration`; None for a text-only model.
        cross_attention_layers: indices of the decoder layers that get a gated cross-attention block to the images
            (run before the layer; tanh gates start at 0, so the text behaviour is unchanged until trained).
        image_token_id: the token that marks an image in the text.

    Example:
        >>> from sonett import SonettConfig, SonettForCausalLM
        >>> config = SonettConfig(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"])
        >>> model = SonettForCausalLM(config)
    """

    model_type = "sonett"
    sub_configs_defaults = {"vision_config": SubConfigSpec(SonettVisionConfig, optional=True)}
    sub_configs = SetSubConfigs()
    # transformers' RoPE helpers read a dict keyed by these names as one entry per kind (not only kinds in use).
    _rope_type_labels = ROPE_KINDS
    keys_to_ignore_at_inference = ["cache"]
    default_theta = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0, "memory_attention": 10_000.0}
    # Tensor parallelism shards the MLPs only: they are the same in every layer. transformers matches plan keys with
    # the layer index replaced by `*`, so a rule cannot name only the full/sliding layers, and a `layers.*.mixer`
    # rule would also shard the linear and memory mixers, whose decays, convolutions and memories are not sharded.
    # The mixers stay replicated. No pipeline-parallel plan: none is tested.
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = 1024
    layer_types: list[str] | None = None
    adaptive_span: bool = False
    adaptive_span_ramp: int = 32
    adaptive_span_init: float = 0.75
    adaptive_span_loss_coef: float = 1e-4
    linear_feature_map: str = "taylor"
    linear_feature_dim: int = 16
    linear_chunk_size: int = 64
    linear_conv_size: int = 4
    linear_use_fla: bool = True
    memory_update: str = "linear"
    memory_chunk_size: int = 64
    hierarchy: dict | HierarchySettings | None = None
    vision_config: dict | SonettVisionConfig | None = None
    cross_attention_layers: list[int] | None = None
    image_token_id: int | None = None

    def __post_init__(self, **kwargs):
        warn_misspelt_keys(self, kwargs)
        self._check_integer_fields()
        if isinstance(self.layer_types, list):
            self.layer_types = [LOADED_LAYER_KIND_NAMES.get(kind, kind) for kind in self.layer_types]
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        # Plain ValueErrors here, before @strict's own validators, so users see the field name first.
        self._check_fields()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The saved config as transformers reads it; refuses a config of another model type.

        transformers only warns when a config.json of another `model_type` (a Llama folder, say) is loaded into
        SonettConfig and then builds a Sonett model from the fields it recognises, with random weights for the rest.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        nested = any(isinstance(v, dict) and v.get("model_type") == cls.model_type for v in config_dict.values())
        if model_type is not None and model_type != cls.model_type and not nested:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a config of model_type {model_type!r}, not a Sonett config "
                f"(model_type {cls.model_type!r}), so {cls.__name__} cannot load it. Load it with its own classes "
                "(AutoConfig / AutoModelForCausalLM.from_pretrained), or point to a folder saved by a Sonett model."
            )
        return config_dict, kwargs

    def to_dict(self) -> dict:
        """The config as a dict, as transformers serializes it, with layer kinds under their saved names.

        `layer_types` spells memory_attention as `hybrid_sliding` (see `SAVED_LAYER_KIND_NAMES`), so that
        config.json also parses as a generic transformers config and `AutoTokenizer.from_pretrained(folder)` works
        without `trust_remote_code`. Loading maps the name back.
        """
        output = super().to_dict()
        if isinstance(output.get("layer_types"), list):
            output["layer_types"] = [SAVED_LAYER_KIND_NAMES.get(kind, kind) for kind in output["layer_types"]]
        return output

    def convert_rope_params_to_dict(self, **kwargs):
        """Bring `rope_parameters` to its standard form, then let transformers standardise it.

        None gives every RoPE kind of `layer_types` its own entry with its default base (Gemma 3 style). A flat dict
        applies to every RoPE kind; without `rope_theta` it becomes one entry per kind, each with the kind's
        default base. A per-kind dict gets the default entry for each RoPE kind of `layer_types` it leaves out.
        The legacy `rope_scaling` and `rope_theta` keys of older config.json files are read as transformers does.
        """
        rope_theta = kwargs.pop("rope_theta", None)

        def default_theta(kind: str) -> Any:
            """A legacy top-level `rope_theta` if given (checked later, so 0 or NaN is refused), else the kind's."""
            return self.default_theta[kind] if rope_theta is None else rope_theta

        params = copy.deepcopy(kwargs.pop("rope_scaling", None) or self.rope_parameters)
        kinds = [kind for kind in ROPE_KINDS if kind in self.layer_types]

        def default(kind: str) -> dict:
            return {"rope_type": "default", "rope_theta": default_theta(kind)}

        if params is None:
            params = {kind: default(kind) for kind in kinds} or default("sliding_attention")
        elif self._check_rope_layout(params):
            params = {**{kind: default(kind) for kind in kinds}, **params}
            for kind, entry in params.items():
                entry.setdefault("rope_theta", default_theta(kind))
        elif "rope_theta" not in params and rope_theta is None and kinds:
            params = {kind: {**params, "rope_theta": self.default_theta[kind]} for kind in kinds}
        else:
            params.setdefault("rope_theta", default_theta("sliding_attention"))
        self.rope_parameters = params
        return super().convert_rope_params_to_dict(**kwargs)

    def rope_parameters_for(self, kind: str) -> dict:
        """RoPE settings of one layer kind (the nested entry if there is one, else the flat dict)."""
        params = self.rope_parameters or {}
        return params[kind] if isinstance(params.get(kind), dict) else params

    def rope_max_positions(self, kind: str = "full_attention") -> int:
        """Positions the RoPE of one layer kind is set up to reach.

        `max_position_embeddings` for unscaled RoPE. A scaled RoPE (`linear`, `dynamic`, `yarn`, `llama3`) reaches
        `factor` times the pretraining length, which is `original_max_position_embeddings` for `yarn` and `llama3`
        (the initialisers read it there; it defaults to `max_position_embeddings`) and `max_position_embeddings`
        for `linear` and `dynamic`; the larger of that and `max_position_embeddings` counts.
        """
        params = self.rope_parameters_for(kind)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            return self.max_position_embeddings
        pretrained = self.max_position_embeddings
        if rope_type in ROPE_TYPES_WITH_ORIGINAL_LENGTH:
            pretrained = params.get("original_max_position_embeddings", pretrained)
        return max(self.max_position_embeddings, int(params["factor"] * pretrained))

    def _check_rope_layout(self, params: Any) -> bool:
        """Refuse a `rope_parameters` that is neither one flat dict nor one dict per RoPE kind; True if per kind."""
        if not isinstance(params, dict):
            raise ValueError(
                f"SonettConfig.rope_parameters must be a dict (one flat dict for every RoPE kind, or one dict per "
                f"kind such as {{'full_attention': {{...}}}}) or None, got {params!r}."
            )
        kind_keys = sorted(key for key in params if key in LAYER_KINDS)
        if not kind_keys:
            return False
        without_rope = [key for key in kind_keys if key not in ROPE_KINDS]
        if without_rope:
            raise ValueError(
                f"SonettConfig.rope_parameters has an entry for {without_rope}, but {', '.join(without_rope)} "
                f"layers use no RoPE; drop it (RoPE kinds: {list(ROPE_KINDS)})."
            )
        flat_keys = sorted(key for key in params if key not in LAYER_KINDS)
        if flat_keys:
            raise ValueError(
                f"SonettConfig.rope_parameters mixes per-kind entries {kind_keys} with flat keys {flat_keys}; give "
                "either one flat dict (it applies to every RoPE kind) or only per-kind entries, e.g. "
                "{'full_attention': {'rope_type': 'yarn', 'factor': 4.0, ...}, 'sliding_attention': {...}}."
            )
        for key in kind_keys:
            if not isinstance(params[key], dict):
                raise ValueError(
                    f"SonettConfig.rope_parameters['{key}'] must be a dict like {{'rope_type': 'default', "
                    f"'rope_theta': 10000.0}}, got {params[key]!r}."
                )
        return True

    def check_rope_parameters(self) -> None:
        """Raise a ValueError naming the field for RoPE settings Sonett cannot run as transformers would.

        Runs at construction, on save and when a model is built (so edits after construction are checked too).
        """
        nested = self._check_rope_layout(self.rope_parameters or {})
        for kind in [kind for kind in ROPE_KINDS if kind in self.layer_types]:
            where = f"SonettConfig.rope_parameters['{kind}']" if nested else "SonettConfig.rope_parameters"
            if nested and kind not in self.rope_parameters:
                raise ValueError(f"{where} is missing: give every RoPE kind of layer_types its own entry.")
            self._check_rope_entry(where, kind, self.rope_parameters_for(kind))

    def _check_rope_entry(self, where: str, kind: str, params: dict) -> None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{where}: rope_type {rope_type!r} (layer kind {kind!r}) is not supported; use one of "
                f"{list(SUPPORTED_ROPE_TYPES)}."
            )

        def number(key: str, low: float | None = None, above: bool = False) -> None:
            """A finite real number (not a bool), >= low (> low with `above`); a missing key is left to transformers."""
            value = params.get(key)
            if value is None:
                return
            real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not real or (low is not None and (value <= low if above else value < low)):
                need = "a finite number" if low is None else "a positive number" if above else f"a number >= {low:g}"
                raise ValueError(f"{where}: {key} must be {need}, got {value!r}.")

        number("rope_theta", 0.0, above=True)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"{where}: partial_rotary_factor {params['partial_rotary_factor']!r} is not supported; Sonett rotates "
                "the whole head (drop the key or set it to 1.0)."
            )
        if rope_type != "default":
            number("factor", 1.0)
        original = params.get("original_max_position_embeddings")
        if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
            raise ValueError(f"{where}: original_max_position_embeddings must be a positive integer, got {original!r}.")
        for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            number(key)
        number("attention_factor", 0.0)
        low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
        if rope_type == "llama3" and low is not None and high is not None and high <= low:
            raise ValueError(
                f"{where}: high_freq_factor ({high}) must be greater than low_freq_factor ({low}) for rope_type "
                "'llama3'."
            )
        # transformers' own check of the keys each type needs (it raises KeyError; unknown keys only get a warning)
        validate = getattr(self, f"_validate_{rope_type}_rope_parameters")
        try:
            validate({"rope_type": rope_type, **params}, ignore_keys=self.ignore_keys_at_rope_validation)
        except KeyError as error:
            raise ValueError(f"{where}: {error.args[0]}.") from None

    def _check_integer_fields(self) -> None:
        """Integers first, so a quoted number in config.json ("512") is named instead of failing in arithmetic."""
        for name in INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(
                    f"SonettConfig.{name} must be an integer, got {value!r}; write it as a number in config.json "
                    "(no quotes, no decimal point)."
                )

    def _check_fields(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is None or value < 1:
                raise ValueError(f"SonettConfig.{name} must be a positive integer, got {value!r}.")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            positive(name)
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(
                f"SonettConfig.rms_norm_eps must be a small positive number (e.g. 1e-6), got {eps!r}: RMSNorm divides "
                "by sqrt(mean(x^2) + eps), so 0 divides by zero on a zero vector and a negative or NaN eps gives NaN."
            )
        dropout, init_range = self.attention_dropout, self.initializer_range
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(
                f"SonettConfig.attention_dropout must be a probability in [0, 1) (0.0 for none), got {dropout!r}."
            )
        if isinstance(init_range, bool) or not isinstance(init_range, numbers.Real) or not 0 <= init_range < math.inf:
            raise ValueError(
                f"SonettConfig.initializer_range must be a finite standard deviation >= 0 (e.g. 0.02), got "
                f"{init_range!r}: new weights are drawn from a normal distribution with it."
            )
        if self.hidden_act not in ACT2FN:
            close = difflib.get_close_matches(str(self.hidden_act), sorted(ACT2FN), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"SonettConfig.hidden_act = {self.hidden_act!r} is not an activation transformers knows; {hint}"
                f"choose one of transformers' ACT2FN names: {sorted(ACT2FN)}."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"SonettConfig.num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"SonettConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        self._check_layer_types()
        windowed = {"sliding_attention", "memory_attention"} & set(self.layer_types)
        if windowed and (self.sliding_window is None or self.sliding_window < 2):
            raise ValueError(
                f"SonettConfig.sliding_window must be >= 2 (the token itself and at least one earlier token) "
                f"when layer_types contains {sorted(windowed)}, got {self.sliding_window!r}."
            )
        self._check_mixer_settings()
        self._check_hierarchy()
        self._check_vision()
        self.check_rope_parameters()
        eos_ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        special_ids = {
            "pad_token_id": [self.pad_token_id],
            "bos_token_id": [self.bos_token_id],
            "eos_token_id": eos_ids,
        }
        for name, values in special_ids.items():
            for value in values:
                if value is not None and not 0 <= value < self.vocab_size:
                    raise ValueError(
                        f"SonettConfig.{name} = {value} lies outside the vocabulary [0, {self.vocab_size}); "
                        "set it to a token id of the tokenizer or to None."
                    )

    def _check_mixer_settings(self) -> None:
        if self.linear_feature_map not in LINEAR_FEATURE_MAPS:
            raise ValueError(
                f"SonettConfig.linear_feature_map = {self.linear_feature_map!r}; "
                f"choose from {list(LINEAR_FEATURE_MAPS)}."
            )
        if self.memory_update not in MEMORY_UPDATES:
            raise ValueError(
                f"SonettConfig.memory_update = {self.memory_update!r}; choose from {list(MEMORY_UPDATES)}."
            )
        for name in ("linear_feature_dim", "linear_chunk_size", "memory_chunk_size", "adaptive_span_ramp"):
            if getattr(self, name) < 1:
                raise ValueError(f"SonettConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.linear_conv_size < 0:
            raise ValueError(
                f"SonettConfig.linear_conv_size must be >= 0 (0 disables it), got {self.linear_conv_size}."
            )
        if not 0.0 < self.adaptive_span_init < 1.0:
            raise ValueError(f"SonettConfig.adaptive_span_init must lie in (0, 1), got {self.adaptive_span_init}.")
        if self.adaptive_span_loss_coef < 0:
            raise ValueError(f"SonettConfig.adaptive_span_loss_coef must be >= 0, got {self.adaptive_span_loss_coef}.")

    def _check_hierarchy(self) -> None:
        """Check `hierarchy` (a dict or a `HierarchySettings`) and store it as the dict config.json holds, every
        key spelled out, so equal hierarchies compare (and fingerprint) equal."""
        if self.hierarchy is not None:
            self.hierarchy = HierarchySettings.parse(self.hierarchy, self.num_hidden_layers).to_dict()

    def _check_vision(self) -> None:
        layers = self.cross_attention_layers or []
        if layers and self.vision_config is None:
            raise ValueError(
                "SonettConfig.cross_attention_layers is set but vision_config is None; give a vision_config "
                "(e.g. {} for the defaults) or drop the cross-attention layers."
            )
        for index in layers:
            if not isinstance(index, int) or not 0 <= index < self.num_hidden_layers:
                raise ValueError(
                    f"SonettConfig.cross_attention_layers has {index!r}; entries must be layer indices in "
                    f"[0, {self.num_hidden_layers})."
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"SonettConfig.cross_attention_layers has repeated entries: {layers}.")
        inside = sorted(set(layers) & set(self.hierarchy_span()))
        if inside:
            raise ValueError(
                f"SonettConfig.cross_attention_layers {inside} lie inside the hierarchy span "
                f"{list(self.hierarchy_span())}; place cross-attention at full-length layers."
            )
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(
                f"SonettConfig.image_token_id = {self.image_token_id} lies outside the vocabulary "
                f"[0, {self.vocab_size})."
            )

    @property
    def hierarchy_settings(self) -> HierarchySettings | None:
        """The `hierarchy` setting in typed form, or None for a flat stack: the one place everything reads it from."""
        if self.hierarchy is None:
            return None
        return HierarchySettings.parse(self.hierarchy, self.num_hidden_layers)

    def hierarchy_span(self) -> range:
        """Indices of the layers that run on the shortened sequence (empty without a hierarchy)."""
        settings = self.hierarchy_settings
        return range(0) if settings is None else settings.span

    def _check_layer_types(self) -> None:
        """Check `layer_types`, first reading saved spellings (`hybrid_sliding`) back as Sonett's kinds, also when
        they were set after construction (e.g. `from_pretrained(folder, layer_types=<config.json's list>)`)."""
        if isinstance(self.layer_types, list):
            self.layer_types = [LOADED_LAYER_KIND_NAMES.get(kind, kind) for kind in self.layer_types]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"SonettConfig.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give exactly one kind per layer."
            )
        for index, kind in enumerate(self.layer_types):
            if kind not in LAYER_KINDS:
                raise ValueError(
                    f"SonettConfig.layer_types[{index}] = {kind!r} is not a known layer kind; "
                    f"choose from {list(LAYER_KINDS)}."
                )

    def validate_layer_type(self):
        """Part of `@strict` validation (runs again on save): Sonett's own layer kinds."""
        self._check_layer_types()

    def validate_architecture(self):
        """Part of `@strict` validation (runs again on save)."""
        self._check_fields()


__all__ = ["LAYER_KINDS", "ROPE_KINDS", "HierarchySettings", "SonettConfig", "SonettVisionConfig"]
