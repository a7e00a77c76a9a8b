"""Vision fine-tuning recipe: teach a trained text Sonett to see, on embedded data that needs no download.

`train_vision` upgrades a text model folder with `SonettForConditionalGeneration.from_text_model`, freezes the
language model (or trains it too), and trains the ViT encoder, the projector and the gated cross-attention
blocks with Accelerate on chat-formatted questions about images: naming scikit-learn's handwritten digits and
answering questions about generated shapes. The loss counts the assistant's answer tokens only. It measures
exact-answer accuracy on held-out images with greedy `generate()` and writes a folder that loads with
`AutoProcessor` / `AutoModelForImageTextToText` (`trust_remote_code=True`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sonett.extras import requires_extra

with requires_extra("train"):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
with requires_extra("vision"):
    from PIL import Image

from sonett.data.images import (
    CAPTION_QUESTION,
    SHAPES_TEST_SEED,
    SHAPES_TRAIN_SEED,
    digits_examples,
    question_type,
    shapes_examples,
    to_chat,
)
from sonett.hub.loading import load_tokenizer
from sonett.hub.model_card import render_model_card
from sonett.hub.saving import count_parameters, save_model_and_tokenizer
from sonett.hub.upload import relative_local_paths
from sonett.model.image_processing_sonett import SonettImageProcessor
from sonett.model.modeling_sonett import SonettForCausalLM, SonettForConditionalGeneration
from sonett.model.processing_sonett import SonettProcessor
from sonett.training.arguments import RUNS_DIR, check_output_dir
from sonett.training.optimization import CROSS_ATTENTION_GATE, create_optimizer, create_scheduler, parameter_groups
from sonett.training.vision_encoder import EncoderPretrainingModel, annotation_accuracy, pretrain_encoder, stack_targets

logger = logging.getLogger(__name__)

VISION_TRAINING_DATA = (
    "scikit-learn's bundled handwritten digits (train split) and procedurally generated shapes images with "
    "question-answer pairs (`sonett.data.images`), on top of the text model it was upgraded from"
)
VISION_INTENDED_USE = (
    "A demonstration of Sonett's vision fusion on embedded toy data (digits, coloured shapes on a 2x2 grid); it has "
    "not seen natural images and is not meant for them."
)
NEW_PARTS = ("vision_model.", "multi_modal_projector.", "model.cross_attention_blocks.")


@dataclass
class VisionArguments:
    """Settings of one vision fine-tuning run; every field is also a `sonett train vision` flag."""

    text_model: str = field(
        default="runs/sonett-tiny",
        metadata={"help": "the trained text model folder to upgrade (`sonett train` writes runs/sonett-tiny)"},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "the multimodal model folder to write (default: runs/<text model>-vision)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "write over a model folder already in output_dir (refused otherwise)"}
    )
    cross_attention_layers: list[int] = field(
        default_factory=lambda: [1, 3, 5],
        metadata={"help": "decoder layers that get a gated cross-attention block to the image"},
    )
    image_size: int = field(default=32, metadata={"help": "side of the square input images in pixels"})
    patch_size: int = field(default=4, metadata={"help": "side of one image patch in pixels"})
    stem: str = field(
        default="convolutional",
        metadata={"help": "how pixels become patch tokens: patchify (one strided convolution) or convolutional"},
    )
    vision_hidden_size: int = field(default=96, metadata={"help": "width of the ViT image encoder"})
    vision_layers: int = field(default=3, metadata={"help": "transformer layers of the image encoder"})
    vision_heads: int = field(default=4, metadata={"help": "attention heads of the image encoder"})
    num_visual_tokens: int | None = field(
        default=None, metadata={"help": "resample the patches to this many image tokens (default: one token per patch)"}
    )
    encoder_steps: int = field(
        default=1000,
        metadata={"help": "steps of stage 1, pretraining the encoder on the image annotations (0: skip the stage)"},
    )
    encoder_learning_rate: float = field(default=2e-3, metadata={"help": "learning rate of stage 1"})
    encoder_batch_size: int = field(
        default=64, metadata={"help": "images per stage-1 batch (half digits, half shapes)"}
    )
    train_shapes: int = field(default=3000, metadata={"help": "generated shapes images to train on"})
    test_shapes: int = field(default=300, metadata={"help": "generated shapes images held out for the accuracy"})
    max_steps: int = field(
        default=1500, metadata={"help": "optimizer steps of stage 2 (fusion: questions about images)"}
    )
    batch_size: int = field(default=32, metadata={"help": "questions per stage-2 batch"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate of stage 2 (cosine schedule)"})
    fusion_encoder_lr_scale: float = field(
        default=0.1,
        metadata={"help": "the encoder's learning rate in stage 2, as a factor of --learning_rate (0 freezes it)"},
    )
    gate_lr_multiplier: float = field(
        default=10.0, metadata={"help": "learning-rate factor of the cross-attention tanh gates"}
    )
    open_gates: float = field(
        default=0.0, metadata={"help": "start the tanh gates at this value instead of 0 (closed)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the matrices"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps of both stages"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this value"})
    text_lora_rank: int = field(
        default=16, metadata={"help": "rank of LoRA adapters on the language model (0: keep it frozen)"}
    )
    train_special_tokens: bool = field(
        default=True, metadata={"help": "with LoRA, train the chat template's special-token embeddings in full"}
    )
    digit_shift: int = field(
        default=2, metadata={"help": "shift digit images by up to this many pixels (augmentation)"}
    )
    digit_share: float = field(default=0.25, metadata={"help": "share of each batch that names digits"})
    caption_share: float = field(
        default=0.25, metadata={"help": "share of each batch that captions shapes images (the rest: shape questions)"}
    )
    eval_questions: int = field(default=600, metadata={"help": "held-out shape questions scored at the end"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (autocast)"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the data and the sampling"})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path(RUNS_DIR) / f"{Path(self.text_model).name}-vision")
        shares = {"digit_share": self.digit_share, "caption_share": self.caption_share}
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"VisionArguments.{name} must be in [0, 1], got {share}.")
        if self.digit_share + self.caption_share >= 1.0:
            raise ValueError(
                f"digit_share + caption_share is {self.digit_share + self.caption_share}; it must stay below 1 so "
                "that each batch keeps shape questions. Lower one of them."
            )


def shifted(image: Image.Image, rng: random.Random, pixels: int) -> Image.Image:
    """The image moved by up to `pixels` in each direction (zero fill): augmentation for the small digit set."""
    if pixels == 0:
        return image
    dx, dy = rng.randint(-pixels, pixels), rng.randint(-pixels, pixels)
    array = np.asarray(image)
    out = np.zeros_like(array)
    h, w = array.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = array[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return Image.fromarray(out)


def question_records(examples: list[dict], task: str) -> list[dict]:
    """One record per (image, question, answer)."""
    return [
        {"image": ex["image"], "question": q, "answer": a, "task": task} for ex in examples for q, a in ex["questions"]
    ]


class ChatEncoder:
    """Chat-template tokenisation of (question, answer) pairs, cached (the text does not depend on the image)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def __call__(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Input ids and labels (-100 outside the assistant's answer) of one question about an image."""
        key = (question, answer)
        if key not in self.cache:
            encoded = self.tokenizer.apply_chat_template(
                to_chat({"image": None}, question, answer),
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
            self.cache[key] = (ids, [t if m else -100 for t, m in zip(ids, mask)])
        return self.cache[key]


def training_batch(records: list[dict], encoder: ChatEncoder, processor: SonettProcessor, pad_id: int) -> dict:
    """Right-padded ids and answer-only labels `(batch, seq)`, pixel_values `(batch, 1, 3, H, W)`."""
    pairs = [encoder(r["question"], r["answer"]) for r in records]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    attention_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, (ids, target) in enumerate(pairs):
        input_ids[i, : len(ids)], labels[i, : len(ids)], attention_mask[i, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(target),
            1,
        )
    pixel_values = processor.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values[:, None],
    }


@torch.no_grad()
def answer_accuracy(
    model: SonettForConditionalGeneration, processor: SonettProcessor, records: list[dict], batch_size: int = 64
) -> tuple[float, list[str]]:
    """Share of records whose greedy answer equals the expected one, and the predicted answers."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                to_chat({"image": None}, r["question"], "")[:1], add_generation_prompt=True, tokenize=False
            )
            for r in chunk
        ]
        inputs = processor(text=texts, images=[[r["image"]] for r in chunk], return_tensors="pt", padding=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        generated = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id
        )
        new = generated[:, inputs["input_ids"].shape[1] :]
        predictions += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    correct = sum(p == r["answer"] for p, r in zip(predictions, records))
    model.train(was_training)
    return correct / max(len(records), 1), predictions


def add_text_lora(model: SonettForConditionalGeneration, rank: int, trainable_token_ids: list[int] | None = None):
    """LoRA adapters on the language model's projections (PEFT); the new vision parts train in full.

    `trainable_token_ids` are embedding rows trained in full through PEFT's trainable tokens (tied to the output
    layer): the chat template's special tokens, which a model pretrained on plain text has never seen. Frozen at
    their initial values, `<|end|>` stays unlearnable and its constant loss and gradient crowd out the rest.
    """
    with requires_extra("train"):
        from peft import LoraConfig, get_peft_model

    targets = r"model\.layers\.\d+\.(mixer|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    tokens = {"embed_tokens": list(trainable_token_ids)} if trainable_token_ids else None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, trainable_token_indices=tokens)
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if name.removeprefix("base_model.model.").startswith(NEW_PARTS):
            param.requires_grad = True
    return model


def build_processor(text_folder: str, args: VisionArguments) -> SonettProcessor:
    tokenizer = load_tokenizer(text_folder)  # refuses a folder with code of its own (`sonett.hub.loading`)
    tokenizer.padding_side = "left"
    image_processor = SonettImageProcessor(size={"height": args.image_size, "width": args.image_size})
    return SonettProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


SPLITS = ("train", "test")


def vision_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT encoder of a SonettForConditionalGeneration, with or without a PEFT wrapper."""
    return model.get_base_model().vision_model if hasattr(model, "get_base_model") else model.vision_model


def encoder_learning_rate(groups: list[dict], encoder: torch.nn.Module, learning_rate: float) -> list[dict]:
    """`groups` with the encoder's parameters moved into groups of their own at `learning_rate`; with 0 the
    encoder is frozen instead (its parameters stop requiring gradients and leave the optimizer)."""
    encoder_ids = {id(p) for p in encoder.parameters()}
    if learning_rate == 0:
        encoder.requires_grad_(False)
    split = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in encoder_ids]
        mine = [p for p in group["params"] if id(p) in encoder_ids]
        if rest:
            split.append({**group, "params": rest})
        if mine and learning_rate > 0:
            split.append({**group, "params": mine, "lr": learning_rate})
    return split


def encoder_stage(
    accelerator: Accelerator,
    encoder: torch.nn.Module,
    processor: SonettProcessor,
    digit_images: dict[str, list[dict]],
    shape_images: dict[str, list[dict]],
    args: VisionArguments,
) -> dict:
    """Stage 1: pretrain `encoder` in place on the images' annotations (`vision_pretraining`); returns the head's
    held-out accuracies and the final loss."""
    rng = random.Random(args.seed + 2)
    pretraining = EncoderPretrainingModel(encoder)
    # every parameter decays here, with AdamW's default betas (the recipe's settings since it was tuned)
    optimizer = create_optimizer(
        pretraining.parameters(), args.encoder_learning_rate, betas=(0.9, 0.999), weight_decay=0.01
    )
    scheduler = create_scheduler(optimizer, args.warmup_steps, args.encoder_steps)
    prepared, optimizer, scheduler = accelerator.prepare(pretraining, optimizer, scheduler)

    def pixels(images: list[Image.Image]) -> torch.Tensor:
        return processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def sample_batch(rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        half = args.encoder_batch_size // 2
        examples = [
            dict(e, image=shifted(e["image"], rng, args.digit_shift)) for e in rng.sample(digit_images["train"], half)
        ]
        examples += rng.sample(shape_images["train"], args.encoder_batch_size - half)
        return pixels([e["image"] for e in examples]), stack_targets(examples)

    history = pretrain_encoder(
        prepared,
        optimizer,
        scheduler,
        sample_batch,
        args.encoder_steps,
        rng,
        backward=accelerator.backward,
        clip=lambda: accelerator.clip_grad_norm_(prepared.parameters(), args.max_grad_norm),
        device=accelerator.device,
    )
    held_out = digit_images["test"] + shape_images["test"]
    accuracy = annotation_accuracy(pretraining, pixels([e["image"] for e in held_out]), stack_targets(held_out))
    logger.info("encoder stage: held-out annotation accuracy %s", accuracy)
    return {"held_out_accuracy": accuracy, "final_loss": float(np.mean(history[-20:])), "steps": args.encoder_steps}


def train_vision(args: VisionArguments) -> dict:
    """Run the recipe and write the multimodal folder to `args.output_dir`. Returns the measured results."""
    started = time.perf_counter()
    folder = Path(args.text_model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No text model at {folder}; train one first (`sonett train` writes runs/sonett-tiny) or pass --text_model."
        )
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    rng = random.Random(args.seed)
    processor = build_processor(str(folder), args)
    tokenizer = processor.tokenizer

    text_model = SonettForCausalLM.from_pretrained(folder)
    model = SonettForConditionalGeneration.from_text_model(
        text_model,
        cross_attention_layers=args.cross_attention_layers,
        vision_config={
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "stem": args.stem,
            "hidden_size": args.vision_hidden_size,
            "intermediate_size": 2 * args.vision_hidden_size,
            "num_hidden_layers": args.vision_layers,
            "num_attention_heads": args.vision_heads,
            "num_visual_tokens": args.num_visual_tokens,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    digit_images = {split: digits_examples(split, seed=args.seed, image_size=args.image_size) for split in SPLITS}
    shape_images = {
        "train": shapes_examples(args.train_shapes, SHAPES_TRAIN_SEED, args.image_size),
        "test": shapes_examples(args.test_shapes, SHAPES_TEST_SEED, args.image_size),
    }
    encoder_results = {}
    if args.encoder_steps:
        encoder_results = encoder_stage(accelerator, model.vision_model, processor, digit_images, shape_images, args)

    if args.open_gates:
        # Start the tanh gates at this value instead of 0: a randomly initialised encoder then gets a usable
        # signal from the first step (the text model's behaviour is not kept at step 0; it is being fine-tuned).
        with torch.no_grad():
            for block in model.model.cross_attention_blocks.values():
                block.attn_gate.fill_(math.atanh(args.open_gates))
                block.mlp_gate.fill_(math.atanh(args.open_gates))
    if args.text_lora_rank:
        special = sorted(tokenizer.added_tokens_decoder) if args.train_special_tokens else None
        model = add_text_lora(model, args.text_lora_rank, special)
    else:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(NEW_PARTS)

    digits_train = question_records(digit_images["train"], "digits")
    digits_test = question_records(digit_images["test"], "digits")
    shapes_train = question_records(shape_images["train"], "shapes")
    shapes_test = question_records(shape_images["test"], "shapes")
    captions_train = [
        {"image": e["image"], "question": CAPTION_QUESTION, "answer": e["caption"], "task": "captions"}
        for e in shape_images["train"]
    ]
    eval_rng = random.Random(args.seed + 1)
    shapes_eval = eval_rng.sample(shapes_test, min(args.eval_questions, len(shapes_test)))

    # only the cross-attention gates (which start closed) take the gate learning rate in this recipe
    gate_lr = args.learning_rate * args.gate_lr_multiplier
    groups = encoder_learning_rate(
        parameter_groups(model, args.weight_decay, gate_lr, gate_roles=(CROSS_ATTENTION_GATE,)),
        vision_encoder(model),
        args.learning_rate * args.fusion_encoder_lr_scale,
    )
    trainable = count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable %s of %s parameters", f"{trainable:,}", f"{total:,}")
    optimizer = create_optimizer(groups, args.learning_rate)
    scheduler = create_scheduler(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    encoder = ChatEncoder(tokenizer)

    model.train()
    history = []
    progress = tqdm(total=args.max_steps, desc="vision", disable=not accelerator.is_local_main_process)
    for _ in range(args.max_steps):
        # Digits (shifted a little), shapes captions, and shape questions for the rest of the batch.
        n_digits, n_captions = round(args.batch_size * args.digit_share), round(args.batch_size * args.caption_share)
        records = [
            dict(r, image=shifted(r["image"], rng, args.digit_shift)) for r in rng.sample(digits_train, n_digits)
        ]
        records += rng.sample(captions_train, n_captions)
        records += rng.sample(shapes_train, args.batch_size - n_digits - n_captions)
        batch = {
            k: v.to(accelerator.device)
            for k, v in training_batch(records, encoder, processor, tokenizer.pad_token_id).items()
        }
        loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        history.append(float(loss.detach()))
        progress.update(1)
        progress.set_postfix(loss=f"{history[-1]:.3f}")
    progress.close()

    unwrapped = accelerator.unwrap_model(model)
    if args.text_lora_rank:
        unwrapped = unwrapped.merge_and_unload()  # a plain SonettForConditionalGeneration folder
    digits_accuracy, digit_predictions = answer_accuracy(unwrapped, processor, digits_test)
    shapes_accuracy, shape_predictions = answer_accuracy(unwrapped, processor, shapes_eval)
    by_type: dict[str, list[bool]] = {}
    for record, prediction in zip(shapes_eval, shape_predictions):
        by_type.setdefault(question_type(record["question"]), []).append(prediction == record["answer"])
    results = {
        "digits_accuracy": digits_accuracy,
        "digits_test_images": len(digits_test),
        "shapes_accuracy": shapes_accuracy,
        "shapes_test_questions": len(shapes_eval),
        "shapes_accuracy_by_type": {name: sum(hits) / len(hits) for name, hits in sorted(by_type.items())},
        "steps": args.max_steps,
        "encoder_stage": encoder_results,
        "trainable_parameters": trainable,
        "parameters": total,
        "final_train_loss": float(np.mean(history[-20:])),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "gates": {
            i: [round(float(b.attn_gate.detach().tanh()), 4), round(float(b.mlp_gate.detach().tanh()), 4)]
            for i, b in unwrapped.model.cross_attention_blocks.items()
        },
        "arguments": asdict(args),
    }
    output = Path(args.output_dir)
    if accelerator.is_main_process:
        save_model_and_tokenizer(unwrapped, processor, output)
        written = relative_local_paths(results, output)  # no absolute local path in the uploaded folder
        (output / "vision_results.json").write_text(json.dumps(written, indent=2) + "\n")
        card_facts = {
            **{k: v for k, v in results.items() if k not in ("arguments", "gates", "encoder_stage")},
            "training_data": VISION_TRAINING_DATA,
            "learning_rate": args.learning_rate,
            "precision": args.mixed_precision,
            "hardware": str(accelerator.device),
            "train_runtime": f"{results['wall_time_s']} s",
            "intended_use": VISION_INTENDED_USE,
        }
        card = render_model_card(unwrapped.config, total, card_facts, output.name)
        (output / "README.md").write_text(card, encoding="utf-8")
        samples = [
            {"image": r["image"], "question": r["question"], "answer": r["answer"], "prediction": p}
            for r, p in list(zip(digits_test, digit_predictions))[:8] + list(zip(shapes_eval, shape_predictions))[:8]
        ]
        results["samples"] = samples
    return results


__all__ = ["VisionArguments", "answer_accuracy", "question_records", "train_vision"]
