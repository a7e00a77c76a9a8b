"""Sonett: a hybrid transformer language model that is native to the Hugging Face ecosystem.

Importing the package registers Sonett with the transformers Auto classes, and marks each class for
remote code so that `save_pretrained` writes a folder that loads with `trust_remote_code=True` anywhere.
The image processor and processor need Pillow (`pip install "sonett[vision]"`); without it the text models still
import, and naming one of them raises `MissingExtraError` with that command.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers.utils import is_vision_available

from .extras import missing_extra_error
from .model.cache_sonett import SonettCache, SonettStaticCache
from .model.configuration_sonett import LAYER_KINDS, SonettConfig, SonettVisionConfig
from .model.modeling_sonett import (
    SonettForCausalLM,
    SonettForConditionalGeneration,
    SonettForQuestionAnswering,
    SonettForSequenceClassification,
    SonettForTokenClassification,
    SonettModel,
    SonettPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("sonett", SonettConfig, exist_ok=True)
AutoModel.register(SonettConfig, SonettModel, exist_ok=True)
AutoModelForCausalLM.register(SonettConfig, SonettForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(SonettConfig, SonettForConditionalGeneration, exist_ok=True)
AutoModelForSequenceClassification.register(SonettConfig, SonettForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(SonettConfig, SonettForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(SonettConfig, SonettForQuestionAnswering, exist_ok=True)
AutoTokenizer.register(SonettConfig, tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
if is_vision_available():  # Pillow: the `vision` extra
    from .model.image_processing_sonett import SonettImageProcessor
    from .model.processing_sonett import SonettProcessor

    AutoImageProcessor.register(SonettConfig, image_processor_classes={"pil": SonettImageProcessor}, exist_ok=True)
    AutoProcessor.register(SonettConfig, SonettProcessor, exist_ok=True)

SonettConfig.register_for_auto_class()
SonettModel.register_for_auto_class("AutoModel")
SonettForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SonettForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SonettForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
SonettForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
SonettForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

_VISION_CLASSES = ("SonettImageProcessor", "SonettProcessor")


def __getattr__(name: str):
    """`sonett.SonettProcessor` without Pillow: the error names `pip install "sonett[vision]"`."""
    if name in _VISION_CLASSES:
        raise missing_extra_error("PIL", "vision")
    raise AttributeError(f"module 'sonett' has no attribute {name!r}")


__all__ = [
    "LAYER_KINDS",
    "SonettCache",
    "SonettConfig",
    "SonettForCausalLM",
    "SonettForConditionalGeneration",
    "SonettForQuestionAnswering",
    "SonettForSequenceClassification",
    "SonettForTokenClassification",
    "SonettImageProcessor",
    "SonettModel",
    "SonettPreTrainedModel",
    "SonettProcessor",
    "SonettStaticCache",
    "SonettVisionConfig",
]
