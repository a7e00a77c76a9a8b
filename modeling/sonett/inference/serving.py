"""Serve a Sonett folder over an OpenAI-compatible HTTP API with transformers' own server (`transformers serve`).

transformers 5.24 cannot serve a remote-code model: `ModelManager._load_model` resolves the model class with
`getattr(transformers, config.architectures[0])`, which raises `AttributeError: module transformers has no
attribute SonettForCausalLM` for any class that ships with the model folder. `SonettModelManager` changes only
that step: it first tries transformers' own loading path and, when that fails in exactly this way, loads the
class that `config.auto_map` names for the architecture through its Auto class (`AutoModelForCausalLM` or
`AutoModelForImageTextToText`). So the workaround retires by itself once an installed transformers loads such
models; the log says which path loaded the model.

No code of the served folder runs: the manager loads with `trust_remote_code=False`, so the Auto classes resolve to
the `sonett` package's registered classes, and a local folder is checked first (`sonett.hub.loading.check_folder`
refuses Python files other than the package's and `auto_map` entries that name other code).

Everything else (the FastAPI app, its routes `/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
`/v1/models`, `/health`, streaming, generation) is transformers' own (`transformers.cli.serving`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import transformers
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import Modality, split_model_id, split_revision

from sonett.extras import MissingExtraError, install_command, requires_extra
from sonett.hub.loading import check_folder
from sonett.hub.saving import chat_stop_token_ids

if TYPE_CHECKING:
    from fastapi import FastAPI
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # reachable from this machine only; pass --host 0.0.0.0 to expose it
DEFAULT_PORT = 8000
# Auto classes that may load a served model, in the order they are tried against `config.auto_map`.
SERVED_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM")
# What transformers' own loading path raises for a class that is not part of transformers (5.24, 5.25).
UPSTREAM_LOOKUP_ERROR = "module transformers has no attribute"


def _require_serving_packages() -> None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise MissingExtraError(
            f"Serving needs fastapi, uvicorn, pydantic and openai: {install_command('serve')} "
            "(or pip install 'transformers[serving]')."
        )


def auto_class_for(config: transformers.PreTrainedConfig) -> type:
    """The Auto class whose `config.auto_map` entry names `config.architectures[0]`.

    Raises:
        ValueError: the config names no architecture, or no causal-LM / image-text-to-text Auto class for it.
    """
    architectures = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    if not architectures:
        raise ValueError(
            "config.json names no architecture (`architectures` is empty), so the server cannot tell which model "
            "class to load; save the model with model.save_pretrained(folder)."
        )
    for auto_name in SERVED_AUTO_CLASSES:
        reference = auto_map.get(auto_name)
        if reference is not None and reference.rsplit(".", 1)[-1] == architectures[0]:
            return getattr(transformers, auto_name)
    raise ValueError(
        f"config.json's auto_map names no {' or '.join(SERVED_AUTO_CLASSES)} for {architectures[0]} "
        f"(auto_map: {auto_map}); save the model again with `import sonett` first, so that its auto_map is written."
    )


class SonettModelManager(ModelManager):
    """transformers' `ModelManager`, loading remote-code models through their Auto class when it cannot."""

    upstream_loads_remote_code: bool | None = None  # None: not tried yet

    def _load_model(
        self,
        model_id_and_revision: str,
        tqdm_class: type | None = None,
        progress_callback: Callable | None = None,
        gguf_file: str | None = None,
    ) -> PreTrainedModel:
        """transformers' own loading path while it works; the `config.auto_map` Auto class once it fails with
        transformers' class lookup error (decided at the first load, which `force_model` makes the startup)."""
        if self.upstream_loads_remote_code is not False:
            try:
                model = super()._load_model(model_id_and_revision, tqdm_class, progress_callback, gguf_file)
            except AttributeError as error:
                if UPSTREAM_LOOKUP_ERROR not in str(error) or gguf_file is not None:
                    raise
                logger.info(
                    "transformers %s cannot load remote-code models itself (%s); loading %s through the Auto "
                    "class that its config.auto_map names",
                    transformers.__version__,
                    error,
                    model_id_and_revision,
                )
                self.upstream_loads_remote_code = False
            else:
                logger.info(
                    "loaded %s as %s with transformers %s's own loading path; Sonett's workaround is not needed",
                    model_id_and_revision,
                    type(model).__name__,
                    transformers.__version__,
                )
                self.upstream_loads_remote_code = True
                return model
        return self._load_through_auto_map(model_id_and_revision, tqdm_class)

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        """AutoProcessor as transformers loads it; the tokenizer alone for a text-only folder.

        With the `sonett` package imported, AutoProcessor maps every Sonett config to SonettProcessor, which
        needs the image processor that a text-only folder does not have (OSError).
        """
        try:
            return super()._load_processor(model_id_and_revision, gguf_file=gguf_file)
        except OSError as error:
            model_id, revision = split_revision(model_id_and_revision)
            logger.info("no processor in %s (%s); serving with its tokenizer", model_id, error)
            return transformers.AutoTokenizer.from_pretrained(
                model_id, revision=revision, trust_remote_code=self.trust_remote_code
            )

    def _load_through_auto_map(self, model_id_and_revision: str, tqdm_class: type | None) -> PreTrainedModel:
        model_id, revision = split_revision(model_id_and_revision)
        kwargs: dict[str, Any] = {
            "revision": revision,
            "attn_implementation": self.attn_implementation,
            "dtype": self.dtype,
            "device_map": self.device,
            "trust_remote_code": self.trust_remote_code,
            "tqdm_class": tqdm_class,
        }
        quantization_config = self.get_quantization_config()
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        config = transformers.AutoConfig.from_pretrained(model_id, **kwargs)
        auto_class = auto_class_for(config)
        model = auto_class.from_pretrained(model_id, **kwargs)
        logger.info("loaded %s as %s through %s", model_id_and_revision, type(model).__name__, auto_class.__name__)
        return model

    def load_model_and_processor(self, model_id_and_revision: str, *args, **kwargs):
        """Load as transformers does; a folder saved before its generation config listed `<|end|>` gets it.

        The server loads the folder it was started with (`force_model`) only: any other id is refused before
        anything of it is read, so a request cannot make the server load another folder. The folder is checked for
        code (`sonett.hub.loading.check_folder`) before it is loaded, and none of its code runs.
        """
        pinned = self.process_model_name(split_model_id(self.force_model)[0]) if self.force_model else None
        if model_id_and_revision != pinned:
            raise ValueError(
                f"This server serves only {self.force_model!r} (it loads that folder and no other); "
                f"{model_id_and_revision!r} was refused. Start another `sonett serve` for another model."
            )
        check_folder(split_revision(model_id_and_revision)[0])
        model, processor = super().load_model_and_processor(model_id_and_revision, *args, **kwargs)
        add_missing_stop_tokens(model, processor)
        return model, processor

    @staticmethod
    def get_model_modality(model: PreTrainedModel, processor: Any = None) -> Modality:
        """transformers' answer for its own classes; for a class it does not list (it raises ValueError), an
        image-text model if the config has a `vision_config`, else a text model."""
        try:
            return ModelManager.get_model_modality(model, processor=processor)
        except ValueError:
            takes_images = getattr(model.config, "vision_config", None) is not None
            return Modality.VLM if takes_images else Modality.LLM


def add_missing_stop_tokens(model: PreTrainedModel, processor: Any) -> None:
    """Add the tokenizer's turn-end token to `model.generation_config.eos_token_id` if it is missing there."""
    stop = chat_stop_token_ids(processor)
    current = model.generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    missing = [token for token in stop if token not in current]
    if missing:
        logger.warning(
            "generation_config.json of %s does not list the end-of-turn token ids %s; adding them so replies stop "
            "at the end of the assistant turn (save the folder again with sonett.hub.saving.save_model_and_tokenizer)",
            model.name_or_path,
            missing,
        )
        model.generation_config.eos_token_id = current + missing


# transformers' server routes that `build_app` removes (see there).
UNPINNING_ROUTES = ("/load_model", "/reset")


def build_app(
    folder: str,
    device: str = "auto",
    dtype: str | None = "auto",
    attn_implementation: str | None = None,
    enable_cors: bool = False,
) -> FastAPI:
    """transformers' OpenAI-compatible app serving the model in `folder` (a path or Hub id, `id@revision` pins one).

    The model is loaded now, so a folder that cannot load fails here rather than at the first request.
    """
    _require_serving_packages()
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    manager = SonettModelManager(
        device=device,
        dtype=dtype,
        trust_remote_code=False,  # the package's registered classes load the folder; none of its code runs
        attn_implementation=attn_implementation,
        force_model=folder,
    )
    state = GenerationState()
    app = build_server(
        manager,
        ChatCompletionHandler(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
        enable_cors=enable_cors,
    )
    # transformers' routes that load another model or unload this one: this server is pinned to one folder, which it
    # checked, so a request must not name another or stop the served model.
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) not in UNPINNING_ROUTES]
    return app


def serve(
    folder: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Load `folder` and answer OpenAI-style requests on http://host:port until interrupted (see `build_app`)."""
    with requires_extra("serve"):
        import uvicorn

    app = build_app(folder, **app_kwargs)
    logger.info("serving %s on http://%s:%d/v1 (model name: %r)", folder, host, port, folder)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "SonettModelManager",
    "add_missing_stop_tokens",
    "auto_class_for",
    "build_app",
    "serve",
]
